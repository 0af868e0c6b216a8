"""Publish crmsync events from Python code: build, validate, encode and send with acks=all."""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT, EventSchema
from crmsync.schemas.registry import RegistryCodec, SchemaRegistry
from crmsync.streams.kafka.clients import KafkaClients

Scalar = None | bool | int | float | str


def change_event(
    op: Literal["c", "u", "d", "r"],
    entity: str,
    key: str,
    *,
    after: Mapping[str, Scalar] | None = None,
    before: Mapping[str, Scalar] | None = None,
    system: str,
    source_ts_ms: int | None = None,
    user: str | None = None,
    txid: str | None = None,
) -> dict[str, Any]:
    """A ChangeEvent record as the schema wants it; timestamps default to now."""
    now = int(time.time() * 1000)
    return {
        "op": op,
        "entity": entity,
        "key": key,
        "before": dict(before) if before is not None else None,
        "after": dict(after) if after is not None else None,
        "source": {
            "system": system,
            "ts_ms": source_ts_ms if source_ts_ms is not None else now,
            "user": user,
            "txid": txid,
        },
        "ts_ms": now,
    }


class EventProducer:
    """An idempotent Kafka producer of Avro events, keyed so one record's changes stay ordered.

    async with EventProducer("127.0.0.1:9092") as producer:
        await producer.send_change("d365.contact.changes", change_event("u", "contact", id,
                                   after={"firstname": "Ada"}, system="d365"))
    """

    def __init__(self, kafka: KafkaClients | str, *, registry_url: str | None = None) -> None:
        if isinstance(kafka, str):
            kafka = KafkaClients(kafka)
        self._registry = SchemaRegistry(registry_url) if registry_url else None
        self._producer = kafka.producer(linger_ms=5, max_batch_size=256 * 1024)

    async def __aenter__(self) -> EventProducer:
        await self._producer.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._producer.stop()
        if self._registry is not None:
            await self._registry.aclose()

    async def send_change(self, topic: str, event: Mapping[str, Any]) -> None:
        """Encodes (validating) and sends; returns once Kafka acknowledged it."""
        await self.send_encoded(
            topic, str(event["key"]), await self.encode(CHANGE_EVENT, topic, event)
        )

    async def send_email_event(self, topic: str, event: Mapping[str, Any]) -> None:
        await self.send_encoded(
            topic, str(event["contact_id"]), await self.encode(EMAIL_EVENT, topic, event)
        )

    async def encode(self, schema: EventSchema, topic: str, event: Mapping[str, Any]) -> bytes:
        """Single-object encoding, or Confluent framing (subject `<topic>-value`) when the
        producer was given a schema registry."""
        if self._registry is None:
            return schema.encode(event)
        schema.validate(event)
        return await RegistryCodec(schema, self._registry).encode(dict(event), f"{topic}-value")

    async def send_encoded(
        self, topic: str, key: str | None, value: bytes | None, *, wait: bool = True
    ) -> Any:
        """Sends pre-encoded bytes (None = tombstone). With wait=False returns the future."""
        future = await self._producer.send(
            topic, value=value, key=key.encode() if key is not None else None
        )
        return await future if wait else future

    async def flush(self) -> None:
        await self._producer.flush()
