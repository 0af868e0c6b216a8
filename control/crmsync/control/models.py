"""The shapes the control plane answers and accepts (the HTTP API's JSON, also used by the CLI)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from crmsync.control.backlog import Trend
from crmsync.control.status import Status


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


class DriftChange(_Answer):
    target: str = Field(description="d365 or campaign")
    kind: str = Field(description="table, column, key, navigation, resource, field or filter")
    name: str
    was: str = Field(description="its type and length at Start (or absent)")
    now: str = Field(description="its type and length now (or missing)")
    breaking: bool = Field(description="values would no longer fit or be lost")


class WorkflowSummary(_Answer):
    name: str
    title: str
    status: Status
    backlog: int = Field(description="records in Kafka not yet written to the target")
    trend: Trend
    eta_s: float | None = Field(default=None, description="draining: seconds to caught up")
    pending_changes: bool
    error: str | None = Field(default=None, description="why FAILED, or what STARTING waits for")
    stopped_by: Literal["operator", "drift"] | None = Field(
        default=None, description="STOPPED: by a Stop, or by the workflow itself on schema drift"
    )
    reason: str | None = Field(default=None, description='stopped_by "drift": what changed')
    drift: list[DriftChange] = Field(
        default_factory=list,
        description="what the workers' last drift check found changed in the targets "
        "(breaking ones stop the workflow; additive ones are only reported)",
    )


class WorkflowList(_Answer):
    workflows: list[WorkflowSummary]


class PartitionBacklog(_Answer):
    topic: str
    partition: int
    end_offset: int
    committed_offset: int | None = Field(description="null: the group never committed here")
    lag: int


class WorkerView(_Answer):
    worker_id: str
    host: str
    pid: int
    state: str
    generation: int
    config_version: int
    error: str | None
    partitions: list[str]
    records_written: int
    dead_lettered: int
    replayed: str | None
    heartbeat_at: str
    live: bool
    stopped_by: str | None = None
    reason: str | None = None


class ConfigChange(_Answer):
    path: str
    active: Any
    pending: Any


class WorkflowDetail(WorkflowSummary):
    desired: Literal["running", "stopped"]
    generation: int
    partitions: list[PartitionBacklog]
    active_config: dict[str, Any]
    active_version: int
    pending_config: dict[str, Any] | None
    pending_version: int | None
    pending_diff: list[ConfigChange]
    workers: list[WorkerView]
    updated_at: str
    updated_by: str


class StatusAnswer(_Answer):
    name: str
    status: Status
    generation: int


class ConfigAnswer(_Answer):
    active: dict[str, Any]
    active_version: int
    pending: dict[str, Any] | None
    pending_version: int | None
    pending_diff: list[ConfigChange]


class PendingAnswer(_Answer):
    pending: dict[str, Any] | None = Field(description="null when the edit equals the active")
    pending_version: int | None
    pending_diff: list[ConfigChange]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReplayBody(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    from_: str = Field(
        alias="from",
        description='"earliest", or an ISO-8601 time (no zone = UTC): the first record at or '
        "after it",
        examples=["earliest", "2026-01-31T12:00:00Z"],
        json_schema_extra={
            "anyOf": [{"const": "earliest"}, {"type": "string", "format": "date-time"}]
        },
    )

    @field_validator("from_")
    @classmethod
    def _earliest_or_time(cls, value: str) -> str:
        if value == "earliest":
            return value
        try:
            moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError('must be "earliest" or an ISO-8601 time') from None
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        # Kafka takes no time before the epoch; from then on is the same records anyway. The
        # canonical form (with its zone) is what the workers parse and the audit shows.
        return max(moment, _EPOCH).isoformat()


class ReplayAnswer(_Answer):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    name: str
    status: Status
    replay_id: str
    from_: str = Field(alias="from")
    backlog: int
    partitions: list[PartitionBacklog]
    committed_by: Literal["workers", "control plane"]


class PreviewBody(BaseModel):
    """What to dry-run: a config (else the pending one) on the newest `limit` source records."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: dict[str, Any] | None = Field(
        default=None,
        description="the config to try (validated like PUT .../config); absent: the pending one",
    )
    limit: int = Field(
        default=20, ge=1, le=500, description="how many of the newest source records to plan"
    )


class PreviewWrite(_Answer):
    system: Literal["d365", "campaign"]
    target: str = Field(description="the Dynamics entity set or Campaign resource")
    operation: Literal["upsert", "create", "update", "delete"]
    key: str
    key_field: str | None
    fields: dict[str, Any] = Field(description="field values written (a link: {profile: id})")
    create_fields: dict[str, Any] = Field(
        description="written only when the write creates the record"
    )


class PreviewSide(_Answer):
    outcome: Literal["writes", "filtered", "nothing", "dead_letter", "fails", "not_read"] = Field(
        description="writes; filtered (left out by the filters: no write, or the delete of a "
        "filtered-out record); nothing to write; dead_letter (the record would be refused); "
        "fails (the workflow would turn FAILED); not_read (this config does not read the topic)"
    )
    writes: list[PreviewWrite]
    reason: str | None


class PreviewRecord(_Answer):
    topic: str
    partition: int
    offset: int
    key: str | None
    timestamp: str
    event: dict[str, Any] | None = Field(description="the decoded source event")
    active: PreviewSide
    pending: PreviewSide
    changed: bool
    differences: list[str] = Field(
        description="what differs: outcome, writes, system, target, operation, key, or a "
        "field's name"
    )
    filter_change: Literal["dropped", "kept"] | None = Field(
        description="dropped: the pending config's filters leave out what the active one "
        "writes; kept: the other way round"
    )


class PreviewAnswer(_Answer):
    workflow: str
    pending_source: Literal["body", "pending", "active"] = Field(
        description="where the pending side's config came from (active: there is no pending "
        "edit, both sides are the active config)"
    )
    active_version: int
    pending_version: int | None
    records: list[PreviewRecord] = Field(description="oldest first: the order a worker plans in")
    changed: int
    dropped: int
    kept: int
    complete: bool = Field(
        description="false: a read's byte budget ended before `limit` records were found"
    )
    note: str | None = Field(description="how far the dry run can tell (kept state)")


class RedriveMark(_Answer):
    redrive_id: str
    at: str
    by: str = Field(description="the token's name")
    to: str = Field(description="<topic>/<partition>/<offset> the event was sent to again")


class DeadLetter(_Answer):
    topic: str
    partition: int
    offset: int
    timestamp: str
    key: str | None
    headers: dict[str, str]
    value: dict[str, Any] | None = Field(description="the decoded Avro event, when it decodes")
    value_base64: str | None = Field(
        description="the original bytes, when they do not decode (at most the first 8 KiB)"
    )
    value_size: int = Field(default=0, description="bytes of the original value")
    value_truncated: bool = Field(
        default=False, description="value_base64 holds only the first 8 KiB of the value"
    )
    reason: str | None = Field(default=None, description="the error message (the server's)")
    error_class: str | None = None
    attempts: int | None = None
    failed_at: str | None = Field(default=None, description="when it was dead-lettered")
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    redriven: RedriveMark | None = Field(
        default=None, description="set once re-driven: a second re-drive skips it"
    )
    returned_from: Any = Field(
        default=None,
        description="{partition, offset} of the dead letter whose re-drive failed again as this",
    )


class DeadLetterList(_Answer):
    workflow: str
    dead_letters: list[DeadLetter]
    complete: bool = Field(
        default=True,
        description="false: the read's byte budget ended the list before `limit` dead letters",
    )


class AuditView(_Answer):
    id: str
    who: str
    role: str
    action: str
    workflow: str
    at: str
    details: dict[str, Any]


class AuditList(_Answer):
    audit: list[AuditView]


class ErrorItem(_Answer):
    loc: list[str | int]
    msg: str


class ErrorAnswer(_Answer):
    error: str
    detail: Any = None


class InvalidAnswer(ErrorAnswer):
    errors: list[ErrorItem]


class Health(_Answer):
    status: Literal["ok", "unavailable"]
    detail: str | None = None


class TraceWrite(BaseModel):
    """One write a workflow made of a record: system, table/resource, operation, key, fields."""

    system: str
    target: str
    op: str
    key: str
    fields: list[str]


class TraceOutcome(BaseModel):
    """What one workflow did with one event: written, skipped, parked or dead-lettered."""

    workflow: str
    worker: str
    result: str
    reason: str | None
    writes: list[TraceWrite]
    at: str


class TraceEvent(BaseModel):
    """One change event that carried the key, and each workflow's outcome of it, in order."""

    key: str
    topic: str
    partition: int
    offset: int
    op: str | None
    time: str | None
    fields: list[str]
    #: True: `fields` are the fields the event changed (it had a before-image); else carried.
    fields_changed: bool
    outcomes: list[TraceOutcome] = Field(default_factory=list)


class TraceAnswer(BaseModel):
    key: str
    #: Newest first.
    events: list[TraceEvent]
    truncated: bool
    #: Source and outcome records published but not indexed yet (None: not known yet).
    not_indexed_yet: int | None
