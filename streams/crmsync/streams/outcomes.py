"""Outcome records: what a workflow did with the records it read, for the record trace.

A worker publishes one compact record per written batch to `crmsync.<workflow>.outcomes`: the
config version the batch ran under, per source partition the range of offsets it acknowledged,
and only the records whose outcome cannot be derived again from the source record and that
config — dead-lettered (the reason), parked (its parent missing), and records the workflow
decided with a reason of its own (an opt-out decision: written, or skipped as an echo, stale...),
with their writes. Nothing is built per record on the worker's path for the rest: the control
plane reads the source topics itself and re-runs the workflow's own plan for a record in a range
(`crmsync.control.trace`). Records are published without waiting for Kafka's acknowledgement:
a crash may lose the last few, never a write.

The record carries its format version (`v`): a reader refuses another one with `OtherVersion`,
so records of an older or newer release are skipped by name rather than misread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from crmsync.streams.delivery import SourceRecord
from crmsync.streams.mapping import Write

#: The format this release writes and reads.
VERSION = 3

Result = Literal["written", "skipped", "parked", "dead-lettered"]

#: Field names kept per write: a trace shows what was written, not a whole row.
MAX_FIELDS = 40
#: The value of each write's key field is looked up; ids longer than this are not ids.
MAX_KEY = 200

#: Why a tombstone is skipped (a trace derives it: the source record has no value).
TOMBSTONE = "a tombstone (a deleted key, for compaction): the delete before it carried it"


class OtherVersion(ValueError):
    """An outcome record of another format version (an older or newer release wrote it)."""

    def __init__(self, version: object) -> None:
        super().__init__(f"outcome record format {version!r}, this release reads {VERSION}")
        self.version = version


class WriteView(BaseModel):
    """One write of a record: into which system and table/resource, how, which fields."""

    system: str
    target: str
    op: str
    key: str
    fields: list[str] = Field(default_factory=list)


class AckedRange(BaseModel):
    """Offsets `first`..`last` of one source partition, every record in it acknowledged."""

    topic: str
    partition: int
    first: int
    last: int


class Exceptional(BaseModel):
    """One record whose outcome is told rather than derived."""

    topic: str
    partition: int
    offset: int
    result: Result
    reason: str | None = None
    writes: list[WriteView] = Field(default_factory=list)


class OutcomeBatch(BaseModel):
    """One published record, read back."""

    workflow: str
    worker: str
    at_ms: int
    config_version: int
    ranges: list[AckedRange]
    exceptions: list[Exceptional]


def write_op(write: Write) -> str:
    """How a trace names a write's operation: `upsert`, `delete`, or `upsert (update)`..."""
    record = write.record
    return record.op if record.mode == "upsert" else f"{record.op} ({record.mode})"


class OutcomeRecord:
    """One batch's outcome record being built: ranges and exceptions, every repeated string
    (topic, reason, target, field list) once, as an index into the record's string table."""

    def __init__(self, config_version: int) -> None:
        self.config_version = config_version
        self._strings: dict[str, int] = {}
        self._field_lists: dict[tuple[str, ...], int] = {}
        self._ranges: list[list[int]] = []
        self._exceptions: list[list[Any]] = []

    def __bool__(self) -> bool:
        return bool(self._ranges or self._exceptions)

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

    def acked(self, topic: str, partition: int, first: int, last: int) -> None:
        """Every record of `topic`/`partition` from offset `first` to `last` was handled."""
        self._ranges.append([self._s(topic), partition, first, last])

    def exception(
        self,
        record: SourceRecord,
        result: Result,
        reason: str | None = None,
        writes: Sequence[Write] = (),
    ) -> None:
        """One record whose outcome the control plane cannot derive on its own."""
        s = self._s
        self._exceptions.append(
            [
                s(record.topic),
                record.partition,
                record.offset,
                s(result),
                s(reason),
                [
                    [
                        s(w.system),
                        s(w.record.target),
                        s(write_op(w)),
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
                "v": VERSION,
                "workflow": workflow,
                "worker": worker,
                "at_ms": at_ms if at_ms is not None else int(time.time() * 1000),
                "config_version": self.config_version,
                "s": list(self._strings),
                "r": self._ranges,
                "x": self._exceptions,
            },
            separators=(",", ":"),
        ).encode()


def decode(data: bytes) -> OutcomeBatch:
    """Raises OtherVersion for a record of another format, ValueError (pydantic's
    ValidationError is one) for one that is not an outcome record."""
    loaded = json.loads(data)
    if not isinstance(loaded, dict):
        raise ValueError("an outcome record is a JSON object")
    if loaded.get("v") != VERSION:
        raise OtherVersion(loaded.get("v"))
    raw = _Encoded.model_validate(loaded)
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

    return OutcomeBatch(
        workflow=raw.workflow,
        worker=raw.worker,
        at_ms=raw.at_ms,
        config_version=raw.config_version,
        ranges=[
            AckedRange(topic=s(topic) or "", partition=partition, first=first, last=last)
            for topic, partition, first, last in raw.r
        ],
        exceptions=[
            Exceptional(
                topic=s(topic) or "",
                partition=partition,
                offset=offset,
                result=s(result),  # type: ignore[arg-type]  # validated by Exceptional
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
            )
            for topic, partition, offset, result, reason, writes in raw.x
        ],
    )


class _Encoded(BaseModel):
    v: Literal[3]
    workflow: str
    worker: str
    at_ms: int
    config_version: int
    s: list[str]
    r: list[tuple[int, int, int, int]]
    x: list[tuple[int, int, int, int, int, list[tuple[int, int, int, str, int]]]]
