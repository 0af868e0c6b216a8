"""Entity sets (Dynamics) and resources (Campaign) the emulators serve, and value checks."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FieldType(StrEnum):
    STRING = "string"
    BOOL = "bool"
    INT = "int"
    DECIMAL = "decimal"
    DATETIME = "datetime"
    GUID = "guid"
    LOOKUP = "lookup"  # Dynamics: written as `<bind>@odata.bind`, read as `_<x>_value`
    LINK = "link"  # Campaign: {"PKey": "..."} pointing at another resource


class Problem(StrEnum):
    UNKNOWN = "unknown"
    READ_ONLY = "read_only"
    TYPE = "type"
    TOO_LONG = "too_long"


class InvalidValue(Exception):
    """A property a real API would refuse."""

    def __init__(self, problem: Problem, name: str, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.name = name
        self.detail = detail


class FieldDef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    type: FieldType
    max_length: int | None = Field(default=None, ge=1)
    precision: int | None = Field(default=None, ge=0, le=10, description="decimal places")
    read_only: bool = False
    target: str | None = Field(default=None, description="lookup/link: the set or resource")
    bind: str | None = Field(default=None, description="lookup: navigation property name")
    aliases: tuple[str, ...] = Field(default=(), description="other accepted names")
    extension: bool = Field(default=False, description="Campaign: only in profileAndServicesExt")

    def coerce(self, value: Any, datetime_format: str) -> Any:
        """The stored form of a JSON value for this field, or InvalidValue."""
        if value is None:
            return None
        t = self.type
        if t is FieldType.STRING:
            if not isinstance(value, str):
                raise self._wrong(value, "Edm.String")
            if self.max_length is not None and len(value) > self.max_length:
                raise InvalidValue(
                    Problem.TOO_LONG,
                    self.name,
                    f"The length of the '{self.name}' attribute exceeded the maximum allowed "
                    f"length of '{self.max_length}'.",
                )
            return value
        if t is FieldType.BOOL:
            if not isinstance(value, bool):
                raise self._wrong(value, "Edm.Boolean")
            return value
        if t is FieldType.INT:
            if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**31:
                raise self._wrong(value, "Edm.Int32")
            return value
        if t is FieldType.DECIMAL:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self._wrong(value, "Edm.Decimal")
            return value
        if t is FieldType.DATETIME:
            moment = parse_datetime(value)
            if moment is None:
                raise self._wrong(value, "Edm.DateTimeOffset")
            return format_datetime(moment, datetime_format)
        if t in (FieldType.GUID, FieldType.LOOKUP):
            guid = parse_guid(value)
            if guid is None:
                raise self._wrong(value, "Edm.Guid")
            return guid
        raise self._wrong(value, t.value)

    def _wrong(self, value: Any, edm: str) -> InvalidValue:
        shown = str(value)[:100]
        return InvalidValue(
            Problem.TYPE,
            self.name,
            f"Cannot convert the literal '{shown}' to the expected type '{edm}' "
            f"of property '{self.name}'.",
        )


def _random_guids() -> Iterator[str]:
    """Version 4 GUIDs as `uuid.uuid4` makes them, the randomness read for 256 at a time: a bulk
    call of hundreds of new records makes one system call, not one per record."""
    while True:
        pool = os.urandom(16 * 256)
        for at in range(0, len(pool), 16):
            yield str(uuid.UUID(bytes=pool[at : at + 16], version=4))


_GUIDS = _random_guids()


def new_guid() -> str:
    """A new record's id."""
    return next(_GUIDS)


def parse_guid(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) not in (32, 36, 38):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def parse_datetime(value: Any) -> datetime | None:
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        return None
    try:
        moment = datetime.fromisoformat(value.replace(" ", "T", 1))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


DYNAMICS_DATETIME = "%Y-%m-%dT%H:%M:%SZ"
CAMPAIGN_DATETIME = "%Y-%m-%d %H:%M:%S.%fZ"


def format_datetime(moment: datetime, fmt: str) -> str:
    text = moment.strftime(fmt)
    # Campaign shows milliseconds, strftime only knows microseconds.
    return text[:-4] + "Z" if fmt == CAMPAIGN_DATETIME else text


_second_text: dict[str, tuple[int, str]] = {}  # fmt → (the second, its text), for whole seconds


def now_text(fmt: str) -> str:
    if fmt != DYNAMICS_DATETIME:
        return format_datetime(datetime.now(UTC), fmt)
    # A bulk call stamps hundreds of records within the same second: format each second once.
    second = int(time.time())
    cached = _second_text.get(fmt)
    if cached is None or cached[0] != second:
        cached = (second, format_datetime(datetime.fromtimestamp(second, UTC), fmt))
        _second_text[fmt] = cached
    return cached[1]


class EntitySet(BaseModel):
    """One Dataverse table as the Web API exposes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="entity set name in URLs, e.g. contacts")
    logical_name: str = Field(description="e.g. contact")
    primary_id: str
    fields: tuple[FieldDef, ...]
    alternate_keys: tuple[tuple[str, ...], ...] = ()
    change_tracking: bool = True

    @cached_property
    def by_name(self) -> dict[str, FieldDef]:
        return {f.name: f for f in self.fields}

    @cached_property
    def by_bind(self) -> dict[str, FieldDef]:
        return {f.bind: f for f in self.fields if f.type is FieldType.LOOKUP and f.bind}


def _maintained_dynamics_fields() -> tuple[FieldDef, ...]:
    return (
        FieldDef(name="createdon", type=FieldType.DATETIME, read_only=True),
        FieldDef(name="modifiedon", type=FieldType.DATETIME, read_only=True),
        FieldDef(name="_modifiedby_value", type=FieldType.GUID, read_only=True),
    )


def _s(name: str, max_length: int) -> FieldDef:
    return FieldDef(name=name, type=FieldType.STRING, max_length=max_length)


def default_entity_sets() -> list[EntitySet]:
    """The tables of a fresh Dataverse org as the emulator starts them."""
    contacts = EntitySet(
        name="contacts",
        logical_name="contact",
        primary_id="contactid",
        fields=(
            FieldDef(name="contactid", type=FieldType.GUID),
            _s("firstname", 50),
            _s("lastname", 50),
            FieldDef(name="fullname", type=FieldType.STRING, max_length=160, read_only=True),
            _s("emailaddress1", 100),
            _s("telephone1", 50),
            _s("mobilephone", 50),
            _s("jobtitle", 100),
            _s("address1_city", 80),
            _s("address1_country", 80),
            FieldDef(name="donotbulkemail", type=FieldType.BOOL),
            FieldDef(name="donotemail", type=FieldType.BOOL),
            *_maintained_dynamics_fields(),
        ),
    )
    purchases = EntitySet(
        name="new_purchases",
        logical_name="new_purchase",
        primary_id="new_purchaseid",
        fields=(
            FieldDef(name="new_purchaseid", type=FieldType.GUID),
            _s("new_name", 100),
            _s("new_ordernumber", 100),
            _s("new_product", 200),
            FieldDef(name="new_amount", type=FieldType.DECIMAL),
            FieldDef(name="new_quantity", type=FieldType.INT),
            FieldDef(name="new_purchasedon", type=FieldType.DATETIME),
            FieldDef(
                name="_new_contactid_value",
                type=FieldType.LOOKUP,
                target="contacts",
                bind="new_ContactId",
            ),
            *_maintained_dynamics_fields(),
        ),
        alternate_keys=(("new_name",), ("new_ordernumber", "new_product")),
    )
    # A fresh org: its standard tables plus a customer's own (new_purchase, made by its admin).
    # crmsync's activity tables are not here: `crmsync targets setup d365` creates them through
    # the metadata endpoints, as on a real org.
    return [contacts, purchases]


class Resource(BaseModel):
    """One Campaign resource: the profile or a custom resource."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="e.g. profile, cusPurchase")
    fields: tuple[FieldDef, ...]
    key: str | None = Field(default=None, description="unique business key → by<Key> filter")
    filters: dict[str, tuple[str, str]] = Field(
        default_factory=dict, description="filter name → (field, query parameter)"
    )

    @cached_property
    def by_name(self) -> dict[str, FieldDef]:
        names: dict[str, FieldDef] = {}
        for f in self.fields:
            names[f.name] = f
            names.update(dict.fromkeys(f.aliases, f))
        return names

    @property
    def linked_to_profile(self) -> bool:
        """Served under ``profileAndServicesExt/<name>`` (else under ``customResources/``)."""
        return any(f.type is FieldType.LINK and f.target == "profile" for f in self.fields)

    def key_filter(self) -> tuple[str, tuple[str, str]] | None:
        if self.key is None:
            return None
        return f"by{self.key[0].upper()}{self.key[1:]}", (self.key, f"{self.key}_parameter")

    def all_filters(self) -> dict[str, tuple[str, str]]:
        found = dict(self.filters)
        key_filter = self.key_filter()
        if key_filter:
            found.setdefault(*key_filter)
        return found


def _maintained_campaign_fields() -> tuple[FieldDef, ...]:
    return (
        FieldDef(name="created", type=FieldType.DATETIME, read_only=True),
        FieldDef(name="lastModified", type=FieldType.DATETIME, read_only=True),
    )


# The query parameter of the custom filter .../profile/byExternalId?externalId_parameter=...
EXTERNAL_ID_PARAMETER = "externalId_parameter"


def default_resources() -> list[Resource]:
    profile = Resource(
        name="profile",
        fields=(
            FieldDef(name="email", type=FieldType.STRING, max_length=128),
            FieldDef(name="firstName", type=FieldType.STRING, max_length=30),
            FieldDef(name="lastName", type=FieldType.STRING, max_length=50),
            FieldDef(name="externalId", type=FieldType.STRING, max_length=100),
            FieldDef(name="phone", type=FieldType.STRING, max_length=32),
            FieldDef(name="mobilePhone", type=FieldType.STRING, max_length=32),
            FieldDef(name="blackList", type=FieldType.BOOL),
            FieldDef(name="blackListEmail", type=FieldType.BOOL),
            FieldDef(name="cusCrmId", type=FieldType.STRING, max_length=36, extension=True),
            *_maintained_campaign_fields(),
        ),
        filters={
            "byEmail": ("email", "email"),
            "byExternalId": ("externalId", EXTERNAL_ID_PARAMETER),
        },
    )
    purchase = Resource(
        name="cusPurchase",
        key="purchaseId",
        fields=(
            FieldDef(name="purchaseId", type=FieldType.STRING, max_length=64),
            FieldDef(name="product", type=FieldType.STRING, max_length=255),
            FieldDef(name="amount", type=FieldType.DECIMAL),
            FieldDef(name="quantity", type=FieldType.INT),
            FieldDef(name="purchasedOn", type=FieldType.DATETIME),
            FieldDef(name="profile", type=FieldType.LINK, target="profile"),
            *_maintained_campaign_fields(),
        ),
    )
    return [profile, purchase]


class DynamicsModelFile(BaseModel):
    """JSON file adding or replacing entity sets: {"entity_sets": [...]}."""

    model_config = ConfigDict(extra="forbid")
    entity_sets: list[EntitySet] = Field(default_factory=list)


class CampaignModelFile(BaseModel):
    """JSON file adding or replacing resources: {"resources": [...]}."""

    model_config = ConfigDict(extra="forbid")
    resources: list[Resource] = Field(default_factory=list)


def dynamics_model(
    path: Path | None = None, extra: list[EntitySet] | None = None
) -> dict[str, EntitySet]:
    sets = {s.name: s for s in default_entity_sets()}
    if path is not None:
        sets.update(
            {s.name: s for s in DynamicsModelFile.model_validate_json(path.read_text()).entity_sets}
        )
    sets.update({s.name: s for s in extra or []})
    return sets


def campaign_model(
    path: Path | None = None, extra: list[Resource] | None = None
) -> dict[str, Resource]:
    resources = {r.name: r for r in default_resources()}
    if path is not None:
        loaded = CampaignModelFile.model_validate_json(path.read_text()).resources
        resources.update({r.name: r for r in loaded})
    resources.update({r.name: r for r in extra or []})
    return resources
