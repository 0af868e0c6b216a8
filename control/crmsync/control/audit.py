"""Who did what to which workflow, and when: written to `crmsync.audit`, read back newest first."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crmsync.streams.kafka import topics
from crmsync.streams.kafka.offsets import TopicTail


class AuditEntry(BaseModel):
    """One state-changing action (start, stop, edit, replay)."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    who: str = Field(description="the token's name")
    role: str
    action: str = Field(description="start, stop, edit or replay")
    workflow: str
    at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    details: dict[str, Any] = Field(default_factory=dict)


class AuditLog:
    """Appends entries (acks=all: an action is not done before its entry is stored)."""

    def __init__(self, producer: AIOKafkaProducer, tail: TopicTail) -> None:
        self._producer = producer
        self._tail = tail

    async def record(self, entry: AuditEntry) -> None:
        await self._producer.send_and_wait(
            topics.AUDIT, entry.model_dump_json().encode(), key=entry.workflow.encode()
        )

    async def newest(self, limit: int) -> list[AuditEntry]:
        entries = []
        for record in await self._tail.newest(topics.AUDIT, limit):
            try:
                entries.append(AuditEntry.model_validate_json(record.value or b""))
            except ValidationError:
                continue  # written by something else: not ours to show
        return entries
