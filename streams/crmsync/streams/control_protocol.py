"""The records of `crmsync.control` and `crmsync.status`, and how to write and follow them.

The control plane is the only writer of `crmsync.control` (one record per workflow: the desired
state, a generation number, the active and pending configs). Every worker follows that topic from
the beginning, outside any consumer group, and writes its own status + heartbeat to
`crmsync.status`, keyed `<workflow>/<worker id>`.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients

log = logging.getLogger(__name__)

Desired = Literal["running", "stopped"]
WorkerState = Literal["STARTING", "RUNNING", "STOPPED", "FAILED"]


class ReplayRequest(BaseModel):
    """Move the group's committed offsets back, done by the workers themselves while stopped."""

    model_config = ConfigDict(frozen=True)

    id: str
    from_: str = Field(alias="from", description='"earliest" or an ISO-8601 time')


class DriftBaseline(BaseModel):
    """The shapes of what a config needs, as its targets showed them when it was first started:
    what drift checks compare with, kept in the control record so a worker started later (a
    restart, a new pod) still knows what a column or field *was*."""

    model_config = ConfigDict(frozen=True)

    version: int = Field(ge=1, description="the config version the shapes were taken for")
    shapes: dict[str, str] = Field(
        default_factory=dict, description='"<target>|<kind>|<name>" → shape ("String(200)")'
    )


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
    #: Written by the control plane from what the workers report (never by a person).
    drift_baseline: DriftBaseline | None = None
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
    # Added fields have defaults, and readers ignore keys they do not know: a worker and a
    # control plane of different releases read each other's records.
    stopped_by: Literal["operator", "drift"] | None = None
    reason: str | None = Field(default=None, description='why, when stopped_by is "drift"')
    drift: list[dict[str, Any]] = Field(
        default_factory=list, description="the differences of the last drift check"
    )
    baseline: DriftBaseline | None = Field(
        default=None, description="what the drift checks compare with (control plane keeps it)"
    )
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


async def write_control(kafka: KafkaClients, record: ControlRecord) -> None:
    """Writes one control record and waits for Kafka's acknowledgement (acks=all)."""
    producer = kafka.producer()
    await producer.start()
    try:
        await producer.send_and_wait(topics.CONTROL, record.encode(), key=record.workflow.encode())
    finally:
        await producer.stop()
