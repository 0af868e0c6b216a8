"""`crmsync publish`: validate JSON Lines and publish them as Avro events, all or nothing."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT, EventSchema, InvalidEvent
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.events import change_event

_LONG = range(-(2**63), 2**63)


@dataclass(frozen=True)
class FieldRule:
    kind: Literal["string", "boolean", "guid", "datetime"]
    max_length: int | None = None


@dataclass(frozen=True)
class Stream:
    """What `crmsync publish <stream>` publishes: its topic, entity, key field and known fields."""

    name: str
    topic: str
    entity: str
    key_field: str
    system: str
    timestamp_field: str | None = None
    fields: Mapping[str, FieldRule] = field(default_factory=dict)
    email: bool = False


_CONTACT_FIELDS = {
    "contactid": FieldRule("guid"),
    "firstname": FieldRule("string", 50),
    "lastname": FieldRule("string", 50),
    "emailaddress1": FieldRule("string", 100),
    "donotbulkemail": FieldRule("boolean"),
    "donotemail": FieldRule("boolean"),
    "modifiedon": FieldRule("datetime"),
}
_PROFILE_FIELDS = {
    "externalId": FieldRule("string", 100),
    "email": FieldRule("string", 128),
    "firstName": FieldRule("string", 30),
    "lastName": FieldRule("string", 50),
    "blackList": FieldRule("boolean"),
    "blackListEmail": FieldRule("boolean"),
    "denyList": FieldRule("boolean"),
    "denyListEmail": FieldRule("boolean"),
    "lastModified": FieldRule("datetime"),
}
STREAMS = {
    "d365-contacts": Stream(
        "d365-contacts",
        topics.CONTACT_CHANGES,
        "contact",
        "contactid",
        "d365",
        "modifiedon",
        _CONTACT_FIELDS,
    ),
    "campaign-profiles": Stream(
        "campaign-profiles",
        topics.PROFILE_CHANGES,
        "profile",
        "externalId",
        "campaign",
        "lastModified",
        _PROFILE_FIELDS,
    ),
    "campaign-email-events": Stream(
        "campaign-email-events",
        topics.EMAIL_EVENTS,
        "email_event",
        "contact_id",
        "campaign",
        email=True,
    ),
}
_ENTITY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")


class UnknownStream(ValueError):
    """The stream name is not one `crmsync publish` knows."""


def stream(name: str) -> Stream:
    if name.startswith("d365-entity:"):
        logical = name.removeprefix("d365-entity:")
        if not _ENTITY_NAME.match(logical):
            raise UnknownStream(
                f"{name!r}: a Dynamics logical name is lower case letters, digits and _"
            )
        id_field = f"{logical}id"
        return Stream(
            name,
            topics.entity_changes(logical),
            logical,
            id_field,
            "d365",
            "modifiedon",
            {id_field: FieldRule("guid"), "modifiedon": FieldRule("datetime")},
        )
    if name not in STREAMS:
        known = ", ".join([*STREAMS, "d365-entity:<logicalname>"])
        raise UnknownStream(f"unknown stream {name!r}; streams: {known}")
    return STREAMS[name]


class _EmailEventLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    event_id: str = Field(min_length=1, max_length=200)
    type: Literal["send", "open", "click", "bounce"]
    ts_ms: int = Field(ge=0, lt=2**63)
    contact_id: str = Field(min_length=1, max_length=100)
    email: str | None = Field(default=None, max_length=128)
    campaign_id: str | None = None
    campaign_name: str | None = None
    delivery_id: str | None = None
    delivery_name: str | None = None
    mirror_page_url: str | None = None
    url: str | None = None
    bounce_type: str | None = None
    bounce_reason: str | None = None


@dataclass(frozen=True)
class LineError:
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return (
            f"line {self.line}: {self.field}: {self.message}"
            if self.field
            else (f"line {self.line}: {self.message}")
        )


@dataclass(frozen=True)
class Prepared:
    """One validated line, encoded and ready to send."""

    line: int
    key: str
    value: bytes


class _Invalid(Exception):
    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors


def prepare(
    spec: Stream, lines: Iterable[str], now_ms: Callable[[], int] | None = None
) -> tuple[list[Prepared], list[LineError]]:
    """Validates and encodes every line; blank lines are skipped."""
    clock = now_ms or (lambda: int(time.time() * 1000))
    prepared: list[Prepared] = []
    errors: list[LineError] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as error:
                raise _Invalid(
                    [("", f"not valid JSON: {error.msg} at column {error.colno}")]
                ) from None
            if not isinstance(obj, dict):
                raise _Invalid([("", "a line must be a JSON object")])
            if spec.email:
                key, value = _email_event(obj)
            else:
                key, value = _change(spec, obj, clock)
        except _Invalid as invalid:
            errors.extend(LineError(number, path, message) for path, message in invalid.errors)
        else:
            prepared.append(Prepared(number, key, value))
    return prepared, errors


def _email_event(obj: dict[str, Any]) -> tuple[str, bytes]:
    try:
        event = _EmailEventLine.model_validate(obj)
    except ValidationError as error:
        raise _Invalid(
            [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in error.errors()]
        ) from None
    record = event.model_dump()
    return event.contact_id, _encode(EMAIL_EVENT, record)


_ENVELOPE_KEYS = {"op", "key", "after", "before", "source_ts_ms", "source_user", "source_txid"}


def _change(spec: Stream, obj: dict[str, Any], clock: Callable[[], int]) -> tuple[str, bytes]:
    problems: list[tuple[str, str]] = []
    if "op" in obj:  # an envelope
        unknown = set(obj) - _ENVELOPE_KEYS
        if unknown:
            problems.append(
                (
                    sorted(unknown)[0],
                    "unknown envelope key; an envelope has " + ", ".join(sorted(_ENVELOPE_KEYS)),
                )
            )
        op = obj["op"]
        if op not in ("c", "u", "d"):
            problems.append(("op", 'must be "c", "u" or "d"'))
        after = _record(spec, obj.get("after"), "after", problems, required=op != "d")
        before = _record(spec, obj.get("before"), "before", problems, required=False)
        key = obj.get("key")
        if key is None and after is not None:
            key = after.get(spec.key_field)
        if key is None:
            problems.append(("key", f"missing: give key or after.{spec.key_field}"))
        else:
            _check_key(spec, key, "key", problems)
            if after is not None and after.get(spec.key_field) not in (None, key):
                problems.append((f"after.{spec.key_field}", "differs from key"))
        source_ts = obj.get("source_ts_ms")
        if source_ts is not None and (
            not isinstance(source_ts, int) or isinstance(source_ts, bool) or source_ts < 0
        ):
            problems.append(("source_ts_ms", "must be epoch milliseconds (a whole number ≥ 0)"))
        user, txid = obj.get("source_user"), obj.get("source_txid")
        for name, value in (("source_user", user), ("source_txid", txid)):
            if value is not None and not isinstance(value, str):
                problems.append((name, "must be a string"))
    else:  # a plain record: an upsert
        op, before, user, txid, source_ts = "u", None, None, None, None
        after = _record(spec, obj, "", problems, required=True)
        key = obj.get(spec.key_field)
        if key is None:
            problems.append((spec.key_field, "missing: the record's key field is required"))
        else:
            _check_key(spec, key, spec.key_field, problems)
    if problems:
        raise _Invalid(list(dict.fromkeys(problems)))
    if source_ts is None:
        stamp = (after or {}).get(spec.timestamp_field) if spec.timestamp_field else None
        source_ts = _epoch_ms(stamp) if isinstance(stamp, str) else clock()
    event = change_event(
        op,
        spec.entity,
        str(key),
        after=after,
        before=before,
        system=spec.system,
        source_ts_ms=source_ts,
        user=user,
        txid=txid,
    )
    return str(key), _encode(CHANGE_EVENT, event)


def _record(
    spec: Stream, value: Any, where: str, problems: list[tuple[str, str]], *, required: bool
) -> dict[str, Any] | None:
    if value is None:
        if required:
            problems.append((where or "<record>", "missing: an object of fields is required"))
        return None
    if not isinstance(value, dict):
        problems.append((where or "<record>", "must be an object of fields"))
        return None
    prefix = f"{where}." if where else ""
    for name, item in value.items():
        path = prefix + name
        if isinstance(item, dict | list):
            problems.append((path, "nested values are not supported: use a scalar"))
            continue
        if isinstance(item, int) and not isinstance(item, bool) and item not in _LONG:
            problems.append((path, "whole number out of the 64-bit range"))
            continue
        rule = spec.fields.get(name)
        if rule is not None and item is not None:
            message = _check(rule, item)
            if message:
                problems.append((path, message))
    return value


def _check(rule: FieldRule, value: Any) -> str | None:
    if rule.kind == "boolean":
        return None if isinstance(value, bool) else "must be true or false"
    if not isinstance(value, str):
        return "must be a string"
    if rule.kind == "guid":
        try:
            uuid.UUID(value)
        except ValueError:
            return "must be a GUID"
    if rule.kind == "datetime":
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return "must be an ISO-8601 time"
    if rule.max_length is not None and len(value) > rule.max_length:
        return f"longer than {rule.max_length} characters"
    return None


def _check_key(spec: Stream, key: Any, path: str, problems: list[tuple[str, str]]) -> None:
    if not isinstance(key, str) or not key:
        problems.append((path, "must be a non-empty string"))
        return
    rule = spec.fields.get(spec.key_field)
    message = _check(rule, key) if rule else None
    if message:
        problems.append((path, message))


def _epoch_ms(text: str) -> int:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(parsed.timestamp() * 1000)


def _encode(schema: EventSchema, record: dict[str, Any]) -> bytes:
    try:
        return schema.encode(record, validate=False)  # the checks above are stricter and clearer
    except InvalidEvent as error:  # a bug in the checks above if it happens: still say where
        raise _Invalid(error.errors) from None


async def send(
    kafka: KafkaClients | str,
    spec: Stream,
    events: list[Prepared],
    *,
    partitions: int,
    on_sent: Callable[[int], None] | None = None,
    registry_url: str | None = None,
) -> None:
    """Creates the stream's topic if needed, then sends every event and waits for Kafka's acks."""
    import asyncio

    from crmsync.streams.kafka.events import EventProducer

    await topics.ensure_topics(kafka, [topics.TopicSpec(spec.topic, partitions)])
    schema = EMAIL_EVENT if spec.email else CHANGE_EVENT
    async with EventProducer(kafka, registry_url=registry_url) as producer:
        window = 2000  # futures in flight: bounded memory, the producer still batches
        pending: list[asyncio.Future[Any]] = []
        for event in events:
            value = event.value
            if registry_url:  # Confluent framing: the same record, with a registered schema id
                value = await producer.encode(schema, spec.topic, schema.decode(value))
            pending.append(await producer.send_encoded(spec.topic, event.key, value, wait=False))
            if len(pending) >= window:
                await asyncio.gather(*pending)
                if on_sent:
                    on_sent(len(pending))
                pending.clear()
        await asyncio.gather(*pending)
        if on_sent:
            on_sent(len(pending))
