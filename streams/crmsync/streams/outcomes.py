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
    """One published record, read back: a worker's outcomes of one batch."""

    workflow: str
    worker: str
    outcomes: list[Outcome]


#: What a trace keeps of one change event, made once per record on the worker's path:
#: (topic, partition, offset, key, op, ts_ms, fields, fields changed, another id it names).
EventTuple = tuple[str, int, int, str, str | None, int | None, tuple[str, ...], bool, str]


def event_view(
    topic: str, partition: int, offset: int, key: bytes | None, event: Mapping[str, Any] | None
) -> EventTuple:
    """What a trace shows of a change event (`event` None: undecodable or a tombstone)."""
    name = (key or b"").decode("utf-8", "replace")[:MAX_KEY]
    if event is None:
        return (topic, partition, offset, name, None, None, (), False, "")
    if "event_id" in event:  # a Campaign email event: no before/after, its own fields
        ts = event.get("ts_ms")
        return (
            topic,
            partition,
            offset,
            str(event["event_id"])[:MAX_KEY],
            event.get("type"),
            ts if isinstance(ts, int) else None,
            tuple(f for f, v in event.items() if v is not None)[:MAX_FIELDS],
            False,
            str(event.get("contact_id") or "")[:MAX_KEY],
        )
    after = event.get("after") or {}
    before = event.get("before")
    if before:
        changed = [f for f, value in after.items() if before.get(f, value) != value]
        fields = tuple(changed + [f for f in before if f not in after])
    else:
        fields = tuple(after)
    source = event.get("source") or {}
    ts = source.get("ts_ms")
    return (
        topic,
        partition,
        offset,
        str(event.get("key") or name)[:MAX_KEY],
        event.get("op"),
        ts if isinstance(ts, int) else None,
        fields[:MAX_FIELDS],
        bool(before),
        "",
    )


class Trace:
    """One batch's outcomes, encoded compactly: every repeated string (topic, op, field list,
    reason, target) once per record, as an index into the batch's string table."""

    def __init__(self) -> None:
        self._strings: dict[str, int] = {}
        self._field_lists: dict[tuple[str, ...], int] = {}
        self._rows: list[list[Any]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def _s(self, value: str | None) -> int:
        if value is None:
            return -1
        index = self._strings.get(value)
        if index is None:
            index = self._strings[value] = len(self._strings)
        return index

    def _fields(self, names: tuple[str, ...]) -> int:
        index = self._field_lists.get(names)
        if index is None:
            index = self._field_lists[names] = self._s(",".join(names[:MAX_FIELDS]))
        return index

    def add(
        self,
        event: EventTuple,
        result: Result,
        reason: str | None = None,
        writes: Sequence[Write] = (),
    ) -> None:
        topic, partition, offset, key, op, ts_ms, fields, changed, also = event
        s = self._s
        self._rows.append(
            [
                s(topic),
                partition,
                offset,
                key,
                s(op),
                ts_ms,
                self._fields(fields),
                1 if changed else 0,
                s(result),
                s(reason),
                also,
                [
                    [
                        s(w.system),
                        s(w.record.target),
                        s(
                            w.record.op
                            if w.record.mode == "upsert"
                            else f"{w.record.op} ({w.record.mode})"
                        ),
                        str(w.record.key)[:MAX_KEY],
                        self._fields((*w.record.fields, *w.record.create_fields)),
                    ]
                    for w in writes
                ],
            ]
        )

    def encode(self, workflow: str, worker: str, at_ms: int | None = None) -> bytes:
        return json.dumps(
            {
                "v": 2,
                "workflow": workflow,
                "worker": worker,
                "at_ms": at_ms if at_ms is not None else int(time.time() * 1000),
                "s": list(self._strings),
                "o": self._rows,
            },
            separators=(",", ":"),
        ).encode()


def decode(data: bytes) -> OutcomeBatch:
    """Raises ValueError (pydantic's ValidationError is one) for a record that is not one."""
    raw = _Encoded.model_validate(json.loads(data))
    strings = raw.s

    def s(index: int) -> str | None:
        if index == -1:
            return None
        if not 0 <= index < len(strings):
            raise ValueError(f"string index {index} out of range")
        return strings[index]

    def names(index: int) -> list[str]:
        joined = s(index)
        return joined.split(",") if joined else []

    found: list[Outcome] = []
    for row in raw.o:
        (
            topic,
            partition,
            offset,
            key,
            op,
            ts_ms,
            fields,
            changed,
            result,
            reason,
            also,
            writes,
        ) = row
        found.append(
            Outcome(
                event=EventView(
                    key=key,
                    topic=s(topic) or "",
                    partition=partition,
                    offset=offset,
                    op=s(op),
                    ts_ms=ts_ms,
                    fields=names(fields),
                    changed=bool(changed),
                    also=[also] if also else [],
                ),
                result=s(result),  # type: ignore[arg-type]  # validated by Outcome
                reason=s(reason),
                writes=[
                    WriteView(
                        system=s(w[0]) or "",
                        target=s(w[1]) or "",
                        op=s(w[2]) or "",
                        key=w[3],
                        fields=names(w[4]),
                    )
                    for w in writes
                ],
                at_ms=raw.at_ms,
            )
        )
    return OutcomeBatch(workflow=raw.workflow, worker=raw.worker, outcomes=found)


_Row = tuple[
    int,
    int,
    int,
    str,
    int,
    int | None,
    int,
    int,
    int,
    int,
    str,
    list[tuple[int, int, int, str, int]],
]


class _Encoded(BaseModel):
    v: Literal[2]
    workflow: str
    worker: str
    at_ms: int
    s: list[str]
    o: list[_Row]
