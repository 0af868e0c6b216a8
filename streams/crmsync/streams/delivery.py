"""At-least-once without Kafka: records queued per partition, written, parked, acked from the head.

Every record read is queued per partition in offset order until it is written (or refused), and
only the written head of a queue is handed back for acking: acking past a record that is not
written yet could let Faust commit past it (faust-streaming #606). A record whose parent is
missing is parked (with later records of its key), so it holds back only its own partition's
commit, never the writes of other records. A stop (or a revoke fence) ends every wait at once and
holds the sinks: the requests in flight are answered, no other starts, so the write ends with
what it wrote acked; one still waiting after a short grace is abandoned, nothing of it acked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from crmsync.streams.mapping import Write
from crmsync.streams.sinks.base import BatchingSink, Holdable, Outcome
from crmsync.streams.workflows import Planned
from crmsync.targets.errors import Fatal, ParentMissing, RecordRejected, Retryable, SinkError
from crmsync.targets.retry import backoff

log = logging.getLogger(__name__)

#: How long a stop waits for the write in flight to end (the sinks held: only the requests
#: already sent are waited for) before giving it up; its records not acked are written again
#: after the next start. Short, so a Stop takes effect within a second even when a throttled
#: client or a target that does not answer keeps the write waiting.
STOP_GRACE_S = 0.5


class SourceRecord(Protocol):
    """What is kept of a source record (aiokafka's ConsumerRecord has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(slots=True)
class Item:
    """One source record in a batch, and what became of it."""

    record: SourceRecord
    planned: Planned | None = None
    error: SinkError | None = None  # refused: goes to the DLQ with this reason
    attempts: int = 0
    remaining: int = 0  # writes not yet confirmed
    parent_missing_since: float | None = None
    parked_shown: bool = False

    @property
    def done(self) -> bool:
        return self.remaining == 0


#: One write of one item, not confirmed yet.
Pending = tuple[Item, Write]


@dataclass
class _Parked:
    """The writes of one target record waiting for its parent, in order."""

    writes: list[Pending] = field(default_factory=list)
    retry_at: float = 0.0


def _identity(write: Write) -> tuple[str, ...]:
    record = write.record
    return (write.system, record.target, record.key)  # (system, *record.identity)


@dataclass
class Delivery:
    """The queues and parked writes of one worker's partitions, and the write loop."""

    sinks: Mapping[str, BatchingSink]
    #: Set while no write may start (stop, failure, revoke fence, shutdown).
    stopping: asyncio.Event
    parent_wait_s: float = 300.0
    retry_backoff_max_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    grace_s: float = STOP_GRACE_S
    workflow: str = "-"
    _queues: dict[tuple[str, int], deque[Item]] = field(default_factory=lambda: defaultdict(deque))
    _parked: dict[tuple[str, ...], _Parked] = field(default_factory=dict)

    @property
    def parked(self) -> int:
        return len(self._parked)

    def enqueue(self, records: Sequence[SourceRecord]) -> list[Item]:
        """Queues records (in offset order per partition) until written or refused."""
        items = [Item(record) for record in records]
        queues = self._queues
        queue, where = None, None
        for item in items:
            record = item.record
            # A batch holds each partition's records side by side: one queue look-up a run.
            if queue is None or where != (record.topic, record.partition):
                where = (record.topic, record.partition)
                queue = queues[where]
            queue.append(item)
        return items

    @staticmethod
    def identities(pending: Sequence[Pending]) -> frozenset[tuple[str, ...]]:
        """The target records `pending` writes (per-key order is kept by these)."""
        return frozenset(_identity(write) for _, write in pending)

    def forget(self) -> None:
        """Drops every queued and parked record: they will all be read again."""
        self._queues.clear()
        self._parked.clear()

    def acked(self) -> list[tuple[str, int, list[Item]]]:
        """Takes, per partition, the done records at the head of its queue, in offset order."""
        taken = []
        for (topic, partition), queue in self._queues.items():
            done = []
            while queue and queue[0].remaining == 0:
                done.append(queue.popleft())
            if done:
                taken.append((topic, partition, done))
        return taken

    def due(self) -> list[Pending]:
        """Takes the parked writes whose retry time has come, in their original order."""
        now = self.clock()
        due: list[Pending] = []
        for identity in [i for i, parked in self._parked.items() if parked.retry_at <= now]:
            due += self._parked.pop(identity).writes
        return due

    async def write(self, pending: list[Pending]) -> str | None:
        """Writes until every write is confirmed, refused or parked; retries the retryable with
        backoff until `stopping`. Returns the reason when a sink answered Fatal."""
        attempt = 0
        while pending and not self.stopping.is_set():
            if self._parked:
                # Records of a parked key wait behind it: their order is kept.
                for item, write in pending:
                    if _identity(write) in self._parked:
                        self._park(item, write)
                pending = [(i, w) for i, w in pending if _identity(w) not in self._parked]
                if not pending:
                    return None
            attempt += 1
            by_system: dict[str, list[Pending]] = defaultdict(list)
            for item, write in pending:
                by_system[write.system].append((item, write))
            started = self.clock()
            outcomes = await self._unless_stopped(
                asyncio.gather(
                    *(
                        self.sinks[system].write_batch([w.record for _, w in entries])
                        for system, entries in by_system.items()
                    )
                )
            )
            if outcomes is None:
                return None  # stopped mid-write: none of it is acked, all is written again later
            retry: list[Pending] = []
            wait: float | None = None
            for entries, results in zip(by_system.values(), outcomes, strict=True):
                for (item, write), outcome in zip(entries, results, strict=True):
                    item.attempts += 1
                    if outcome is None:
                        item.remaining -= 1
                    elif isinstance(outcome, Fatal):
                        return f"{write.system}: {outcome.reason}"
                    elif isinstance(outcome, ParentMissing):
                        self._parent_missing(item, write, outcome)
                    elif isinstance(outcome, Retryable):
                        retry.append((item, write))
                        if outcome.retry_after:
                            wait = max(wait or 0.0, outcome.retry_after)
                    else:  # RecordRejected
                        item.error = outcome
                        item.remaining -= 1
            log.debug(
                "event=batch_written workflow=%s records=%s retry=%s parked=%s seconds=%.3f",
                self.workflow,
                len(pending),
                len(retry),
                len(self._parked),
                self.clock() - started,
            )
            pending = retry
            if pending and not all(_identity(w) in self._parked for _, w in pending):
                await self.sleep(self._backoff(attempt, wait))
        return None

    async def sleep(self, seconds: float) -> None:
        """Waits, but a stop, a failure or shutdown ends the wait at once."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _unless_stopped(
        self, writes: asyncio.Future[list[list[Outcome]]]
    ) -> list[list[Outcome]] | None:
        """The sinks' outcomes, or None when a stop came first: a sink waiting out a long
        Retry-After must not hold a Stop up. The abandoned writes are not acked; writes are
        idempotent, so whatever of them reached the target is written again harmlessly."""
        stopping: asyncio.Future[bool] = asyncio.ensure_future(self.stopping.wait())
        contenders: set[asyncio.Future[object]] = {writes, stopping}  # type: ignore[arg-type]
        try:
            done, _ = await asyncio.wait(contenders, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if writes in done:
            return writes.result()
        # The sinks send nothing more: the requests under way get their answers and the rest
        # come back Halted, so the write ends with each record written or not (an exact
        # backlog). Only one still waiting after a short grace — a throttled client, a target
        # that does not answer — is given up.
        held = [sink for sink in self.sinks.values() if isinstance(sink, Holdable)]
        for sink in held:
            sink.hold()
        try:
            finished, _ = await asyncio.wait({writes}, timeout=self.grace_s)
            if writes in finished:
                return writes.result()
            writes.cancel()
            try:
                await writes
            except asyncio.CancelledError:
                pass
        finally:
            for sink in held:
                sink.release()
        log.info("event=write_abandoned workflow=%s reason=stopping", self.workflow)
        return None

    def _park(self, item: Item, write: Write) -> None:
        parked = self._parked.get(_identity(write))
        if parked is None:
            parked = self._parked[_identity(write)] = _Parked()
        parked.writes.append((item, write))

    def _parent_missing(self, item: Item, write: Write, outcome: ParentMissing) -> None:
        now = self.clock()
        item.parent_missing_since = item.parent_missing_since or now
        waited = now - item.parent_missing_since
        if waited >= self.parent_wait_s:
            item.error = RecordRejected(
                f"parent never arrived within {self.parent_wait_s:.0f}s: {outcome.reason}"
            )
            item.remaining -= 1
            return
        self._park(item, write)
        # Soon at first (the parent is usually in flight), then less often.
        self._parked[_identity(write)].retry_at = now + min(5.0, 0.5 + waited / 2)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after:
            return float(retry_after)
        return backoff(attempt, base_s=0.5, cap_s=self.retry_backoff_max_s)
