"""The three workflows' configs: validated, frozen models; field-level errors; a readable diff."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from crmsync.streams.kafka.topics import (
    CONTACT_CHANGES,
    EMAIL_EVENTS,
    PROFILE_CHANGES,
    entity_changes,
)

# -- value types ------------------------------------------------------------------------------

_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_RESOURCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*\Z")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}\Z")


def _field_name(value: str) -> str:
    if not _FIELD_NAME.match(value):
        raise ValueError(f"must be a field name (letters, digits and _), got {value!r}")
    return value


def _resource_name(value: str) -> str:
    if not _RESOURCE.match(value):
        raise ValueError(f"must be a resource name such as 'cusPurchase', got {value!r}")
    return value


#: Topic name prefixes a data topic may not have: crmsync's own topics (control, status, audit,
#: source offsets, opt-out state, dead letters) and Kafka's internal ones (__consumer_offsets).
RESERVED_TOPIC_PREFIXES = ("crmsync.", "__")


def _topic_name(value: str) -> str:
    if not _TOPIC.match(value) or value in (".", ".."):
        raise ValueError(f"must be a Kafka topic name (letters, digits, . _ -), got {value!r}")
    if value.lower().startswith(RESERVED_TOPIC_PREFIXES):
        raise ValueError(
            f"{value!r} is reserved: topics starting with 'crmsync.' are crmsync's own (control, "
            "status, audit, state, dead letters) and '__' Kafka's: a workflow reads data topics"
        )
    return value


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise PydanticCustomError(
        "scalar",
        "must be a string, number, boolean or null, got {kind}",
        {"kind": type(value).__name__},
    )


#: A field name of either API (``firstname``, ``_new_contactid_value``, ``blackListEmail``).
FieldName = Annotated[str, AfterValidator(_field_name)]
ResourceName = Annotated[str, AfterValidator(_resource_name)]
TopicName = Annotated[str, AfterValidator(_topic_name)]
#: A value as ChangeEvent carries it: null, boolean, number or string.
Scalar = Annotated[
    str | bool | int | float | None,
    PlainValidator(_scalar),
    WithJsonSchema({"type": ["string", "number", "boolean", "null"]}),
]


def value_key(value: Any) -> str:
    """How a source value is spelled as a key of ``replacements``/``picklist`` (always a string).

    Booleans are ``true``/``false``, whole numbers have no decimals (an option-set value 1 read as
    1.0 still matches ``"1"``), null is ``null``.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


Loc = list[str | int]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _problems(problems: list[tuple[Loc, str]]) -> PydanticCustomError:
    """Cross-field problems, each with its own ``loc`` (relative to the model raising them).

    ``ConfigError`` expands them into one error each; pydantic alone shows the summary.
    """
    summary = "; ".join(".".join(map(str, loc)) + f": {msg}" for loc, msg in problems)
    return PydanticCustomError(
        "config_problems", "{summary}", {"summary": summary, "problems": problems}
    )


# -- mappings and filters ---------------------------------------------------------------------


class FieldMapping(_Model):
    """One source field written to one target field, with optional value conversion.

    Conversion order: a null source value becomes ``default``; a value listed in ``replacements``
    (keyed by ``value_key``) is replaced; else with a ``picklist`` the option-set value becomes its
    label (an unknown value becomes ``default``, or the record is rejected when there is none);
    finally a string longer than ``max_length`` is cut. A source field absent from the event is
    not written at all (partial updates leave the target's value alone).
    """

    source: FieldName
    target: FieldName
    apply_updates: bool = Field(
        default=True, description="false: written only when the target record is created"
    )
    replacements: dict[str, Scalar] = Field(
        default_factory=dict, description="source value (as text) → value written instead"
    )
    picklist: dict[str, str] | None = Field(
        default=None, description="Dynamics option-set value → label, e.g. {'1': 'Preferred'}"
    )
    default: Scalar = Field(
        default=None, description="written for a null source value or an unknown picklist value"
    )
    max_length: int | None = Field(
        default=None, ge=1, description="longer strings are cut to this many characters"
    )


Op = Literal["eq", "ne", "in", "exists", "prefix"]


class Condition(_Model):
    """A test of one source field.

    ``eq``/``ne``: equal / not equal to ``value`` (compared as ``value_key`` text, so 1, 1.0 and
    "1" are equal; a missing field is null). ``in``: equal to one of ``value`` (a list).
    ``exists``: the field is present and not null (``value`` false: absent or null).
    ``prefix``: a string field starting with ``value``.
    """

    field: FieldName
    op: Op
    value: Scalar | list[Scalar] = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> Condition:
        given = "value" in self.model_fields_set
        value = self.value
        problem: str | None = None
        if self.op in ("eq", "ne") and (not given or isinstance(value, list)):
            problem = f"'{self.op}' needs one value (string, number, boolean or null)"
        elif self.op == "in" and (not isinstance(value, list) or not value):
            problem = "'in' needs a non-empty list of values"
        elif self.op == "exists" and given and not isinstance(value, bool):
            problem = "'exists' takes true (the default) or false"
        elif self.op == "prefix" and (not isinstance(value, str) or not value):
            problem = "'prefix' needs a non-empty string"
        if problem:
            raise _problems([(["value"], problem)])
        return self


def _filter_tag(value: Any) -> str:
    if isinstance(value, Mapping) and ("all" in value or "any" in value):
        return "FilterGroup"
    if isinstance(value, FilterGroup):
        return "FilterGroup"
    return "Condition"


FilterItem: TypeAlias = Annotated[
    Annotated[Condition, Tag("Condition")] | Annotated["FilterGroup", Tag("FilterGroup")],
    Discriminator(_filter_tag),
]
_TAGS = frozenset({"Condition", "FilterGroup"})


class FilterGroup(_Model):
    """Conditions and nested groups combined with AND (``all``) or OR (``any``): give one."""

    all: list[FilterItem] | None = None
    any: list[FilterItem] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> FilterGroup:
        if (self.all is None) == (self.any is None):
            raise _problems([([], "give exactly one of 'all' (AND) or 'any' (OR)")])
        items = self.all if self.all is not None else self.any
        if not items:
            raise _problems([(["all" if self.all is not None else "any"], "is empty")])
        return self


# -- d365-to-campaign -------------------------------------------------------------------------


class ProfileLinkConfig(_Model):
    """Links each custom-resource row to the Campaign profile of a Dynamics contact."""

    source_field: FieldName = Field(description="the contact GUID in the event")
    target_field: FieldName = Field(description="the custom resource's link to profile")


def _duplicate_targets(mappings: list[FieldMapping]) -> list[tuple[Loc, str]]:
    seen: dict[str, int] = {}
    problems: list[tuple[Loc, str]] = []
    for index, mapping in enumerate(mappings):
        if mapping.target in seen:
            problems.append(
                (
                    [index, "target"],
                    f"{mapping.target!r} is already written by mapping {seen[mapping.target]}",
                )
            )
        seen.setdefault(mapping.target, index)
    return problems


class CustomEntity(_Model):
    """A Dynamics custom entity synced to a Campaign custom resource, keyed by the Dynamics id."""

    logical_name: FieldName = Field(description="Dynamics logical name, e.g. new_purchase")
    topic: TopicName | None = Field(
        default=None, description="None → d365.entity.<logical_name>.changes"
    )
    resource: ResourceName = Field(description="Campaign custom resource, e.g. cusPurchase")
    key_field: FieldName = Field(description="target field holding the Dynamics record id")
    mappings: list[FieldMapping] = Field(default_factory=list)
    link: ProfileLinkConfig | None = None
    filters: FilterGroup | None = None
    propagate_deletes: bool = True
    delete_when_filtered_out: bool = False

    @property
    def source_topic(self) -> str:
        return self.topic or entity_changes(self.logical_name)

    @property
    def target(self) -> str:
        """The resource path, unless a path was given: a resource linked to the profile is served
        under ``profileAndServicesExt/<resource>`` (``customResources/`` holds unlinked ones)."""
        if "/" in self.resource:
            return self.resource
        root = "customResources" if self.link is None else "profileAndServicesExt"
        return f"{root}/{self.resource}"

    @field_validator("mappings")
    @classmethod
    def _mappings_leave_the_key_alone(
        cls, mappings: list[FieldMapping], info: ValidationInfo
    ) -> list[FieldMapping]:
        problems = _duplicate_targets(mappings)
        key_field = info.data.get("key_field")
        problems += [
            ([index, "target"], f"{key_field!r} is the key field: it always holds the record id")
            for index, mapping in enumerate(mappings)
            if mapping.target == key_field
        ]
        if problems:
            raise _problems(problems)
        return mappings

    @model_validator(mode="after")
    def _link_is_free(self) -> CustomEntity:
        link = self.link
        if link is not None and (
            link.target_field == self.key_field
            or any(m.target == link.target_field for m in self.mappings)
        ):
            raise _problems(
                [(["link", "target_field"], f"{link.target_field!r} is written already")]
            )
        return self


def default_contact_mappings() -> list[FieldMapping]:
    return [
        FieldMapping(source="contactid", target="externalId"),
        FieldMapping(source="firstname", target="firstName", max_length=30),
        FieldMapping(source="lastname", target="lastName"),
        FieldMapping(source="emailaddress1", target="email"),
        FieldMapping(source="telephone1", target="phone", max_length=32),
        FieldMapping(source="mobilephone", target="mobilePhone", max_length=32),
    ]


def default_custom_entities() -> list[CustomEntity]:
    """The emulators' ``new_purchase`` entity → ``cusPurchase``, linked to the buyer's profile."""
    return [
        CustomEntity(
            logical_name="new_purchase",
            resource="cusPurchase",
            key_field="purchaseId",
            mappings=[
                FieldMapping(source="new_product", target="product"),
                FieldMapping(source="new_amount", target="amount"),
                FieldMapping(source="new_quantity", target="quantity"),
                FieldMapping(source="new_purchasedon", target="purchasedOn"),
            ],
            link=ProfileLinkConfig(source_field="_new_contactid_value", target_field="profile"),
        )
    ]


PROFILE_KEY = "externalId"


class D365ToCampaignConfig(_Model):
    """Dynamics contacts and custom entities → Campaign profiles (by externalId) and resources."""

    mappings: list[FieldMapping] = Field(default_factory=default_contact_mappings)
    filters: FilterGroup | None = Field(
        default=None, description="contacts not matching are not synced"
    )
    propagate_deletes: bool = True
    delete_when_filtered_out: bool = Field(
        default=False, description="delete the profile of a contact that no longer matches"
    )
    custom_entities: list[CustomEntity] = Field(default_factory=default_custom_entities)
    profile_resource: ResourceName = "profileAndServicesExt/profile"
    contact_topic: TopicName = CONTACT_CHANGES

    def source_topics(self) -> list[str]:
        return [self.contact_topic, *(e.source_topic for e in self.custom_entities)]

    @field_validator("mappings")
    @classmethod
    def _profile_mappings(cls, mappings: list[FieldMapping]) -> list[FieldMapping]:
        problems = _duplicate_targets(mappings)
        for index, mapping in enumerate(mappings):
            if mapping.target == PROFILE_KEY and mapping.source != "contactid":
                problems.append(
                    (
                        [index, "source"],
                        "externalId is the profile's key, the Dynamics contactid: it can only be "
                        "mapped from 'contactid'",
                    )
                )
        if problems:
            raise _problems(problems)
        return mappings

    @field_validator("custom_entities")
    @classmethod
    def _distinct_entities(cls, entities: list[CustomEntity]) -> list[CustomEntity]:
        problems: list[tuple[Loc, str]] = []
        names: set[str] = set()
        topics: dict[str, str] = {}
        for index, entity in enumerate(entities):
            if entity.logical_name in names:
                problems.append(([index, "logical_name"], "is configured twice"))
            names.add(entity.logical_name)
            if entity.source_topic in topics:
                problems.append(
                    ([index, "topic"], f"{entity.source_topic!r} is {topics[entity.source_topic]}")
                )
            topics.setdefault(entity.source_topic, f"the topic of {entity.logical_name} already")
        if problems:
            raise _problems(problems)
        return entities

    @model_validator(mode="after")
    def _topics_differ(self) -> D365ToCampaignConfig:
        problems: list[tuple[Loc, str]] = [
            (["custom_entities", index, "topic"], f"{self.contact_topic!r} is the contact topic")
            for index, entity in enumerate(self.custom_entities)
            if entity.source_topic == self.contact_topic
        ]
        if problems:
            raise _problems(problems)
        return self


# -- campaign-to-d365 -------------------------------------------------------------------------

EventType = Literal["send", "open", "click", "bounce"]
EVENT_TYPES: tuple[EventType, ...] = ("send", "open", "click", "bounce")
DEFAULT_ENTITY_SETS: Mapping[str, str] = {
    "send": "crmsync_emailsends",
    "open": "crmsync_emailopens",
    "click": "crmsync_emailclicks",
    "bounce": "crmsync_emailbounces",
}
#: What ``subject_template`` may name: the EmailEvent fields a subject can sensibly show.
SUBJECT_PLACEHOLDERS = frozenset(
    {
        "event_id",
        "type",
        "contact_id",
        "email",
        "campaign_id",
        "campaign_name",
        "delivery_id",
        "delivery_name",
    }
)


class EventTypeConfig(_Model):
    enabled: bool = True
    entity_set: FieldName = Field(description="the activity's entity set, e.g. crmsync_emailsends")
    logical_name: FieldName | None = Field(
        default=None,
        description="the activity table's logical name; None → the entity set without its "
        "plural 's' (crmsync_emailsends → crmsync_emailsend)",
    )
    regarding: FieldName | None = Field(
        default=None,
        description="the activity's regarding navigation property to the contact; None → "
        "fields.regarding, else regardingobjectid_contact_<logical name> (Dataverse names it "
        "per activity table: regardingobjectid_contact_task, ..._email)",
    )

    @property
    def table(self) -> str:
        """The activity table's logical name."""
        if self.logical_name:
            return self.logical_name
        return self.entity_set[:-1] if self.entity_set.endswith("s") else self.entity_set

    def regarding_property(self, shared: str | None) -> str:
        """The navigation property an activity of this type binds its contact through."""
        return self.regarding or shared or f"regardingobjectid_contact_{self.table}"


class ActivityFields(_Model):
    """Column names of the email-event activities (the vendor's are not published)."""

    subject: FieldName = "subject"
    campaign_name: FieldName = "crmsync_campaignname"
    delivery_name: FieldName = "crmsync_deliveryname"
    event_time: FieldName = "crmsync_eventtime"
    mirror_page_url: FieldName = "crmsync_mirrorpageurl"
    url: FieldName = Field(default="crmsync_url", description="click events only")
    bounce_type: FieldName = Field(default="crmsync_bouncetype", description="bounces only")
    bounce_reason: FieldName = Field(default="crmsync_bouncereason", description="bounces only")
    regarding: FieldName | None = Field(
        default=None,
        description="navigation property to the contact for every event type; None → per "
        "table, regardingobjectid_contact_<logical name> (see events.<type>.regarding)",
    )


def _default_events() -> dict[EventType, EventTypeConfig]:
    return {t: EventTypeConfig(entity_set=DEFAULT_ENTITY_SETS[t]) for t in EVENT_TYPES}


def _check_template(template: str) -> str:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"is not a valid template: {error}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in SUBJECT_PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in sorted(SUBJECT_PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {{{name}}}; known: {known}")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} takes no format or conversion")
    return template


class CampaignToD365Config(_Model):
    """Campaign email events → Dynamics timeline activities, upserted by event id."""

    events: dict[EventType, EventTypeConfig] = Field(default_factory=_default_events)
    event_id_field: FieldName = Field(
        default="crmsync_eventid", description="alternate key of the activities: the event id"
    )
    contact_entity_set: FieldName = "contacts"
    subject_template: Annotated[str, AfterValidator(_check_template)] = (
        "{campaign_id} / {delivery_id}"
    )
    fields: ActivityFields = Field(default_factory=ActivityFields)
    email_topic: TopicName = EMAIL_EVENTS

    @model_validator(mode="before")
    @classmethod
    def _fill_event_types(cls, data: Any) -> Any:
        # A config naming only some event types (or only `enabled`) keeps the defaults of the rest.
        if isinstance(data, Mapping) and isinstance(data.get("events"), Mapping):
            given_events = data["events"]
            events: dict[Any, Any] = {}
            for name in EVENT_TYPES:  # in the canonical order, so dumps and diffs are stable
                given = given_events.get(name, {})
                if isinstance(given, Mapping):
                    given = {"entity_set": DEFAULT_ENTITY_SETS[name], **given}
                events[name] = given
            events.update({k: v for k, v in given_events.items() if k not in events})
            data = {**data, "events": events}
        return data

    def source_topics(self) -> list[str]:
        return [self.email_topic]


# -- opt-in-out -------------------------------------------------------------------------------

Direction = Literal["disabled", "d365-to-campaign", "campaign-to-d365", "bidirectional"]


class OptInOutConfig(_Model):
    """A Dynamics boolean ↔ a Campaign boolean: newest change wins, opt-out wins a tie."""

    direction: Direction = "bidirectional"
    d365_field: FieldName = "donotbulkemail"
    campaign_field: FieldName = Field(
        default="blackListEmail", description="blackListEmail and denyListEmail are one field"
    )
    contact_entity_set: FieldName = "contacts"
    profile_resource: ResourceName = "profileAndServicesExt/profile"
    contact_topic: TopicName = CONTACT_CHANGES
    profile_topic: TopicName = PROFILE_CHANGES
    ignore_users: list[str] = Field(
        default_factory=list,
        description="source users whose changes are never synced (the integration's own accounts)",
    )

    def source_topics(self) -> list[str]:
        """Both inputs, whatever the direction (also ``disabled``).

        Excluded changes are consumed and dropped (``decide`` says "direction excludes"), so the
        backlog stays meaningful and enabling a direction later syncs changes from then on,
        instead of replaying every flip made while it was off.
        """
        return [self.contact_topic, self.profile_topic]

    def syncs(self, side: Literal["d365", "campaign"]) -> bool:
        """Whether changes made on ``side`` are written to the other side."""
        if side == "d365":
            return self.direction in ("d365-to-campaign", "bidirectional")
        return self.direction in ("campaign-to-d365", "bidirectional")

    @model_validator(mode="after")
    def _distinct_topics(self) -> OptInOutConfig:
        if self.contact_topic == self.profile_topic:
            raise _problems([(["profile_topic"], "must differ from contact_topic")])
        return self


# -- what every workflow config shares ---------------------------------------------------------

WorkflowConfig: TypeAlias = D365ToCampaignConfig | CampaignToD365Config | OptInOutConfig


class ConfigError(ValueError):
    """An invalid config; ``errors`` = ``[{"loc": [...], "msg": "..."}]`` (the API's 422 body)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(".".join(map(str, e["loc"])) + f": {e['msg']}" for e in errors))

    @classmethod
    def from_validation(cls, error: ValidationError) -> ConfigError:
        errors: list[dict[str, Any]] = []
        bad_keys: list[Loc] = []
        for item in error.errors():
            loc: Loc = [part for part in item["loc"] if part not in _TAGS]
            if item["type"] == "config_problems":
                for sub_loc, msg in item["ctx"]["problems"]:
                    errors.append({"loc": [*loc, *sub_loc], "msg": msg})
                continue
            if loc and loc[-1] == "[key]":
                # An unknown dict key (an event type): report the key, not its value's errors too.
                loc = loc[:-1]
                bad_keys.append(loc)
                errors.append({"loc": loc, "msg": f"unknown key {loc[-1]!r}: {_message(item)}"})
                continue
            errors.append({"loc": loc, "msg": _message(item)})
        errors = [
            e
            for e in errors
            if not any(
                e["loc"][: len(k)] == k and not e["msg"].startswith("unknown key ")
                for k in bad_keys
            )
        ]
        return cls(errors)


def _message(item: Mapping[str, Any]) -> str:
    kind, msg = item["type"], str(item["msg"])
    if kind == "extra_forbidden":
        return "unknown field (misspelt?)"
    if kind == "missing":
        return "is required"
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def redacted(config: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """The config as JSON-ready data, every secret shown as ``"**********"``.

    No config holds a secret today (a ``SecretStr`` field added later dumps masked); the control
    plane returns configs only through this.
    """
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return dict(config)


_MISSING: Any = object()


def config_diff(
    active: BaseModel | Mapping[str, Any] | None, pending: BaseModel | Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """What changes from ``active`` to ``pending``: ``[{"path", "active", "pending"}]``.

    Paths read like ``mappings[2].target`` or ``events.click.enabled``; a value absent on one
    side shows as null. Lists are compared item by item; nested objects are walked, so a changed
    mapping shows only its changed fields.
    """
    changes: list[dict[str, Any]] = []
    _walk(_plain(active), _plain(pending), "", changes)
    return changes


def _plain(config: BaseModel | Mapping[str, Any] | None) -> Any:
    if config is None:
        return {}
    return redacted(config)


def _walk(old: Any, new: Any, path: str, out: list[dict[str, Any]]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            child = f"{path}.{key}" if path else str(key)
            _walk(old.get(key, _MISSING), new.get(key, _MISSING), child, out)
        return
    if isinstance(old, list) and isinstance(new, list):
        for index in range(max(len(old), len(new))):
            _walk(
                old[index] if index < len(old) else _MISSING,
                new[index] if index < len(new) else _MISSING,
                f"{path}[{index}]",
                out,
            )
        return
    if old != new or type(old) is not type(new):
        out.append(
            {
                "path": path,
                "active": None if old is _MISSING else old,
                "pending": None if new is _MISSING else new,
            }
        )


__all__ = [
    "ActivityFields",
    "CampaignToD365Config",
    "Condition",
    "ConfigError",
    "CustomEntity",
    "D365ToCampaignConfig",
    "EventTypeConfig",
    "FieldMapping",
    "FilterGroup",
    "OptInOutConfig",
    "ProfileLinkConfig",
    "WorkflowConfig",
    "config_diff",
    "redacted",
    "value_key",
]
