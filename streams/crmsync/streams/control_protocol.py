"""The records of `crmsync.control` and `crmsync.status`, and how to write and follow them.

The control plane is the only writer of `crmsync.control` (one record per workflow: the desired
state, a generation number, the active and pending configs). Every worker follows that topic from
the beginning, outside any consumer group, and writes its own status + heartbeat to
`crmsync.status`, keyed `<workflow>/<worker id>`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import BaseModel, ConfigDict, Field

from crmsync.streams.kafka import topics

log = logging.getLogger(__name__)

Desired = Literal["running", "stopped"]
WorkerState = Literal["STARTING", "RUNNING", "STOPPED", "FAILED"]


class ReplayRequest(BaseModel):
    """Move the group's committed offsets back, done by the workers themselves while stopped."""

    model_config = ConfigDict(frozen=True)

    id: str
    from_: str = Field(alias="from", description='"earliest" or an ISO-8601 time')


class ControlRecord(BaseModel):
    """What the control plane wants of one workflow."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    workflow: str
    desired: Desired
    generation: int = Field(ge=0, description="bumped by every stop and start")
    active_config: dict[str, Any]
    active_version: int = Field(ge=1)
    pending_config: dict[str, Any] | None = None
    pending_version: int | None = None
    replay: ReplayRequest | None = None
    updated_by: str = "crmsync"
    updated_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> ControlRecord:
        return cls.model_validate_json(data)


class WorkerStatus(BaseModel):
    """What one worker reports, every heartbeat and at every change."""

    model_config = ConfigDict(frozen=True)

    workflow: str
    worker_id: str
    state: WorkerState
    generation: int
    config_version: int
    error: str | None = None
    partitions: list[str] = Field(default_factory=list)
    records_written: int = 0
    dead_lettered: int = 0
    replayed: str | None = Field(default=None, description="id of the last replay carried out")
    heartbeat_ms: int = Field(default_factory=lambda: int(time.time() * 1000))
    host: str = ""
    pid: int = 0

    @property
    def key(self) -> str:
        return f"{self.workflow}/{self.worker_id}"

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes) -> WorkerStatus:
        return cls.model_validate_json(data)


async def write_control(
    bootstrap_servers: str, record: ControlRecord, **client_options: Any
) -> None:
    """Writes one control record and waits for Kafka's acknowledgement (acks=all)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True, **client_options
    )
    await producer.start()
    try:
        await producer.send_and_wait(topics.CONTROL, record.encode(), key=record.workflow.encode())
    finally:
        await producer.stop()


class TopicFollower:
    """Reads a compacted single-partition topic from the beginning, then follows it.

    Keeps the latest value per key; `loaded` is set once everything present at start was read.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        on_record: Callable[[str, bytes | None], None] | None = None,
        **client_options: Any,
    ) -> None:
        self.topic = topic
        self.latest: dict[str, bytes] = {}
        self.loaded = asyncio.Event()
        self.changed = asyncio.Event()
        self._on_record = on_record
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            **client_options,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        tp = TopicPartition(self.topic, 0)
        self._consumer.assign([tp])
        await self._consumer.seek_to_beginning(tp)
        end = (await self._consumer.end_offsets([tp]))[tp]
        if end == 0:
            self.loaded.set()
        self._task = asyncio.create_task(self._follow(tp, end), name=f"follow:{self.topic}")

    async def _follow(self, tp: TopicPartition, end: int) -> None:
        while True:
            batch = await self._consumer.getmany(tp, timeout_ms=500)
            for record in batch.get(tp, []):
                key = record.key.decode() if record.key else ""
                if record.value is None:
                    self.latest.pop(key, None)
                else:
                    self.latest[key] = record.value
                if self._on_record is not None:
                    self._on_record(key, record.value)
                if record.offset + 1 >= end:
                    self.loaded.set()
            if batch:
                self.changed.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._consumer.stop()

    async def changes(self) -> AsyncIterator[None]:
        """Yields after every batch of new records."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            yield None


def decode_json(data: bytes) -> Mapping[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value
