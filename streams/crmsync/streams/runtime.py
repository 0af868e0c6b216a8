"""One worker's run of one workflow: the gate, batches written then acked, DLQ, FAILED, stop/start.

A batch is written through the sinks while holding `lock`; a stop closes `gate` (no new write
starts), pauses the consumer and waits for the lock, so once STOPPED is reported nothing more
reaches the target. Events are acked only after the target confirmed them, in offset order per
partition, so Faust commits nothing that was not written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError
from faust.transport.consumer import RecordMap
from faust.types import TP

from crmsync.schemas.codec import DecodeError
from crmsync.schemas.registry import RegistryCodec, RegistryUnavailable, SchemaRegistry
from crmsync.streams import catalog, workflows
from crmsync.streams import config as configs
from crmsync.streams.consumer import PausableConsumer
from crmsync.streams.control_protocol import (
    ControlRecord,
    ReplayRequest,
    WorkerState,
    WorkerStatus,
)
from crmsync.streams.kafka import topics
from crmsync.streams.settings import Settings
from crmsync.streams.sinks.base import BatchingSink
from crmsync.targets.errors import Fatal, ParentMissing, RecordRejected, Retryable, SinkError
from crmsync.targets.retry import backoff

log = logging.getLogger(__name__)


@dataclass
class _Item:
    """One source record in a batch, and what became of it."""

    message: Any  # aiokafka ConsumerRecord
    planned: workflows.Planned | None = None
    error: SinkError | None = None  # rejected: goes to the DLQ with this reason
    attempts: int = 0
    remaining: int = 0  # writes not yet confirmed
    parent_missing_since: float | None = None

    @property
    def done(self) -> bool:
        return self.remaining == 0


#: How long a stop lets the write in flight finish before giving it up (its records are
#: written again after the next start). Short, so a Stop takes effect within a second even
#: when a slow target keeps a whole batch in flight.
_STOP_GRACE_S = 0.5


class _Abandoned(Exception):
    """The batch was given up because the workflow stopped; nothing of it is acked."""


@dataclass
class _Parked:
    """The writes of one target record waiting for its parent, in order."""

    writes: list[tuple[_Item, Any]] = field(default_factory=list)
    retry_at: float = 0.0


@dataclass
class WorkflowRuntime:
    name: str
    settings: Settings
    sinks: Mapping[str, BatchingSink]
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    consumer: PausableConsumer | None = None
    state: WorkerState = "STARTING"
    error: str | None = None
    generation: int = -1
    config_version: int = 0
    records_written: int = 0
    dead_lettered: int = 0
    replayed: str | None = None
    workflow: workflows.Workflow | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _producer: AIOKafkaProducer | None = None
    _registry: RegistryCodec | None = None
    _epoch: int = -1
    #: Fetched batches not yet handled, oldest first, and how many records they hold.
    _inbox: deque[tuple[int, RecordMap]] = field(default_factory=deque)
    _inbox_records: int = 0
    _inbox_ready: asyncio.Event = field(default_factory=asyncio.Event)
    _queues: dict[Any, deque[_Item]] = field(default_factory=lambda: defaultdict(deque))
    _parked: dict[tuple[str, ...], _Parked] = field(default_factory=dict)
    _applied: tuple[str, int, int] | None = None
    #: Set while no write may start: wakes retry waits at once.
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._producer = self.settings.kafka.producer(max_request_size=topics.DLQ_MAX_MESSAGE_BYTES)
        await self._producer.start()

    async def close(self) -> None:
        """Abandons any in-flight batch without acking it, then releases every resource."""
        self.close_gate()
        if self.workflow is not None:
            await self.workflow.stop()
        for sink in self.sinks.values():
            await sink.aclose()
        if self._registry is not None:
            await self._registry.registry.aclose()
        if self._producer is not None:
            await self.report(left=True)
            await self._producer.stop()

    # -- control protocol ------------------------------------------------------------------

    async def apply(self, record: ControlRecord | None) -> None:
        """Brings the worker to what the control record asks (the configured initial state
        when the control plane never wrote one)."""
        desired = record.desired if record else self.settings.initial_state
        generation = record.generation if record else 0
        version = record.active_version if record else 1
        if record is not None and record.replay is not None and desired == "stopped":
            await self._replay(record.replay)
        if self._applied == (desired, generation, version):
            return  # already there; a FAILED worker stays so until a new generation
        if desired == "stopped":
            await self._stop()
        else:
            raw = record.active_config if record else None
            await self._start(raw, version)
        self.generation = generation
        self._applied = (desired, generation, version)
        await self.report()

    def close_gate(self) -> None:
        self.gate.clear()
        self._stopping.set()

    async def _replay(self, request: ReplayRequest) -> None:
        """Moves this worker's partitions' committed offsets back, once per request id.

        Kafka refuses commits from outside a group that has members, and a stopped worker is
        still a member: so the workers commit the replayed offsets themselves.
        """
        if request.id == self.replayed:
            return
        if self._applied is None or self._applied[0] != "stopped":
            await self._stop()
        assert self.consumer is not None
        start = request.from_
        from_ms = None if start == "earliest" else _epoch_ms(start)
        await self.consumer.rewind(from_ms)
        self.replayed = request.id
        log.info("event=replayed workflow=%s replay=%s from=%s", self.name, request.id, start)
        await self.report()

    async def _stop(self) -> None:
        self.close_gate()
        assert self.consumer is not None
        await self.consumer.pause_all()
        async with self.lock:  # the in-flight write, if any, ends (or is abandoned) first
            pass
        await self.consumer.commit_now()
        self.state = "STOPPED"
        self.error = None
        log.info("event=stopped workflow=%s", self.name)

    async def _start(self, raw_config: Mapping[str, Any] | None, version: int) -> None:
        self.state = "STARTING"
        self.error = None
        await self.report()
        try:
            spec = catalog.spec(self.name)
            config = (
                spec.parse_config(raw_config) if raw_config is not None else spec.default_config()
            )
        except configs.ConfigError as error:
            await self.fail(f"invalid config version {version}: {error}")
            return
        new = spec.build(config, self.settings.kafka)
        if self.workflow is not None and set(new.source_topics()) != set(
            self.workflow.source_topics()
        ):
            await self.fail(
                "the new config reads other topics "
                f"({', '.join(sorted(new.source_topics()))}): restart the workers to apply it"
            )
            return
        async with self.lock:
            if self.workflow is not None:
                await self.workflow.stop()
            await new.start()
            self.workflow = new
            if self.settings.schema_registry_url:
                if self._registry is not None:
                    await self._registry.registry.aclose()
                self._registry = RegistryCodec(
                    new.schema, SchemaRegistry(self.settings.schema_registry_url)
                )
            self.config_version = version
            assert self.consumer is not None
            await self.consumer.seek_and_resume_all()
            self.state = "RUNNING"
            self._stopping.clear()
            self.gate.set()
        log.info("event=running workflow=%s config_version=%s", self.name, version)

    async def fail(self, reason: str) -> None:
        """FAILED: nothing further is written or acked; Start (a new generation) resumes."""
        self.close_gate()
        self.state = "FAILED"
        self.error = reason
        log.error("event=failed workflow=%s reason=%r", self.name, reason)
        if self.consumer is not None:
            await self.consumer.pause_all()
        await self.report()

    async def report(self, *, left: bool = False) -> None:
        """Publishes this worker's status + heartbeat (a tombstone when it leaves)."""
        if self._producer is None:
            return
        status = WorkerStatus(
            workflow=self.name,
            worker_id=self.worker_id,
            state=self.state,
            generation=self.generation,
            config_version=self.config_version,
            error=self.error,
            partitions=self._partitions(),
            records_written=self.records_written,
            dead_lettered=self.dead_lettered,
            replayed=self.replayed,
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        try:
            await self._producer.send_and_wait(
                topics.STATUS, None if left else status.encode(), key=status.key.encode()
            )
        except Exception as error:  # a status that cannot be sent must not stop the data path
            log.warning("event=status_not_sent workflow=%s error=%r", self.name, error)

    def _partitions(self) -> list[str]:
        if self.consumer is None:
            return []
        try:
            return sorted(f"{tp.topic}[{tp.partition}]" for tp in self.consumer.assignment())
        except Exception:  # not started yet
            return []

    # -- the data path ---------------------------------------------------------------------
    #
    # Every record read is queued per partition in offset order until it is written (or
    # dead-lettered), and acked only from the head of that queue: acking past a record that is
    # not written yet could let Faust commit past it (faust-streaming #606). A record whose
    # parent is missing is parked (with later records of its key), so it holds back only its
    # own partition's commit, never the writes of other records.

    def attach(self, consumer: PausableConsumer) -> None:
        """Takes the consumer's fetched batches; a full inbox holds its fetching back."""
        self.consumer = consumer
        consumer.deliver = self.deliver
        consumer.backlogged = self.backlogged

    def deliver(self, epoch: int, records: RecordMap) -> None:
        self._inbox.append((epoch, records))
        self._inbox_records += sum(len(batch) for batch in records.values())
        self._inbox_ready.set()

    def backlogged(self) -> bool:
        return self._inbox_records >= 4 * self.settings.batch_max_records

    async def run(self) -> None:
        """Handles the fetched batches as they come: up to `batch_max_records` at a time,
        waiting up to `batch_wait_s` for a batch to fill."""
        loop = asyncio.get_running_loop()
        while True:
            await self._inbox_ready.wait()
            deadline = loop.time() + self.settings.batch_wait_s
            while self._inbox_records < self.settings.batch_max_records:
                self._inbox_ready.clear()  # set again by the next delivery
                try:
                    await asyncio.wait_for(self._inbox_ready.wait(), deadline - loop.time())
                except TimeoutError:
                    break
            epoch, records = self._take()
            if records:
                await self.handle_batch(epoch, records)

    def _take(self) -> tuple[int, list[Any]]:
        """The oldest batches of one fetch epoch, up to `batch_max_records` records."""
        epoch = -1
        taken: list[Any] = []
        while self._inbox:
            batch_epoch, records = self._inbox[0]
            size = sum(len(batch) for batch in records.values())
            full = len(taken) + size > self.settings.batch_max_records
            if taken and (batch_epoch != epoch or full):
                break
            self._inbox.popleft()
            self._inbox_records -= size
            epoch = batch_epoch
            for batch in records.values():
                taken += batch
        if self._inbox:
            self._inbox_ready.set()
        else:
            self._inbox_ready.clear()
        return epoch, taken

    async def handle_batch(self, epoch: int, records: Sequence[Any]) -> None:
        """Writes one batch (after any parked records that are due), then acks what it can.

        `records` were fetched in `epoch`; when a stop, start or rebalance came since, they
        are dropped (read again from the commit). An unexpected error turns the workflow
        FAILED with the reason (nothing of the batch is acked past it) instead of ending the
        worker's data path silently.
        """
        try:
            await self._handle_batch(epoch, records)
        except _Abandoned:
            return  # stopped while waiting: nothing of the batch was acked, all is read again
        except Exception as error:
            log.exception("event=batch_failed workflow=%s", self.name)
            await self.fail(f"unexpected {type(error).__name__}: {error}")

    async def _handle_batch(self, epoch: int, records: Sequence[Any]) -> None:
        async with self.lock:
            if not self.gate.is_set() or self.workflow is None or self.consumer is None:
                return  # read again after the next start: never acked here
            current = self.consumer.fetch_epoch
            if current != self._epoch:  # a stop, start or rebalance: the queues are stale
                self._forget_pending(current)
            if epoch != current:
                return
            items = [_Item(record) for record in records]
            for item in items:
                self._queues[(item.message.topic, item.message.partition)].append(item)
            await self._plan(items)
            if not self.gate.is_set():
                return  # FAILED while planning
            pending = self._due_parked() + [
                (item, write)
                for item in items
                if item.planned is not None
                for write in item.planned.writes
            ]
            await self._write(pending)
            await self._ack_ready()

    async def tick(self) -> None:
        """Retries parked records that are due when no new batch arrives to carry them."""
        if not self._parked or not self.gate.is_set():
            return
        async with self.lock:
            if not self.gate.is_set() or self.consumer is None:
                return
            if self.consumer.fetch_epoch != self._epoch:
                self._forget_pending(self.consumer.fetch_epoch)
                return
            due = self._due_parked()
            if due:
                await self._write(due)
                await self._ack_ready()

    def _forget_pending(self, epoch: int) -> None:
        """Drops queued and parked records: they will all be read again from the commit."""
        self._queues.clear()
        self._parked.clear()
        if self.workflow is not None:
            self.workflow.forget_pending()
        self._epoch = epoch

    async def _plan(self, items: list[_Item]) -> None:
        assert self.workflow is not None
        decoded: list[tuple[_Item, str, dict[str, Any]]] = []
        for item in items:
            if item.message.value is None:
                # A tombstone (a deleted key, for compaction): the delete event before it
                # carried the change, so there is nothing to write.
                item.planned = workflows.Planned([])
                continue
            try:
                value = await self._decode(item.message.value)
            except DecodeError as error:
                item.error = RecordRejected(f"undecodable: {error}")
            except _Abandoned:
                raise
            except Exception as error:  # bytes that trip the decoder are the record's fault
                item.error = RecordRejected(f"undecodable: {type(error).__name__}: {error}")
            else:
                decoded.append((item, item.message.topic, value))
        planned = await self.workflow.plan([(topic, value) for _, topic, value in decoded])
        for (item, _, _), plan in zip(decoded, planned, strict=True):
            if isinstance(plan.commit, Fatal):
                await self.fail(plan.commit.reason)
                return
            if isinstance(plan.commit, SinkError):  # the mapping refused it
                item.error = plan.commit
                continue
            item.planned = plan
            item.remaining = len(plan.writes)

    async def _decode(self, data: bytes) -> dict[str, Any]:
        """Decodes one value; a schema registry that cannot answer is waited for (with
        backoff, for as long as the workflow runs) rather than blamed on the record."""
        assert self.workflow is not None
        if self._registry is None:
            return self.workflow.schema.decode(data)
        attempt = 0
        while True:
            try:
                return await self._registry.decode(data)
            except RegistryUnavailable as error:
                attempt += 1
                log.warning(
                    "event=registry_unavailable workflow=%s attempt=%s error=%r",
                    self.name,
                    attempt,
                    error,
                )
                await self._sleep_unless_stopped(self._backoff(attempt, None))
                if not self.gate.is_set():
                    raise _Abandoned from None

    def _due_parked(self) -> list[tuple[_Item, Any]]:
        """Takes the parked writes whose retry time has come, in their original order."""
        now = time.monotonic()
        due: list[tuple[_Item, Any]] = []
        for identity in [i for i, parked in self._parked.items() if parked.retry_at <= now]:
            due += self._parked.pop(identity).writes
        return due

    def _park(self, item: _Item, write: Any) -> None:
        identity = (write.system, *write.record.identity)
        parked = self._parked.get(identity)
        if parked is None:
            parked = self._parked[identity] = _Parked()
        parked.writes.append((item, write))

    async def _write(self, pending: list[tuple[_Item, Any]]) -> None:
        """Writes until every write is confirmed, rejected or parked; retries the retryable
        with backoff while the workflow runs (a stop ends the wait at once)."""
        attempt = 0
        while pending and self.gate.is_set():
            # Records of a parked key wait behind it: their order is kept.
            waiting = [(i, w) for i, w in pending if (w.system, *w.record.identity) in self._parked]
            for item, write in waiting:
                self._park(item, write)
            pending = [
                (i, w) for i, w in pending if (w.system, *w.record.identity) not in self._parked
            ]
            if not pending:
                return
            attempt += 1
            by_system: dict[str, list[tuple[_Item, Any]]] = defaultdict(list)
            for item, write in pending:
                by_system[write.system].append((item, write))
            started = time.monotonic()
            outcomes = await self._unless_stopped(
                asyncio.gather(
                    *(
                        self.sinks[system].write_batch([w.record for _, w in entries])
                        for system, entries in by_system.items()
                    )
                )
            )
            if outcomes is None:
                return  # stopped mid-write: none of it is acked, all is written again later
            retry: list[tuple[_Item, Any]] = []
            wait: float | None = None
            for entries, results in zip(by_system.values(), outcomes, strict=True):
                for (item, write), outcome in zip(entries, results, strict=True):
                    item.attempts += 1
                    if outcome is None:
                        item.remaining -= 1
                    elif isinstance(outcome, Fatal):
                        await self.fail(f"{write.system}: {outcome.reason}")
                        return
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
                self.name,
                len(pending),
                len(retry),
                len(self._parked),
                time.monotonic() - started,
            )
            pending = retry
            if pending and not all(
                (w.system, *w.record.identity) in self._parked for _, w in pending
            ):
                await self._sleep_unless_stopped(self._backoff(attempt, wait))

    async def _unless_stopped(self, writes: asyncio.Future[list[Any]]) -> list[Any] | None:
        """The sinks' outcomes, or None when a stop came first: a sink waiting out a long
        Retry-After must not hold a Stop up. The abandoned writes are not acked; writes are
        idempotent, so whatever of them reached the target is written again harmlessly."""
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        contenders: set[asyncio.Future[Any]] = {writes, stopping}
        try:
            done, _ = await asyncio.wait(contenders, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if writes in done:
            return writes.result()
        # A write that is under way ends normally (so the stop leaves an exact backlog); only
        # one still waiting after a short grace — a throttled client — is given up.
        finished, _ = await asyncio.wait({writes}, timeout=_STOP_GRACE_S)
        if writes in finished:
            return writes.result()
        writes.cancel()
        try:
            await writes
        except asyncio.CancelledError:
            pass
        log.info("event=write_abandoned workflow=%s reason=stopping", self.name)
        return None

    def _parent_missing(self, item: _Item, write: Any, outcome: ParentMissing) -> None:
        now = time.monotonic()
        item.parent_missing_since = item.parent_missing_since or now
        waited = now - item.parent_missing_since
        if waited >= self.settings.parent_wait_s:
            item.error = RecordRejected(
                f"parent never arrived within {self.settings.parent_wait_s:.0f}s: {outcome.reason}"
            )
            item.remaining -= 1
            return
        self._park(item, write)
        identity = (write.system, *write.record.identity)
        # Soon at first (the parent is usually in flight), then less often.
        self._parked[identity].retry_at = now + min(5.0, 0.5 + waited / 2)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after:
            return float(retry_after)
        return backoff(attempt, base_s=0.5, cap_s=self.settings.retry_backoff_max_s)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        """Waits, but a stop, a failure or shutdown ends the wait at once."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _ack_ready(self) -> None:
        """Dead-letters and commits each partition's written records from the head, then
        tells the consumer how far each partition is written."""
        assert self.consumer is not None
        for (topic, partition), queue in self._queues.items():
            written = None
            while queue and queue[0].done:
                item = queue.popleft()
                if item.error is not None:
                    await self._dead_letter(item)
                elif item.planned is not None:
                    if item.planned.commit is not None:
                        await item.planned.commit()
                    if item.planned.writes:
                        self.records_written += 1
                written = item.message.offset
            if written is not None:
                self.consumer.acknowledge(TP(topic, partition), written + 1)

    async def _dead_letter(self, item: _Item) -> None:
        assert self._producer is not None and item.error is not None
        message = item.message
        headers = [
            ("crmsync.workflow", self.name),
            ("crmsync.source.topic", message.topic),
            ("crmsync.source.partition", str(message.partition)),
            ("crmsync.source.offset", str(message.offset)),
            ("crmsync.error.class", type(item.error).__name__),
            ("crmsync.error.message", item.error.reason[:2000]),
            ("crmsync.attempts", str(item.attempts)),
            ("crmsync.time", datetime.now(UTC).isoformat()),
        ]
        value = message.value
        try:
            await self._producer.send_and_wait(
                topics.dead_letters(self.name),
                value,
                key=message.key,
                headers=[(k, v.encode()) for k, v in headers],
            )
        except (MessageSizeTooLargeError, RecordTooLargeError):
            # Larger than even the dead-letter topic takes: keep the context, point at the
            # original (still in its source topic at the offset above), drop the bytes.
            headers.append(("crmsync.value.omitted", str(len(value or b""))))
            await self._producer.send_and_wait(
                topics.dead_letters(self.name),
                b"",
                key=message.key,
                headers=[(k, v.encode()) for k, v in headers],
            )
        self.dead_lettered += 1
        log.warning(
            "event=dead_lettered workflow=%s topic=%s partition=%s offset=%s error=%r",
            self.name,
            message.topic,
            message.partition,
            message.offset,
            item.error.reason,
        )


def _epoch_ms(iso_time: str) -> int:
    moment = datetime.fromisoformat(iso_time.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
