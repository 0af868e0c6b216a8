"""Avro codec of crmsync's events: schemas parsed once, single-object framing, schema resolution."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.validation import validate

#: The Avro spec's single-object encoding marker.
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
_HEADER_LEN = len(SINGLE_OBJECT_MAGIC) + 8


class SchemaError(Exception):
    """Base of every codec error."""


class InvalidEvent(SchemaError):
    """A record does not fit its schema; `errors` lists (field path, message) pairs."""

    def __init__(self, schema: str, errors: list[tuple[str, str]]) -> None:
        self.schema = schema
        self.errors = errors
        details = "; ".join(f"{path or '<record>'}: {message}" for path, message in errors)
        super().__init__(f"not a valid {schema}: {details}")


class DecodeError(SchemaError):
    """Bytes that cannot be read as one of our events."""


class UnknownSchema(DecodeError):
    """The bytes name a writer schema (fingerprint or registry id) that this codec does not know."""


class MalformedEvent(DecodeError):
    """The framing or the Avro body is broken."""


@dataclass(frozen=True)
class SchemaVersion:
    """One version of an event schema, parsed once."""

    name: str
    version: int
    parsed: Any
    canonical: str
    fingerprint: bytes  # CRC-64-AVRO of the parsing canonical form, little-endian as on the wire
    source: str  # the schema as written, with docs and defaults (what a registry is given)

    @classmethod
    def from_json(cls, schema: Mapping[str, Any], version: int) -> SchemaVersion:
        # parse_schema marks the result as parsed; without the mark fastavro re-parses per call
        parsed = parse_schema(dict(schema))
        canonical = to_parsing_canonical_form(parsed)
        return cls(
            name=str(schema["name"]),
            version=version,
            parsed=parsed,
            canonical=canonical,
            fingerprint=bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")),
            source=json.dumps(schema),
        )


@dataclass
class EventSchema:
    """Every known version of one event type; the newest is the reader schema."""

    name: str
    versions: list[SchemaVersion]
    _by_fingerprint: dict[bytes, SchemaVersion] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.versions:
            raise ValueError(f"{self.name}: no schema versions")
        self.versions.sort(key=lambda v: v.version)
        self._by_fingerprint = {v.fingerprint: v for v in self.versions}

    @property
    def latest(self) -> SchemaVersion:
        return self.versions[-1]

    @classmethod
    def from_versions(cls, name: str, schemas: Iterable[Mapping[str, Any]]) -> EventSchema:
        return cls(name, [SchemaVersion.from_json(s, i + 1) for i, s in enumerate(schemas)])

    @classmethod
    def packaged(cls, name: str) -> EventSchema:
        """Loads `<name>.v<N>.avsc` files shipped in this package, all versions."""
        pattern = re.compile(rf"^{re.escape(name)}\.v(\d+)\.avsc\Z")
        versions = []
        for entry in resources.files(__package__).iterdir():
            match = pattern.match(entry.name)
            if match:
                versions.append(
                    SchemaVersion.from_json(json.loads(entry.read_text()), int(match[1]))
                )
        return cls(name, versions)

    def validate(self, record: Mapping[str, Any]) -> None:
        """Raises InvalidEvent naming every field that does not fit the newest schema."""
        from fastavro.validation import ValidationError

        try:
            validate(record, self.latest.parsed, raise_errors=True, strict=True)
        except ValidationError as error:
            raise InvalidEvent(self.name, _readable(error)) from None

    def encode(self, record: Mapping[str, Any], *, validate: bool = True) -> bytes:
        """Avro single-object encoding with the newest schema.

        `validate` checks every field strictly first (slow: for records from outside); without
        it a record the writer cannot encode still raises InvalidEvent naming the field.
        """
        if validate:
            self.validate(record)
        buffer = io.BytesIO()
        buffer.write(SINGLE_OBJECT_MAGIC)
        buffer.write(self.latest.fingerprint)
        try:
            schemaless_writer(buffer, self.latest.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            self.validate(record)
            raise InvalidEvent(self.name, [("", str(error))]) from None
        return buffer.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        """Reads single-object encoded bytes of any known version into the newest schema's shape."""
        if len(data) < _HEADER_LEN or data[:2] != SINGLE_OBJECT_MAGIC:
            raise MalformedEvent(f"{self.name}: not Avro single-object encoded (no C3 01 marker)")
        writer = self._by_fingerprint.get(data[2:_HEADER_LEN])
        if writer is None:
            raise UnknownSchema(
                f"{self.name}: unknown writer schema fingerprint {data[2:_HEADER_LEN].hex()}"
            )
        return self.decode_body(data[_HEADER_LEN:], writer)

    def decode_body(self, body: bytes, writer: SchemaVersion) -> dict[str, Any]:
        buffer = io.BytesIO(body)
        reader = None if writer is self.latest else self.latest.parsed
        try:
            record = schemaless_reader(buffer, writer.parsed, reader)
        except Exception as error:  # fastavro raises many types on truncated/corrupt input
            raise MalformedEvent(f"{self.name}: corrupt Avro body: {error!r}") from None
        if buffer.tell() != len(body):
            raise MalformedEvent(f"{self.name}: {len(body) - buffer.tell()} trailing bytes")
        if not isinstance(record, dict):
            raise MalformedEvent(f"{self.name}: body is not a record")
        return record


def _readable(error: Exception) -> list[tuple[str, str]]:
    """fastavro lists one error per union branch tried; fold them into one message per field."""
    expected: dict[str, list[str]] = {}
    data: dict[str, Any] = {}
    for item in getattr(error, "errors", None) or [error]:
        path = str(getattr(item, "field", "") or "")
        path = re.sub(r"^(?:[\w.]*\.)?[A-Z]\w*\.", "", path)  # drop io.crmsync.events.Record.
        schema = getattr(item, "schema", None)
        name = schema.get("type") if isinstance(schema, dict) else schema
        expected.setdefault(path, []).append(str(name))
        data.setdefault(path, getattr(item, "datum", None))
    return [
        (path, f"{data[path]!r} is not of type {' | '.join(dict.fromkeys(types))}")
        for path, types in expected.items()
    ]


CHANGE_EVENT = EventSchema.packaged("ChangeEvent")
EMAIL_EVENT = EventSchema.packaged("EmailEvent")
