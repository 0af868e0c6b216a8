"""A Faust consumer whose stop holds: partitions stay paused through rebalances and back-pressure.

Faust's own pause only edits its set of active partitions, and several paths put partitions back
into that set (rebalances, table recovery, back-pressure), while records already fetched for a
paused partition are dropped after aiokafka's position moved past them. Here a stop pauses the
partitions inside aiokafka itself, keeps polling so the member never leaves the group, and a start
seeks every partition to its committed offset before anything is read again. A fetch epoch, bumped
at each stop, start and assignment, lets the runtime drop records fetched before the last seek.

Records skip Faust's per-message path (conductor, Event per record, streams): each fetched batch
goes whole, as one event, into the workflow agent's channel, and the runtime reports, per
partition, the offset up to which everything is written; Faust's commit timer and the commits on
stop and shutdown commit exactly that. Batches queued for the agent hold fetching back the way a
stop does, so a slow target never makes the member leave the group.

Faust never calls aiokafka's own pause/resume, and a stopped consumer fetches nothing whatever
Faust's set of active partitions says (`_wait_next_records`): so Faust's paths that resume
partitions (rebalance, table recovery, back-pressure) need no override here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import aiokafka
from faust.transport.consumer import RecordMap
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message


class Fetched(NamedTuple):
    """One fetched batch: the fetch epoch it was read in, its records per partition, how many,
    and the group generation it was read in (Faust's stream drops a batch of an older one)."""

    epoch: int
    records: RecordMap
    size: int
    generation: int = 0


#: Takes each fetched batch (to the agent's channel).
Deliver = Callable[[Fetched], Awaitable[None]]

log = logging.getLogger(__name__)

#: A partition no consumer is assigned: fetching it polls aiokafka without consuming anything.
_NO_PARTITION = cast(TP, aiokafka.TopicPartition("crmsync.no-partition", -1))


class _RebalanceListener(faust_aiokafka.ConsumerRebalanceListener):
    """Pauses newly assigned partitions inside aiokafka before they are fetched, when stopped."""

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        consumer = cast(PausableConsumer, self._thread.consumer)
        assigned = list(assigned)
        consumer.fetch_epoch += 1  # batches fetched before the rebalance are dropped
        if consumer.stopped and assigned:
            # Runs on the consumer thread, so aiokafka is called from its own loop.
            self._thread._ensure_consumer().pause(*assigned)
            log.info("event=assigned_paused partitions=%s", _names(assigned))
        await super().on_partitions_assigned(assigned)


class PausableConsumer(faust_aiokafka.Consumer):
    """The workflow's consumer: `pause_all()` / `seek_and_resume_all()` are the stop and start."""

    RebalanceListener = _RebalanceListener

    stopped: bool = False
    fetch_epoch: int = 0
    #: Where fetched batches go (the agent's channel); set before the app starts.
    deliver: Deliver | None = None
    #: True while the agent has enough batches queued: fetching waits, polling goes on.
    backlogged: Callable[[], bool] = staticmethod(lambda: False)

    def verify_event_path(self, now: float, tp: TP) -> None:
        # Faust's livelock detector watches its own stream path, which the batches delivered
        # here do not take: it would report every partition idle. A stuck partition shows as
        # a stalled backlog on the control plane instead.
        return None

    async def _wait_next_records(
        self,
        timeout: float,  # noqa: ASYNC109 - Faust's signature
    ) -> tuple[RecordMap | None, set[TP] | None]:
        if not self.flow_active and not self.stopped:
            # Faust's own wait for the flow (stopped by a rebalance until recovery has sought
            # the committed offsets), outside the fetch lock: the seek takes the lock, and an
            # epoch read before it would drop the first records fetched after it — records of
            # the sought positions, never read again.
            await self.wait(self.can_resume_flow)  # type: ignore[arg-type]
        # One fetch at a time, never during a seek: a fetch running while the position is
        # moved would consume records from the new position that the epoch check then drops.
        async with self._fetch_lock():
            epoch = self.fetch_epoch
            # Stopped wins over Faust's active set, which rebalances and recovery refill.
            waiting = not self.stopped and self.backlogged()
            idle = (
                self.stopped or waiting or (self.flow_active and not self._get_active_partitions())
            )
            if idle:
                # Nothing to fetch: stopped, or the runtime's inbox is full (a slow or
                # unreachable target). Faust would only sleep, the max-poll-interval timer
                # would run out and the member would leave the group: keep calling aiokafka
                # instead. Asking for a partition nobody has returns nothing and consumes
                # nothing (an empty set would mean every partition).
                if self.assignment():
                    # A full inbox is looked at again soon: it drains a batch at a time.
                    wait = min(timeout, 0.02 if waiting else 1.0)
                    await self._getmany(active_partitions={_NO_PARTITION}, timeout=wait)
                else:
                    await self.sleep(1)
                return {}, set()
            if not self.flow_active:
                return {}, set()  # stopped again since: back to the wait above
            records, active = await super()._wait_next_records(timeout)
            if epoch != self.fetch_epoch:
                return {}, active  # fetched across a stop: read again after the next start
            return records, active

    def _fetch_lock(self) -> asyncio.Lock:
        lock: asyncio.Lock | None = self.__dict__.get("_crmsync_fetch_lock")
        if lock is None:
            lock = self.__dict__["_crmsync_fetch_lock"] = asyncio.Lock()
        return lock

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:  # noqa: ASYNC109
        """Hands each fetched batch to `deliver` whole; yields nothing to Faust's per-message
        loop (which only keeps calling this)."""
        records, _ = await self._wait_next_records(timeout)
        epoch = self.fetch_epoch
        if records and not self.should_stop and self.flow_active and not self.stopped:
            assert self.deliver is not None, "deliver must be set before the app starts"
            count = 0
            for tp, batch in records.items():
                self._read_offset[tp] = batch[-1].offset
                count += len(batch)
            generation = self.app.consumer_generation_id
            await self.deliver(Fetched(epoch, records, size=count, generation=generation))
        return
        yield  # an async generator, as Faust's fetch loop expects

    def acknowledge(self, tp: TP, next_offset: int) -> None:
        """Everything of `tp` below `next_offset` is written: commit up to it."""
        committed = self._committed_offset[tp]
        if committed is not None and next_offset <= committed:
            return
        if next_offset > self._written.get(tp, -1):
            self._written[tp] = next_offset

    def forget_acks(self, tps: Iterable[TP]) -> None:
        """Partitions revoked: what was acked of them is not committed by this member."""
        for tp in tps:
            self._written.pop(tp, None)

    @property
    def _written(self) -> dict[TP, int]:
        written: dict[TP, int] | None = self.__dict__.get("_crmsync_written")
        if written is None:
            written = self.__dict__["_crmsync_written"] = {}
        return written

    # Faust's commit (timer, stop, shutdown) reads these two: acks are offsets, not messages.
    def _filter_tps_with_pending_acks(self, topics: Iterable[Any] | None = None) -> Iterator[TP]:
        wanted = None if topics is None else set(topics)
        return iter(
            [tp for tp in self._written if wanted is None or tp in wanted or tp.topic in wanted]
        )

    def _new_offset(self, tp: TP) -> int | None:
        return self._written.pop(tp, None)

    async def pause_all(self) -> set[TP]:
        """Stops fetching every assigned partition; they stay paused until seek_and_resume_all."""
        self.stopped = True
        self.fetch_epoch += 1
        self._get_active_partitions().clear()
        self._buffered_partitions.clear()
        paused: set[TP] = await self._thread.call_thread(self._pause_in_thread)
        log.info("event=paused partitions=%s", _names(paused))
        return paused

    async def _pause_in_thread(self) -> set[TP]:
        consumer = self._thread._ensure_consumer()
        assigned = consumer.assignment()
        if assigned:
            consumer.pause(*assigned)
        return set(assigned)

    async def seek_and_resume_all(self) -> Mapping[TP, int]:
        """Seeks every assigned partition to its committed offset, then resumes it.

        Records fetched before the stop must not be skipped: the position of a paused partition
        may be past records that were never processed. Returns the positions resumed from.
        """
        async with self._fetch_lock():
            self.fetch_epoch += 1  # what was fetched before the seek is dropped downstream
            positions: dict[TP, int] = await self._thread.call_thread(self._seek_in_thread)
        for tp, offset in positions.items():
            self._written.pop(tp, None)
            self._read_offset[tp] = offset if offset else None
            self._committed_offset[tp] = offset if offset else None
        self.stopped = False
        # Faust's own pause (table recovery pauses every assigned partition) was refused a
        # resume while stopped: lift it too, or the partitions would never be active again.
        self._paused_partitions.difference_update(positions)
        self._set_active_tps(self.assignment())
        log.info(
            "event=resumed partitions=%s",
            ",".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(positions.items())),
        )
        return positions

    async def _seek_in_thread(self, resume: bool = True) -> dict[TP, int]:
        consumer = self._thread._ensure_consumer()
        assigned = list(consumer.assignment())
        positions: dict[TP, int] = {}
        for tp in assigned:
            committed = await consumer.committed(tp)
            if committed is None or committed < 0:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
        if assigned and resume:
            consumer.resume(*assigned)
        for tp in assigned:
            positions[cast(TP, tp)] = await consumer.position(tp)
        return positions

    async def perform_seek(self) -> None:
        """After a rebalance (Faust's recovery calls this before fetching resumes): every
        assigned partition back to its committed offset, the beginning where none was
        committed, and what was fetched before dropped.

        Faust's own version goes through aiokafka's `seek_to_committed`, which leaves a
        partition with no commit (or a commit of 0) where it is. aiokafka starts fetching a new
        assignment before recovery runs, so a batch fetched in between — dropped by the fetch
        epoch, or by Faust's stream as of an older generation — had moved such a partition's
        position past records never written: they were never read again, and the partition's
        lag never reached 0. Partitions paused while stopped stay paused.
        """
        async with self._fetch_lock():
            self.fetch_epoch += 1
            positions: dict[TP, int] = await self._thread.call_thread(self._seek_in_thread, False)
        for tp, offset in positions.items():
            self._read_offset[tp] = offset if offset else None
            self._committed_offset[tp] = offset if offset else None
        log.info(
            "event=sought_committed partitions=%s",
            ",".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(positions.items())),
        )

    async def rewind(self, from_ms: int | None) -> dict[TP, int]:
        """Commits, for every assigned partition, the offset of the first record at or after
        `from_ms` (None = the earliest kept), straight through aiokafka: Faust only commits
        offsets above what it believes committed. Only while stopped."""
        if not self.stopped:
            raise RuntimeError("a replay needs the workflow stopped")
        async with self._fetch_lock():
            offsets: dict[TP, int] = await self._thread.call_thread(self._rewind_in_thread, from_ms)
            for tp, offset in offsets.items():
                self._written.pop(tp, None)
                self._read_offset[tp] = offset if offset else None
                self._committed_offset[tp] = offset if offset else None
        log.info(
            "event=rewound partitions=%s",
            ",".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(offsets.items())),
        )
        return offsets

    async def _rewind_in_thread(self, from_ms: int | None) -> dict[TP, int]:
        consumer = self._thread._ensure_consumer()
        assigned = list(consumer.assignment())
        if not assigned:
            return {}
        if from_ms is None:
            offsets = dict(await consumer.beginning_offsets(assigned))
        else:
            ends = await consumer.end_offsets(assigned)
            found = await consumer.offsets_for_times({tp: from_ms for tp in assigned})
            offsets = {tp: found[tp].offset if found.get(tp) else ends[tp] for tp in assigned}
        await consumer.commit({tp: offset for tp, offset in offsets.items()})
        return {cast(TP, tp): offset for tp, offset in offsets.items()}

    async def commit_now(self) -> bool:
        """Commits every acked offset at once (a stop must leave the group's lag exact)."""
        return await self.commit()


class PausableTransport(faust_aiokafka.Transport):
    """The aiokafka transport with the pausable consumer."""

    Consumer = PausableConsumer


def _names(tps: Iterable[Any]) -> str:
    return ",".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)) or "-"
