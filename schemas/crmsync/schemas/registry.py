"""Confluent framing against a schema registry: the option beside single-object encoding.

Confluent-framed bytes are `00` + the writer schema's registry id (4 bytes, big-endian) + the Avro
body. Producers register the newest schema under a subject (`<topic>-value`); consumers fetch a
writer schema by id once and keep it. Decoding resolves into the newest packaged schema, so a
registry-framed record reads like a single-object one.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
from typing import Any

import httpx
from fastavro import schemaless_writer

from .codec import SINGLE_OBJECT_MAGIC, EventSchema, MalformedEvent, SchemaVersion, UnknownSchema

CONFLUENT_MAGIC = b"\x00"
_HEADER = struct.Struct(">bI")


class RegistryError(Exception):
    """The schema registry refused a request (e.g. no schema with that id)."""


class RegistryUnavailable(RegistryError):
    """The schema registry could not answer now (unreachable, 429, 5xx): try again later."""


class SchemaRegistry:
    """A client of the Confluent Schema Registry REST API (register, fetch by id), cached."""

    def __init__(self, url: str, *, timeout_s: float = 10.0, **httpx_options: Any) -> None:
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=timeout_s,
            headers={"Accept": "application/vnd.schemaregistry.v1+json"},
            **httpx_options,
        )
        self._by_id: dict[int, dict[str, Any]] = {}
        self._ids: dict[tuple[str, str], int] = {}
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def register(self, subject: str, schema: SchemaVersion) -> int:
        """The id of `schema` under `subject`, registering it when new (idempotent)."""
        key = (subject, schema.canonical)
        if key not in self._ids:
            body = {"schema": schema.source}
            data = await self._call("POST", f"/subjects/{subject}/versions", json=body)
            self._ids[key] = int(data["id"])
            self._by_id[int(data["id"])] = json.loads(schema.canonical)
        return self._ids[key]

    async def schema(self, schema_id: int) -> dict[str, Any]:
        """The writer schema registered under `schema_id`."""
        if schema_id not in self._by_id:
            async with self._lock:
                if schema_id not in self._by_id:
                    data = await self._call("GET", f"/schemas/ids/{schema_id}")
                    self._by_id[schema_id] = _record_schema(data.get("schema"), schema_id)
        return self._by_id[schema_id]

    def cached(self, schema_id: int) -> dict[str, Any] | None:
        return self._by_id.get(schema_id)

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise RegistryUnavailable(f"schema registry unreachable: {error!r}") from error
        if response.status_code == 429 or response.status_code >= 500:
            raise RegistryUnavailable(
                f"schema registry answered {response.status_code} to {method} {path}"
            )
        if response.status_code >= 400:
            raise RegistryError(
                f"schema registry answered {response.status_code} to {method} {path}: "
                f"{response.text[:300]}"
            )
        data: dict[str, Any] = response.json()
        return data


def _record_schema(text: Any, schema_id: int) -> dict[str, Any]:
    """The registry's schema text as a JSON object; anything else is a refused schema."""
    try:
        schema = json.loads(text) if isinstance(text, str) else None
    except ValueError as error:
        raise RegistryError(f"schema id {schema_id} is not JSON: {error}") from None
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise RegistryError(f"schema id {schema_id} is not a record schema: {str(text)[:100]}")
    return schema


class RegistryCodec:
    """Encodes with Confluent framing; decodes both framings (single-object and Confluent)."""

    def __init__(self, schema: EventSchema, registry: SchemaRegistry) -> None:
        self.schema = schema
        self.registry = registry
        self._writers: dict[int, SchemaVersion] = {}

    async def encode(self, record: dict[str, Any], subject: str) -> bytes:
        schema_id = await self.registry.register(subject, self.schema.latest)
        buffer = io.BytesIO()
        buffer.write(_HEADER.pack(0, schema_id))
        schemaless_writer(buffer, self.schema.latest.parsed, record)
        return buffer.getvalue()

    async def decode(self, data: bytes) -> dict[str, Any]:
        if data[:2] == SINGLE_OBJECT_MAGIC:
            return self.schema.decode(data)
        if len(data) < _HEADER.size or data[:1] != CONFLUENT_MAGIC:
            raise MalformedEvent(f"{self.schema.name}: neither single-object nor Confluent framed")
        _, schema_id = _HEADER.unpack_from(data)
        writer = self._writers.get(schema_id)
        if writer is None:
            try:
                raw = await self.registry.schema(schema_id)
            except RegistryUnavailable:
                raise  # not the record's fault: the caller retries
            except RegistryError as error:
                raise UnknownSchema(f"{self.schema.name}: schema id {schema_id}: {error}") from None
            try:
                writer = SchemaVersion.from_json(raw, version=0)
            except Exception as error:  # a primitive, unparseable or broken writer schema
                raise UnknownSchema(
                    f"{self.schema.name}: schema id {schema_id} is not a usable record schema: "
                    f"{type(error).__name__}: {error}"
                ) from None
            if writer.fingerprint == self.schema.latest.fingerprint:
                writer = self.schema.latest  # no resolution needed: the fast path
            self._writers[schema_id] = writer
        return self.schema.decode_body(data[_HEADER.size :], writer)
