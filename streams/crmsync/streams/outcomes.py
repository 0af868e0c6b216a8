"""Outcome records: what a workflow did with each record it read, for the record trace.

A worker publishes one compact record per written batch to `crmsync.<workflow>.outcomes`: per
source record, where it was read (topic, partition, offset), its event (op, time, the fields it
changed, or carried when it has no before-image) and what became of it — written (to which
target, how, which fields), skipped (and why), parked (its parent missing) or dead-lettered (the
reason). The control plane indexes them by key (`crmsync.control.trace`). They are published
without waiting for Kafka's acknowledgement: a crash may lose the last few, never a write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from crmsync.streams.mapping import Write

Result = Literal["written", "skipped", "parked", "dead-lettered"]

#: Field names kept per event and per write: a trace shows what changed, not a whole row.
MAX_FIELDS = 40
#: The record's key, and the value of each write's key field, are looked up; ids longer than
#: this are not ids.
MAX_KEY = 200


class WriteView(BaseModel):
    """One write of a record: into which system and table/resource, how, which fields."""

    system: str
    target: str
    op: str
    key: str
    fields: list[str] = Field(default_factory=list)


class EventView(BaseModel):
    """The change event as read: where, its op and source time, the fields it changed."""

    key: str
    topic: str
    partition: int
    offset: int
    op: str | None = None
    ts_ms: int | None = None
    #: The fields the event changed (it had a before-image), else every field it carried.
    fields: list[str] = Field(default_factory=list)
    changed: bool = False
    #: Other ids the record is found by (an email event's contact).
    also: list[str] = Field(default_factory=list)


class Outcome(BaseModel):
    """What one workflow did with one record."""

    event: EventView
    result: Result
    reason: str | None = None
    writes: list[WriteView] = Field(default_factory=list)
    at_ms: int


class OutcomeBatch(BaseModel):
    """One published record: a worker's outcomes of one batch."""

    v: Literal[1] = 1
    workflow: str
    worker: str
    outcomes: list[Outcome]


def event_view(
    topic: str, partition: int, offset: int, key: bytes | None, event: Mapping[str, Any] | None
) -> dict[str, Any]:
    """What a trace shows of a change event (`event` None: undecodable or a tombstone).

    Plain dicts on the worker's path (an `EventView` when read back): a batch's outcomes cost
    the worker little."""
    name = (key or b"").decode("utf-8", "replace")[:MAX_KEY]
    view: dict[str, Any] = {"key": name, "topic": topic, "partition": partition, "offset": offset}
    if event is None:
        return view
    if "event_id" in event:  # a Campaign email event: no before/after, its own fields
        view["key"] = str(event["event_id"])[:MAX_KEY]
        view["op"] = event.get("type")
        view["ts_ms"] = event.get("ts_ms")
        view["fields"] = sorted(f for f, v in event.items() if v is not None)[:MAX_FIELDS]
        view["also"] = [str(event.get("contact_id") or "")[:MAX_KEY]]
        return view
    after = event.get("after") or {}
    before = event.get("before")
    if before:
        fields = [f for f, value in after.items() if before.get(f, value) != value]
        fields += [f for f in before if f not in after]
    else:
        fields = list(after)
    source = event.get("source") or {}
    ts = event.get("source_ts_ms") or source.get("ts_ms")
    view["key"] = str(event.get("key") or name)[:MAX_KEY]
    view["op"] = event.get("op")
    view["ts_ms"] = int(ts) if isinstance(ts, int | float) else None
    view["fields"] = sorted(fields)[:MAX_FIELDS]
    view["changed"] = bool(before)
    return view


def write_views(writes: Sequence[Write]) -> list[dict[str, Any]]:
    return [
        {
            "system": w.system,
            "target": w.record.target,
            "op": w.record.op if w.record.mode == "upsert" else f"{w.record.op} ({w.record.mode})",
            "key": str(w.record.key)[:MAX_KEY],
            "fields": sorted({*w.record.fields, *w.record.create_fields})[:MAX_FIELDS],
        }
        for w in writes
    ]


def outcome(
    event: dict[str, Any],
    result: Result,
    reason: str | None = None,
    writes: Sequence[Write] = (),
    at_ms: int | None = None,
) -> dict[str, Any]:
    return {
        "event": event,
        "result": result,
        "reason": reason,
        "writes": write_views(writes),
        "at_ms": at_ms if at_ms is not None else int(time.time() * 1000),
    }


def encode(workflow: str, worker: str, outcomes: Sequence[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"v": 1, "workflow": workflow, "worker": worker, "outcomes": list(outcomes)},
        separators=(",", ":"),
    ).encode()


def decode(data: bytes) -> OutcomeBatch:
    """Raises ValueError (pydantic's ValidationError is one) for a record that is not one."""
    return OutcomeBatch.model_validate(json.loads(data))
