"""The batching sink interface workflows write through: records in, one outcome per record out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from crmsync.targets.campaign import ProfileLink
from crmsync.targets.dynamics import KeyValue
from crmsync.targets.errors import Fatal, ParentMissing, RecordRejected, Retryable, SinkError

#: What a sink reports for one record: None = written (or already so), else the typed failure.
Outcome = SinkError | None


@dataclass(slots=True)
class SinkRecord:
    """One write into a target API, target-neutral so a workflow can hand it to either sink.

    Never changed once made (not ``frozen`` only because a frozen dataclass's ``__init__``
    costs ≈ 0.7 µs more, and one is made for every record a workflow writes).

    - ``target``: where the record lives — a Dynamics entity set (``contacts``,
      ``crmsync_emailsends``) or a Campaign resource (``profileAndServicesExt/profile``,
      ``customResources/cusPurchase``).
    - ``key``: the record's identity in the target, and the ordering key (records with the same
      ``(target, key)`` are written in the order given, never side by side). Dynamics: the primary
      id (a GUID) unless ``key_field``/``alternate_key`` say otherwise. Campaign: the value of the
      key field (``externalId`` = the Dynamics contactid, for profiles).
    - ``op``: ``upsert`` (create or update) or ``delete`` (a record already absent counts as
      deleted).
    - ``fields``: the field values to write (Web API / Campaign field names); ignored for a
      delete. Fields not named are left as they are (PATCH semantics).
    - ``mode``: ``create`` = create only (Dynamics ``If-None-Match: *``; an existing record
      counts as written: a redelivered create was already done); ``update`` = update only
      (Dynamics ``If-Match: *``; Campaign: found by its key, else not written). Campaign upserts
      always look up first.
    - ``key_field``: the field holding ``key`` when it is not the primary id. Dynamics: a
      single-column alternate key (``crmsync_eventid``); Campaign: the field the lookup filter
      matches (default ``externalId`` for profiles; required for custom resources).
    - ``alternate_key`` (Dynamics): a multi-column alternate key, column → value; wins over
      ``key_field``. ``key`` then only orders and names the record in logs.
    - ``create_fields``: written only when the upsert creates the record (a mapping with
      ``apply_updates`` false), never over an existing record's values.

    ``mode="update"`` on a missing record is reported ``ParentMissing`` by both sinks (the record
    is expected to come: an opt-out for a contact not synced yet), never created. A field value
    may be a ``ProfileLink`` (Campaign): the sink writes the link to that profile, or reports
    ``ParentMissing`` while there is none; likewise a Dynamics ``@odata.bind`` to a missing record.
    """

    target: str
    key: str
    op: Literal["upsert", "delete"] = "upsert"
    fields: Mapping[str, Any] = field(default_factory=dict)
    mode: Literal["upsert", "create", "update"] = "upsert"
    key_field: str | None = None
    alternate_key: Mapping[str, KeyValue] | None = None
    create_fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> tuple[str, str]:
        """What per-key ordering is kept by."""
        return (self.target, self.key)


@runtime_checkable
class BatchingSink(Protocol):
    """Writes batches of records; modelled on quix-streams' BatchingSink.

    ``write_batch`` returns one outcome per record, in the records' order, and never raises for a
    record's failure (only for cancellation):

    - ``None``: written (or already in the wanted state: a create that found the record, a delete
      that found none). The offset may be committed.
    - ``RecordRejected``: the target refused this record and always will: dead-letter it, go on.
    - ``Retryable``: not written now (throttled, outage, timeout, or not attempted because an
      earlier record with the same key failed): write it again later, in order, skipping
      nothing. ``retry_after`` (seconds) is the target's wish when it said one.
    - ``Fatal``: the workflow cannot go on (credentials refused, forbidden, entity missing).

    A sink retries transient failures itself only within a bounded policy (a few tries, some
    seconds), so a stop request is never held up for long; the runtime owns the long retry.
    """

    async def write_batch(self, records: Sequence[SinkRecord]) -> list[Outcome]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Holdable(Protocol):
    """A sink that can be told to start no new request while what it has sent finishes: a stop
    then ends a batch as soon as its requests in flight are answered, each record written or
    ``Halted`` (never sent), instead of giving the whole batch up after a grace."""

    def hold(self) -> None: ...

    def release(self) -> None: ...


class DiscardingSink:
    """Writes nothing and reports every record written: for benchmarks of everything but I/O."""

    def __init__(self) -> None:
        self.records = 0

    async def write_batch(self, records: Sequence[SinkRecord]) -> list[Outcome]:
        self.records += len(records)
        return [None] * len(records)

    async def aclose(self) -> None:
        return None


def retry_after(outcomes: Sequence[Outcome]) -> float | None:
    """The longest ``retry_after`` among the retryable outcomes (a backpressure hint), or None."""
    waits = [o.retry_after for o in outcomes if isinstance(o, Retryable) and o.retry_after]
    return max(waits) if waits else None


def not_attempted(record: SinkRecord, cause: SinkError) -> Retryable:
    """The outcome of a record held back because an earlier one with its key did not go through."""
    return Retryable(
        f"not attempted: an earlier write of {record.target} key={record.key} failed "
        f"({type(cause).__name__})",
        cause.retry_after if isinstance(cause, Retryable) else None,
    )


def blocks_its_key(outcome: Outcome) -> bool:
    """Whether later records with the same key must wait (a rejected one is dead-lettered)."""
    return isinstance(outcome, Retryable | Fatal)


def unexpected(error: Exception) -> Fatal:
    """A bug or an answer we cannot read must stop the workflow, never lose the record."""
    return Fatal(f"unexpected {type(error).__name__}: {error}")


__all__ = [
    "BatchingSink",
    "DiscardingSink",
    "Fatal",
    "Holdable",
    "KeyValue",
    "Outcome",
    "ParentMissing",
    "ProfileLink",
    "RecordRejected",
    "Retryable",
    "SinkError",
    "SinkRecord",
    "retry_after",
]
