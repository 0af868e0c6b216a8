"""How source events become target writes: field mappings, filters, custom entities, activities."""

from __future__ import annotations

import re
from collections.abc import Mapping
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
    FieldMapping,
    FilterGroup,
    value_key,
)
from crmsync.streams.sinks.base import ProfileLink, SinkRecord
from crmsync.targets.errors import Fatal, RecordRejected

GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
#: Dataverse's limit for an activity's subject.
SUBJECT_MAX_LENGTH = 400


@dataclass(frozen=True, slots=True)
class Write:
    """One record for one target system's sink."""

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


def _mapped(
    mappings: list[FieldMapping], after: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(fields, create_fields)``: only the source fields the event carries are written."""
    fields: dict[str, Any] = {}
    create_fields: dict[str, Any] = {}
    for mapping in mappings:
        if mapping.source in after:
            into = fields if mapping.apply_updates else create_fields
            into[mapping.target] = convert(mapping, after[mapping.source])
    return fields, create_fields


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


# -- d365-to-campaign -------------------------------------------------------------------------


def contact_writes(event: Mapping[str, Any], config: D365ToCampaignConfig) -> list[Write]:
    """A contact's ChangeEvent → the upsert or delete of its profile (externalId = contactid).

    A create/update/read writes the mapped fields the event carries (``apply_updates`` false →
    only when the profile is created); one that carries none writes nothing. A contact failing
    ``filters`` writes nothing, or deletes its profile with ``delete_when_filtered_out``. A
    delete deletes the profile when ``propagate_deletes``.
    """
    key = _key(event)

    def delete() -> list[Write]:
        record = SinkRecord(config.profile_resource, key, op="delete", key_field=PROFILE_KEY)
        return [Write("campaign", record)]

    if event.get("op") == "d":
        return delete() if config.propagate_deletes else []
    after = _after(event)
    if config.filters is not None and not matches(config.filters, _known(event, after)):
        return delete() if config.delete_when_filtered_out else []
    fields, create_fields = _mapped(config.mappings, after)
    if not fields and not create_fields:
        return []
    fields.pop(PROFILE_KEY, None)  # the record key: the client writes it on create
    create_fields.pop(PROFILE_KEY, None)
    record = SinkRecord(
        config.profile_resource,
        key,
        fields=fields,
        create_fields=create_fields,
        key_field=PROFILE_KEY,
    )
    return [Write("campaign", record)]


def entity_writes(
    event: Mapping[str, Any], entity: CustomEntity, config: D365ToCampaignConfig
) -> list[Write]:
    """A custom entity's ChangeEvent → the upsert or delete of its custom-resource row.

    The row is keyed by ``entity.key_field`` = the Dynamics record id. With a ``link``, a row is
    linked to the profile of the contact named by ``link.source_field`` (a null unlinks it); the
    sink reports ``ParentMissing`` while that profile does not exist.
    """
    key = _key(event)

    def delete() -> list[Write]:
        record = SinkRecord(entity.target, key, op="delete", key_field=entity.key_field)
        return [Write("campaign", record)]

    if event.get("op") == "d":
        return delete() if entity.propagate_deletes else []
    after = _after(event)
    if entity.filters is not None and not matches(entity.filters, _known(event, after)):
        return delete() if entity.delete_when_filtered_out else []
    fields, create_fields = _mapped(entity.mappings, after)
    link = entity.link
    if link is not None and link.source_field in after:
        contact = after[link.source_field]
        if contact is not None and (not isinstance(contact, str) or not contact):
            raise MappingError(f"{link.source_field}: not a contact id: {contact!r}")
        fields[link.target_field] = None if contact is None else ProfileLink(contact)
    if not fields and not create_fields:
        return []
    record = SinkRecord(
        entity.target, key, fields=fields, create_fields=create_fields, key_field=entity.key_field
    )
    return [Write("campaign", record)]


def writes_for(event: Mapping[str, Any], topic: str, config: D365ToCampaignConfig) -> list[Write]:
    """The writes of an event read from ``topic`` (the contact topic or a custom entity's).

    A topic the config does not name is a runtime/config mismatch: ``Fatal``, so no event is lost.
    """
    if topic == config.contact_topic:
        return contact_writes(event, config)
    for entity in config.custom_entities:
        if entity.source_topic == topic:
            return entity_writes(event, entity, config)
    raise Fatal(f"d365-to-campaign has no mapping for topic {topic!r}")


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


def email_event_writes(event: Mapping[str, Any], config: CampaignToD365Config) -> list[Write]:
    """An EmailEvent → the upsert of its timeline activity, keyed by the event id.

    A disabled (or unconfigured) event type writes nothing. The activity is linked to the contact
    (``contact_id`` must be a GUID); null event fields are not written.
    """
    kind = event.get("type")
    settings = config.events.get(kind) if kind in EVENT_TYPES else None
    if settings is None or not settings.enabled:
        return []
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
    "contact_writes",
    "convert",
    "email_event_writes",
    "entity_writes",
    "event_time",
    "matches",
    "writes_for",
]
