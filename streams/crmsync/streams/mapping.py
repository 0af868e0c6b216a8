"""How source events become target writes: field mappings, filters, custom entities, activities."""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from crmsync.streams.config import (
    EVENT_TYPES,
    PROFILE_KEY,
    SUBJECT_PLACEHOLDERS,
    CampaignToD365Config,
    Condition,
    CustomEntity,
    D365ToCampaignConfig,
    EventType,
    FieldMapping,
    FilterGroup,
    value_key,
)
from crmsync.streams.sinks.base import ProfileLink, SinkRecord
from crmsync.targets.errors import Fatal, RecordRejected

GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
#: Dataverse's limit for an activity's subject.
SUBJECT_MAX_LENGTH = 400


@dataclass(slots=True)
class Write:
    """One record for one target system's sink (never changed once made; not ``frozen``, as
    ``SinkRecord``, for the cost of a frozen ``__init__`` on every record)."""

    system: Literal["d365", "campaign"]
    record: SinkRecord


class MappingError(RecordRejected):
    """The event can never be mapped (a bad id, an unknown picklist value): dead-letter it."""


# -- values and filters -----------------------------------------------------------------------


def convert(mapping: FieldMapping, value: Any) -> Any:
    """The value written for ``value`` of ``mapping.source`` (see ``FieldMapping``)."""
    if value is None:
        return mapping.default
    if mapping.replacements or mapping.picklist is not None:
        key = value_key(value)
        if key in mapping.replacements:
            value = mapping.replacements[key]
        elif mapping.picklist is not None:
            label = mapping.picklist.get(key)
            if label is None:
                if mapping.default is None:
                    known = ", ".join(sorted(mapping.picklist)) or "none"
                    raise MappingError(
                        f"{mapping.source}: option-set value {value!r} has no label in the "
                        f"picklist of {mapping.target} (known: {known}) and no default is set"
                    )
                return mapping.default
            value = label
    if mapping.max_length is not None and isinstance(value, str):
        value = value[: mapping.max_length]
    return value


def matches(rule: FilterGroup | Condition, record: Mapping[str, Any]) -> bool:
    """Whether ``record`` (field → value) passes a filter group or condition."""
    if isinstance(rule, FilterGroup):
        if rule.all is not None:
            return all(matches(item, record) for item in rule.all)
        return any(matches(item, record) for item in rule.any or ())
    value = record.get(rule.field)
    if rule.op == "exists":
        return (value is not None) == (rule.value is not False)
    if rule.op == "eq":
        return value_key(value) == value_key(rule.value)
    if rule.op == "ne":
        return value_key(value) != value_key(rule.value)
    if rule.op == "in":
        assert isinstance(rule.value, list)
        return value_key(value) in {value_key(v) for v in rule.value}
    assert isinstance(rule.value, str)  # prefix
    return isinstance(value, str) and value.startswith(rule.value)


# -- compiled once per config ------------------------------------------------------------------
#
# The per-record path below touches no pydantic model: a config is turned once into closures and
# tuples of plain values (its models are frozen, so the plan stays true), cached by the config
# object. ``convert`` and ``matches`` are the reference semantics the plans follow.

Converter = Callable[[Any], Any]
Predicate = Callable[[Mapping[str, Any]], bool]
#: (source, target, apply_updates, converter) of one FieldMapping.
_Field = tuple[str, str, bool, Converter]

_PLANS: dict[tuple[int, Callable[[Any], Any]], tuple[weakref.ref[Any], Any]] = {}


def _plan(model: Any, build: Callable[[Any], Any]) -> Any:
    """The plan ``build(model)`` made once per model object (dropped when the model is)."""
    key = (id(model), build)
    cached = _PLANS.get(key)
    if cached is not None and cached[0]() is model:
        return cached[1]
    plan = build(model)
    _PLANS[key] = (weakref.ref(model, lambda _ref: _PLANS.pop(key, None)), plan)
    return plan


def _as_is(value: Any) -> Any:
    """The converter of a mapping that writes the value as it is (the compiled writers skip it)."""
    return value


def compile_converter(mapping: FieldMapping) -> Converter:
    """``convert`` for one mapping as a plain function of the value."""
    default = mapping.default
    max_length = mapping.max_length
    if not mapping.replacements and mapping.picklist is None:
        if max_length is None:
            if default is None:
                return _as_is
            return lambda value: default if value is None else value

        def cut(value: Any) -> Any:
            if value is None:
                return default
            return value[:max_length] if isinstance(value, str) else value

        return cut
    replacements = dict(mapping.replacements)
    picklist = None if mapping.picklist is None else dict(mapping.picklist)
    source, target = mapping.source, mapping.target

    def full(value: Any) -> Any:
        if value is None:
            return default
        key = value_key(value)
        if key in replacements:
            value = replacements[key]
        elif picklist is not None:
            label = picklist.get(key)
            if label is None:
                if default is None:
                    known = ", ".join(sorted(picklist)) or "none"
                    raise MappingError(
                        f"{source}: option-set value {value!r} has no label in the "
                        f"picklist of {target} (known: {known}) and no default is set"
                    )
                return default
            value = label
        if max_length is not None and isinstance(value, str):
            value = value[:max_length]
        return value

    return full


def compile_filter(rule: FilterGroup | Condition) -> Predicate:
    """``matches`` for one filter group or condition as a plain function of the record."""
    if isinstance(rule, FilterGroup):
        items = tuple(compile_filter(item) for item in (rule.all or rule.any or ()))
        # Plain loops: all()/any() over a generator cost more than the tests they run.
        if rule.all is not None:

            def every(record: Mapping[str, Any]) -> bool:
                for item in items:
                    if not item(record):
                        return False
                return True

            return every

        def some(record: Mapping[str, Any]) -> bool:
            for item in items:
                if item(record):
                    return True
            return False

        return some
    field, op, expected = rule.field, rule.op, rule.value
    if op == "exists":
        present = expected is not False
        return lambda record: (record.get(field) is not None) == present
    if op == "eq":
        want = value_key(expected)
        return lambda record: value_key(record.get(field)) == want
    if op == "ne":
        want = value_key(expected)
        return lambda record: value_key(record.get(field)) != want
    if op == "in":
        assert isinstance(expected, list)
        wanted = frozenset(value_key(v) for v in expected)
        return lambda record: value_key(record.get(field)) in wanted
    assert isinstance(expected, str)  # prefix
    prefix = expected
    return lambda record: isinstance(value := record.get(field), str) and value.startswith(prefix)


def _fields(mappings: list[FieldMapping]) -> tuple[_Field, ...]:
    return tuple((m.source, m.target, m.apply_updates, compile_converter(m)) for m in mappings)


#: (source, target, apply_updates, converter — None when the value is written as it is —,
#: whether the target is the record key) of one FieldMapping, as the writers run it.
_Step = tuple[str, str, bool, Converter | None, bool]


def _steps(fields: tuple[_Field, ...], key_field: str | None) -> tuple[_Step, ...]:
    return tuple(
        (source, target, apply, None if converter is _as_is else converter, target == key_field)
        for source, target, apply, converter in fields
    )


def _mapped(
    steps: tuple[_Step, ...], after: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """``(fields, create_fields, carried)``: only the source fields the event carries are
    written; those mapped to the key field (the client writes it on create) are left out, but
    count in ``carried`` (whether the event carries any mapped field)."""
    fields: dict[str, Any] = {}
    create_fields: dict[str, Any] = {}
    carried = False
    for source, target, apply_updates, converter, is_key in steps:
        if source in after:
            value = after[source] if converter is None else converter(after[source])
            carried = True
            if not is_key:
                (fields if apply_updates else create_fields)[target] = value
    return fields, create_fields, carried


@dataclass(frozen=True, slots=True)
class _Rows:
    """What writing one kind of row needs, as plain values (a contact's profile or an entity's)."""

    target: str
    key_field: str
    steps: tuple[_Step, ...]
    filters: Predicate | None
    propagate_deletes: bool
    delete_when_filtered_out: bool
    #: (source_field, target_field) of a custom entity's profile link.
    link: tuple[str, str] | None = None


def _contact_rows(config: D365ToCampaignConfig) -> _Rows:
    return _Rows(
        config.profile_resource,
        PROFILE_KEY,
        _steps(_fields(config.mappings), PROFILE_KEY),
        None if config.filters is None else compile_filter(config.filters),
        config.propagate_deletes,
        config.delete_when_filtered_out,
    )


def _entity_rows(entity: CustomEntity) -> _Rows:
    link = entity.link
    return _Rows(
        entity.target,
        entity.key_field,
        _steps(_fields(entity.mappings), None),
        None if entity.filters is None else compile_filter(entity.filters),
        entity.propagate_deletes,
        entity.delete_when_filtered_out,
        None if link is None else (link.source_field, link.target_field),
    )


_Writes = Callable[[Mapping[str, Any]], list[Write]]


def _topics(config: D365ToCampaignConfig) -> dict[str, _Writes]:
    """Source topic → the writes of its events (the contact topic first: it wins a clash)."""
    plans: dict[str, _Writes] = {
        config.contact_topic: _contact_writer(_plan(config, _contact_rows))
    }
    for entity in config.custom_entities:
        if entity.source_topic not in plans:
            plans[entity.source_topic] = _plan(entity, _entity_plan)
    return plans


def compile_writes(config: D365ToCampaignConfig) -> Callable[[str, Mapping[str, Any]], list[Write]]:
    """``writes_for`` of one config as a plain function of (topic, event), made once."""
    plans: dict[str, _Writes] = _plan(config, _topics)

    def writes(topic: str, event: Mapping[str, Any]) -> list[Write]:
        plan = plans.get(topic)
        if plan is None:
            raise Fatal(f"d365-to-campaign has no mapping for topic {topic!r}")
        return plan(event)

    return writes


def _key(event: Mapping[str, Any]) -> str:
    key = event.get("key")
    if not isinstance(key, str) or not key:
        raise MappingError(f"the event has no record key (key={key!r})")
    return key


def _after(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """The new values of a create/update/read."""
    after: Mapping[str, Any] | None = event.get("after")
    if after is None:
        raise MappingError(f"a {event.get('op')!r} event of key {event.get('key')!r} has no after")
    return after


def _known(event: Mapping[str, Any], after: Mapping[str, Any]) -> Mapping[str, Any]:
    """All known values: ``before`` updated by ``after`` (what filters look at)."""
    before = event.get("before")
    return {**before, **after} if before else after


def _left_out(rows: _Rows, event: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether the rows' filters leave a create/update/read out (it writes nothing then, or
    deletes its row with ``delete_when_filtered_out``)."""
    return rows.filters is not None and not rows.filters(_known(event, after))


# -- d365-to-campaign -------------------------------------------------------------------------


def contact_writes(event: Mapping[str, Any], config: D365ToCampaignConfig) -> list[Write]:
    """A contact's ChangeEvent → the upsert or delete of its profile (externalId = contactid).

    A create/update/read writes the mapped fields the event carries (``apply_updates`` false →
    only when the profile is created); one that carries none writes nothing. A contact failing
    ``filters`` writes nothing, or deletes its profile with ``delete_when_filtered_out``. A
    delete deletes the profile when ``propagate_deletes``.
    """
    plans: dict[str, _Writes] = _plan(config, _topics)
    return plans[config.contact_topic](event)


def _contact_writer(rows: _Rows) -> _Writes:
    """The writes of a contact's events under ``rows``, as one function with its plan bound."""
    target, steps, filters = rows.target, rows.steps, rows.filters
    deleted = _delete(rows)

    def writes(event: Mapping[str, Any]) -> list[Write]:
        key = event.get("key")
        if not isinstance(key, str) or not key:
            key = _key(event)  # raises
        if event.get("op") == "d":
            return deleted(key) if rows.propagate_deletes else []
        after = event.get("after")
        if after is None:
            after = _after(event)  # raises
        if filters is not None and not filters(_known(event, after)):
            return deleted(key) if rows.delete_when_filtered_out else []
        # _mapped, inlined: this loop runs for every field of every contact change.
        fields: dict[str, Any] = {}
        create_fields: dict[str, Any] = {}
        carried = False
        for source, field_name, apply_updates, converter, is_key in steps:
            if source in after:
                value = after[source] if converter is None else converter(after[source])
                carried = True
                if not is_key:  # the record key: the client writes it on create
                    (fields if apply_updates else create_fields)[field_name] = value
        if not carried:
            return []
        # Positional: the record's __init__ takes them faster than keywords.
        record = SinkRecord(
            target, key, "upsert", fields, "upsert", PROFILE_KEY, None, create_fields
        )
        return [Write("campaign", record)]

    return writes


def _delete(rows: _Rows) -> Callable[[str], list[Write]]:
    target, key_field = rows.target, rows.key_field
    return lambda key: [
        Write("campaign", SinkRecord(target, key, op="delete", key_field=key_field))
    ]


def entity_writes(
    event: Mapping[str, Any], entity: CustomEntity, config: D365ToCampaignConfig
) -> list[Write]:
    """A custom entity's ChangeEvent → the upsert or delete of its custom-resource row.

    The row is keyed by ``entity.key_field`` = the Dynamics record id. With a ``link``, a row is
    linked to the profile of the contact named by ``link.source_field`` (a null unlinks it); the
    sink reports ``ParentMissing`` while that profile does not exist.
    """
    writes: _Writes = _plan(entity, _entity_plan)
    return writes(event)


def _entity_plan(entity: CustomEntity) -> _Writes:
    return _entity_writer(_plan(entity, _entity_rows))


def _entity_writer(rows: _Rows) -> _Writes:
    """The writes of a custom entity's events under ``rows``, with its plan bound."""
    target, key_field, steps, filters, link = (
        rows.target,
        rows.key_field,
        rows.steps,
        rows.filters,
        rows.link,
    )
    deleted = _delete(rows)

    def writes(event: Mapping[str, Any]) -> list[Write]:
        key = _key(event)
        if event.get("op") == "d":
            return deleted(key) if rows.propagate_deletes else []
        after = _after(event)
        if filters is not None and not filters(_known(event, after)):
            return deleted(key) if rows.delete_when_filtered_out else []
        fields, create_fields, _ = _mapped(steps, after)
        if link is not None and link[0] in after:
            source_field, target_field = link
            contact = after[source_field]
            if contact is not None and (not isinstance(contact, str) or not contact):
                raise MappingError(f"{source_field}: not a contact id: {contact!r}")
            fields[target_field] = None if contact is None else ProfileLink(contact)
        if not fields and not create_fields:
            return []
        record = SinkRecord(
            target, key, fields=fields, create_fields=create_fields, key_field=key_field
        )
        return [Write("campaign", record)]

    return writes


def writes_for(event: Mapping[str, Any], topic: str, config: D365ToCampaignConfig) -> list[Write]:
    """The writes of an event read from ``topic`` (the contact topic or a custom entity's).

    A topic the config does not name is a runtime/config mismatch: ``Fatal``, so no event is lost.
    """
    writes: Callable[[str, Mapping[str, Any]], list[Write]] = _plan(config, compile_writes)
    return writes(topic, event)


def _topic_rows(config: D365ToCampaignConfig) -> dict[str, _Rows]:
    """Source topic → its rows' plan (the same plan objects ``writes_for`` runs)."""
    rows = {config.contact_topic: _plan(config, _contact_rows)}
    for entity in config.custom_entities:
        rows.setdefault(entity.source_topic, _plan(entity, _entity_rows))
    return rows


def filtered_out(event: Mapping[str, Any], topic: str, config: D365ToCampaignConfig) -> bool:
    """Whether the config's filters leave out an event read from ``topic`` (a delete, or a
    topic the config does not read, is never filtered)."""
    rows = _plan(config, _topic_rows).get(topic)
    after = event.get("after")
    if rows is None or event.get("op") == "d" or after is None:
        return False
    return _left_out(rows, event, after)


# -- campaign-to-d365 -------------------------------------------------------------------------


#: The epoch milliseconds a timestamp may carry: 1970-01-01 to 9999-12-31 (what ISO-8601 and
#: Dynamics' DateTime hold); outside it the record is rejected, not the workflow stopped.
EPOCH_MS_RANGE = range(0, 253_402_300_800_000)


def event_time(ts_ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds, e.g. 2024-05-01T12:00:00.250Z."""
    if ts_ms not in EPOCH_MS_RANGE:
        raise MappingError(f"ts_ms {ts_ms} is not a time between 1970 and 9999")
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def email_event_enabled(event: Mapping[str, Any], config: CampaignToD365Config) -> bool:
    """Whether the config syncs events of this one's type (a disabled type writes nothing)."""
    kind = event.get("type")
    settings = config.events.get(kind) if kind in EVENT_TYPES else None
    return settings is not None and settings.enabled


def email_event_writes(event: Mapping[str, Any], config: CampaignToD365Config) -> list[Write]:
    """An EmailEvent → the upsert of its timeline activity, keyed by the event id.

    A disabled (or unconfigured) event type writes nothing. The activity is linked to the contact
    (``contact_id`` must be a GUID); null event fields are not written.
    """
    if not email_event_enabled(event, config):
        return []
    kind: EventType = event["type"]
    settings = config.events[kind]
    event_id = event.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        raise MappingError(f"the {kind} event has no event_id")
    contact_id = event.get("contact_id")
    if not isinstance(contact_id, str) or not GUID.match(contact_id):
        raise MappingError(
            f"contact_id {contact_id!r} of event {event_id} is not a GUID: the activity cannot be "
            "linked to a Dynamics contact"
        )
    ts_ms = event.get("ts_ms")
    if not isinstance(ts_ms, int) or isinstance(ts_ms, bool):
        raise MappingError(f"ts_ms of event {event_id} is not epoch milliseconds: {ts_ms!r}")
    names = config.fields
    placeholders = {
        name: "" if event.get(name) is None else str(event.get(name))
        for name in sorted(SUBJECT_PLACEHOLDERS)
    }
    values: dict[str, Any] = {
        names.subject: config.subject_template.format(**placeholders)[:SUBJECT_MAX_LENGTH],
        names.campaign_name: event.get("campaign_name"),
        names.delivery_name: event.get("delivery_name"),
        names.event_time: event_time(ts_ms),
        names.mirror_page_url: event.get("mirror_page_url"),
    }
    if kind == "click":
        values[names.url] = event.get("url")
    if kind == "bounce":
        values[names.bounce_type] = event.get("bounce_type")
        values[names.bounce_reason] = event.get("bounce_reason")
    fields = {name: value for name, value in values.items() if value is not None}
    regarding = settings.regarding_property(names.regarding)
    fields[f"{regarding}@odata.bind"] = f"/{config.contact_entity_set}({contact_id.lower()})"
    record = SinkRecord(
        settings.entity_set, event_id, fields=fields, key_field=config.event_id_field
    )
    return [Write("d365", record)]


__all__ = [
    "MappingError",
    "Write",
    "compile_converter",
    "compile_filter",
    "contact_writes",
    "convert",
    "email_event_enabled",
    "email_event_writes",
    "entity_writes",
    "event_time",
    "filtered_out",
    "matches",
    "writes_for",
]
