"""One worker's run of one workflow: the control protocol, planning, and acks to the consumer.

A batch is planned and its write started while holding `lock`; with a workflow's
`writes_in_flight` above one the write then goes on outside it (that many side by side, never two
on one target record), so the next batch is planned and sent while the target answers. A stop
closes `gate` (no new write starts), pauses the consumer and waits for the lock and every write
in flight, so once STOPPED is reported nothing more reaches the target. The ordering and
at-least-once rules are `delivery.Delivery`'s; records are acked only after the target confirmed
them, in offset order per partition, so Faust commits nothing that was not written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from faust.types import TP

from crmsync.schemas.codec import DecodeError
from crmsync.schemas.registry import RegistryCodec, RegistryUnavailable, SchemaRegistry
from crmsync.streams import catalog, drift, outcomes, workflows
from crmsync.streams import config as configs
from crmsync.streams.consumer import Fetched, PausableConsumer
from crmsync.streams.control_protocol import (
    ControlRecord,
    DriftBaseline,
    ReplayRequest,
    WorkerState,
    WorkerStatus,
)
from crmsync.streams.delivery import Delivery, Item, Pending, SourceRecord
from crmsync.streams.kafka import topics
from crmsync.streams.publishers import DeadLetters, Outcomes, StatusReports
from crmsync.streams.settings import Settings
from crmsync.streams.sinks.base import BatchingSink
from crmsync.targets.errors import Fatal, RecordRejected
from crmsync.targets.retry import backoff

log = logging.getLogger(__name__)


#: Batches the agent's channel holds before fetching waits (small fetches of a quiet topic).
_QUEUED_BATCHES_MAX = 32
#: Full batches it holds before fetching waits: two of the agent's takes (four batches each),
#: so the next take is fetched while one is being written.
_QUEUED_FULL_BATCHES = 8


@dataclass(eq=False)
class _InFlight:
    """A batch being written outside the lock, and the target records it writes."""

    task: asyncio.Task[None]
    pending: list[Pending]
    _identities: frozenset[tuple[str, ...]] | None = None

    @property
    def identities(self) -> frozenset[tuple[str, ...]]:
        """Made only when a batch comes while this one is in flight (mostly it has ended)."""
        if self._identities is None:
            self._identities = Delivery.identities(self.pending)
        return self._identities


class _Abandoned(Exception):
    """The batch was given up because the workflow stopped; nothing of it is acked."""


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
    #: Who stopped it: "operator" (a Stop) or "drift" (the targets changed; see drift.py).
    stopped_by: Literal["operator", "drift"] | None = None
    drift_reason: str | None = None
    drift_watch: drift.DriftWatch | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _producer: AIOKafkaProducer | None = None
    _dead_letters: DeadLetters | None = None
    _status: StatusReports | None = None
    _outcomes: Outcomes | None = None
    _registry: RegistryCodec | None = None
    _epoch: int = -1
    #: Fetched batches put into the agent's channel and not taken yet, and their records; only
    #: those of the latest group generation (Faust's stream drops the older ones untaken).
    _queued_batches: int = 0
    _queued_records: int = 0
    _queued_generation: int = -1
    _applied: tuple[str, int, int] | None = None
    #: Set while no write may start: wakes retry waits at once.
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _delivery: Delivery = field(init=False)
    _baseline_task: asyncio.Task[None] | None = None
    #: What the control record keeps of the shapes the active config was first started with.
    _kept_baseline: DriftBaseline | None = None
    #: Writes in flight outside the lock, oldest first (`writes_in_flight` above one).
    _in_flight: list[_InFlight] = field(default_factory=list)
    _settling: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._delivery = Delivery(
            self.sinks,
            self._stopping,
            parent_wait_s=self.settings.parent_wait_s,
            retry_backoff_max_s=self.settings.retry_backoff_max_s,
            workflow=self.name,
        )
        if self.drift_watch is None and self.settings.drift_check_s > 0:
            self.drift_watch = drift.DriftWatch(
                self.name, self.settings.dynamics, self.settings.campaign
            )

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._producer = self.settings.kafka.producer(max_request_size=topics.DLQ_MAX_MESSAGE_BYTES)
        await self._producer.start()
        self._dead_letters = DeadLetters(self._producer, self.name)
        self._status = StatusReports(self._producer)
        if self.settings.trace_outcomes:
            self._outcomes = Outcomes(self._producer, self.name, self.worker_id)

    async def close(self) -> None:
        """Abandons any in-flight batch without acking it, then releases every resource."""
        self.close_gate()
        if self._baseline_task is not None:
            self._baseline_task.cancel()
        await self._settle()
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
        self._kept_baseline = record.drift_baseline if record else None
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
        async with self.lock:  # the writes in flight, if any, end (or are abandoned) first
            await self._settle()
        await self.consumer.commit_now()
        self.state = "STOPPED"
        self.error = None
        self.stopped_by, self.drift_reason = "operator", None
        log.info("event=stopped workflow=%s", self.name)

    async def _start(self, raw_config: Mapping[str, Any] | None, version: int) -> None:
        self.state = "STARTING"
        self.error = None
        self.stopped_by = self.drift_reason = None
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
        kept = self._kept_baseline
        shapes = kept.shapes if kept is not None and kept.version == version else None
        early: list[drift.Difference] | None = None
        if self.drift_watch is not None and shapes:
            # This config ran before (a restart, a new worker, a Start after a Stop): compared
            # with what it was first started with before the first write, so a field narrowed
            # while no worker ran stops it here.
            early = await self._baseline(config, shapes)
        async with self.lock:
            await self._settle()
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
            if early is not None and drift.breaking(early):
                await self._drift_stop(early)
                return
        log.info("event=running workflow=%s config_version=%s", self.name, version)
        if self.drift_watch is not None and early is None:
            # Off the Start's path (the control plane checked the targets before this Start):
            # what the targets show now is the baseline later checks compare with. Also when
            # the targets did not answer the check above: taken as soon as they do.
            if self._baseline_task is not None:
                self._baseline_task.cancel()
            self._baseline_task = asyncio.create_task(self._take_baseline(config, shapes))

    async def _baseline(
        self, config: configs.WorkflowConfig, shapes: Mapping[str, str] | None
    ) -> list[drift.Difference] | None:
        assert self.drift_watch is not None
        try:
            return await self.drift_watch.baseline(config, shapes)
        except Exception:  # a drift check never takes the worker down
            log.exception("event=drift_baseline_failed workflow=%s", self.name)
            return None

    async def _take_baseline(
        self, config: configs.WorkflowConfig, shapes: Mapping[str, str] | None
    ) -> None:
        found = await self._baseline(config, shapes)
        if found is not None and drift.breaking(found):
            async with self.lock:
                if self.gate.is_set():
                    await self._drift_stop(found)

    async def fail(self, reason: str) -> None:
        """FAILED: nothing further is written or acked; Start (a new generation) resumes."""
        self.close_gate()
        self.state = "FAILED"
        self.error = reason
        log.error("event=failed workflow=%s reason=%r", self.name, reason)
        if self.consumer is not None:
            await self.consumer.pause_all()
        await self.report()

    async def check_drift(self) -> None:
        """The periodic drift check: on a breaking difference the workflow stops itself before
        its next write (the write in flight, holding the lock, ends first)."""
        if self.drift_watch is None or not self.gate.is_set():
            return
        if self._baseline_task is not None and not self._baseline_task.done():
            return
        found = await self.drift_watch.check()
        if drift.breaking(found):
            async with self.lock:
                if self.gate.is_set():
                    await self._drift_stop(found)

    async def _drift_stop(self, found: list[drift.Difference]) -> None:
        """STOPPED by drift, with the lock held: nothing of the batch in hand is acked or
        dead-lettered (it is read again after the next Start), the commit stays at what was
        written and acked before."""
        self.close_gate()
        assert self.consumer is not None
        await self.consumer.pause_all()
        await self._settle()
        self._forget_pending(self.consumer.fetch_epoch)
        await self.consumer.commit_now()
        self.state = "STOPPED"
        self.error = None
        self.stopped_by, self.drift_reason = "drift", drift.reason(found)
        log.warning("event=stopped_by_drift workflow=%s reason=%r", self.name, self.drift_reason)
        await self.report()

    async def report(self, *, left: bool = False) -> None:
        """Publishes this worker's status + heartbeat (a tombstone when it leaves)."""
        if self._status is None:
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
            stopped_by=self.stopped_by if self.state == "STOPPED" else None,
            reason=self.drift_reason if self.state == "STOPPED" else None,
            drift=[d.as_dict() for d in self.drift_watch.differences] if self.drift_watch else [],
            baseline=self._baseline_report(),
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        await self._status.send(status, left=left)

    def _baseline_report(self) -> DriftBaseline | None:
        shapes = self.drift_watch.shapes() if self.drift_watch is not None else {}
        return DriftBaseline(version=self.config_version, shapes=shapes) if shapes else None

    def _partitions(self) -> list[str]:
        if self.consumer is None:
            return []
        try:
            return sorted(f"{tp.topic}[{tp.partition}]" for tp in self.consumer.assignment())
        except Exception:  # not started yet
            return []

    # -- the data path ---------------------------------------------------------------------

    def attach(self, consumer: PausableConsumer) -> None:
        """Takes the consumer; batches queued for the agent hold its fetching back."""
        self.consumer = consumer
        consumer.backlogged = self.backlogged

    def queued(self, records: int, generation: int = 0) -> None:
        """A fetched batch of `records` was put into the agent's channel.

        Batches of an older group generation still in the channel never reach the agent
        (Faust's stream skips them after a rebalance): they stop counting, or their count
        would hold fetching back for good once it reached the limit."""
        if generation < self._queued_generation:
            return
        if generation > self._queued_generation:
            self._queued_generation = generation
            self._queued_records = self._queued_batches = 0
        self._queued_records += records
        self._queued_batches += 1

    def backlogged(self) -> bool:
        return (
            self._queued_records >= _QUEUED_FULL_BATCHES * self.settings.batch_max_records
            or self._queued_batches >= _QUEUED_BATCHES_MAX
        )

    async def handle_fetched(self, fetched: Sequence[Fetched]) -> None:
        """Writes what the agent took from its channel: same-epoch batches merged up to
        `batch_max_records`, in the order they were fetched."""
        for batch in fetched:
            if batch.generation == self._queued_generation:
                self._queued_records -= batch.size
                self._queued_batches -= 1
        for epoch, records in merge(fetched, self.settings.batch_max_records):
            await self.handle_batch(epoch, records)

    async def resync(self) -> None:
        """The agent (re)starts: what it had not written is forgotten and, while running, every
        partition is read again from its commit (a restarted agent never waits on batches its
        crashed predecessor took; those were uncounted when taken)."""
        if not self.gate.is_set() or self.consumer is None:
            return  # the next Start seeks to the commit anyway
        async with self.lock:
            await self._settle()
            await self.consumer.seek_and_resume_all()
            self._forget_pending(self.consumer.fetch_epoch)
        log.info("event=agent_resynced workflow=%s", self.name)

    async def fence(self, revoked: Iterable[TP]) -> None:
        """Before a rebalance goes on: the write in flight gets a stop's short grace, else it
        is abandoned (not acked), and nothing more is written or acked for `revoked`; what
        another member now owns is never written over by this one."""
        revoked = set(revoked)
        # The batches still in the agent's channel stay there (and are counted until the agent
        # takes them); fetched before the rebalance, they are dropped when taken.
        if self.consumer is not None:
            self.consumer.fetch_epoch += 1  # batches fetched before are dropped
        running = self.gate.is_set()
        self._stopping.set()
        try:
            async with self.lock:
                await self._settle()
                if self.consumer is not None:
                    self.consumer.forget_acks(revoked)
                self._forget_pending(self._epoch)
        finally:
            if running and self.gate.is_set():
                self._stopping.clear()
        log.info("event=revoke_fenced workflow=%s partitions=%s", self.name, len(revoked))

    async def handle_batch(self, epoch: int, records: Sequence[SourceRecord]) -> None:
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

    async def _handle_batch(self, epoch: int, records: Sequence[SourceRecord]) -> None:
        async with self.lock:
            if not self.gate.is_set() or self.workflow is None or self.consumer is None:
                return  # read again after the next start: never acked here
            current = self.consumer.fetch_epoch
            if current != self._epoch:  # a stop, start or rebalance: the queues are stale
                self._forget_pending(current)
            if epoch != current:
                return
            items = self._delivery.enqueue(records)
            await self._plan(items)
            if not self.gate.is_set():
                return  # FAILED while planning
            pending = self._delivery.due() + [
                (item, write)
                for item in items
                if item.planned is not None
                for write in item.planned.writes
            ]
            most = self.workflow.writes_in_flight
            if most <= 1:
                await self._write(pending)
                await self._ack_ready()
                return
            identities = Delivery.identities(pending) if self._in_flight else None
            while (
                identities is not None
                and self._in_flight
                and (
                    len(self._in_flight) >= most
                    or any(not identities.isdisjoint(w.identities) for w in self._in_flight)
                )
            ):
                await asyncio.wait({self._in_flight[0].task})
            if not self.gate.is_set() or self.consumer.fetch_epoch != epoch:
                return  # stopped or fenced meanwhile: read again, never acked here
            task = asyncio.create_task(self._write_and_ack(pending))
            writing = _InFlight(task, pending, identities)
            task.add_done_callback(lambda _: self._in_flight.remove(writing))
            self._in_flight.append(writing)

    async def _write_and_ack(self, pending: list[Pending]) -> None:
        """One batch's write outside the lock, then the acks it allows (an unexpected error
        turns the workflow FAILED, as in `handle_batch`)."""
        try:
            await self._write(pending)
            await self._ack_ready()
        except Exception as error:
            log.exception("event=batch_failed workflow=%s", self.name)
            await self.fail(f"unexpected {type(error).__name__}: {error}")

    async def _settle(self) -> None:
        """Waits for every write in flight but the caller's own (after `close_gate` they
        hold their sinks and end, or are abandoned, within the stop's grace). Two writes
        settling at once (both stopping for drift) do not wait for each other."""
        current = asyncio.current_task()
        if current is not None:
            self._settling.add(current)
        try:
            while waiting := {
                w.task
                for w in self._in_flight
                if w.task is not current and w.task not in self._settling
            }:
                await asyncio.wait(waiting)
        finally:
            self._settling.discard(current)

    async def tick(self) -> None:
        """Retries parked records that are due when no new batch arrives to carry them."""
        if not self._delivery.parked or not self.gate.is_set():
            return
        async with self.lock:
            await self._settle()  # a parked write goes after those in flight, never beside
            if not self.gate.is_set() or self.consumer is None:
                return
            if self.consumer.fetch_epoch != self._epoch:
                self._forget_pending(self.consumer.fetch_epoch)
                return
            due = self._delivery.due()
            if due:
                await self._write(due)
                await self._ack_ready()

    def _forget_pending(self, epoch: int) -> None:
        """Drops queued and parked records: they will all be read again from the commit."""
        self._delivery.forget()
        if self.workflow is not None:
            self.workflow.forget_pending()
        self._epoch = epoch

    async def _write(self, pending: list[Pending]) -> None:
        fatal = await self._delivery.write(pending)
        if fatal is not None:
            await self.fail(fatal)
            return
        if self._outcomes is not None and self._delivery.parked:
            await self._report_parked(pending)
        refusals = [i.error.reason for i, _ in pending if isinstance(i.error, RecordRejected)]
        if refusals and self.drift_watch is not None and self.gate.is_set():
            # A refusal naming a column, key or field the config needs may be drift: checked at
            # once, and then the refused records are not dead-lettered but read again later.
            found = await self.drift_watch.after_refusals(refusals)
            if drift.breaking(found):
                await self._drift_stop(found)

    async def _plan(self, items: list[Item]) -> None:
        assert self.workflow is not None
        decoded: list[tuple[Item, str, dict[str, Any]]] = []
        # Without a registry decoding never waits: no coroutine per record then.
        decode = self.workflow.schema.decode if self._registry is None else None
        for item in items:
            data = item.record.value
            if data is None:
                # A tombstone (a deleted key, for compaction): the delete event before it
                # carried the change, so there is nothing to write.
                item.planned = workflows.Planned([], note=outcomes.TOMBSTONE)
                continue
            try:
                value = decode(data) if decode is not None else await self._decode(data)
            except DecodeError as error:
                item.error = RecordRejected(f"undecodable: {error}")
            except _Abandoned:
                raise
            except Exception as error:  # bytes that trip the decoder are the record's fault
                item.error = RecordRejected(f"undecodable: {type(error).__name__}: {error}")
            else:
                decoded.append((item, item.record.topic, value))
        planned = await self.workflow.plan([(topic, value) for _, topic, value in decoded])
        for (item, _, _), plan in zip(decoded, planned, strict=True):
            refused = plan.error
            if refused is not None:
                if isinstance(refused, Fatal):
                    await self.fail(refused.reason)
                    return
                item.error = refused  # the mapping refused it
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
                await self._delivery.sleep(
                    backoff(attempt, base_s=0.5, cap_s=self.settings.retry_backoff_max_s)
                )
                if not self.gate.is_set():
                    raise _Abandoned from None

    async def _ack_ready(self) -> None:
        """Dead-letters and commits each partition's written records from the head, then
        tells the consumer how far each partition is written."""
        assert self.consumer is not None and self._dead_letters is not None
        # The trace's account: the ranges acked, and only what cannot be derived from a
        # source record and the config version (outcomes.py) told per record.
        traced = outcomes.OutcomeRecord(self.config_version) if self._outcomes else None
        for topic, partition, done in self._delivery.acked():
            for item in done:
                if item.error is not None:
                    await self._dead_letters.send(item)
                    self.dead_lettered += 1
                    if traced is not None:
                        traced.exception(item.record, "dead-lettered", item.error.reason)
                elif item.planned is not None:
                    if item.planned.after_written is not None:
                        await item.planned.after_written()
                    if item.planned.writes:
                        self.records_written += 1
                    if (
                        traced is not None
                        and item.planned.note is not None
                        and item.record.value is not None  # a tombstone: derived
                    ):
                        traced.exception(
                            item.record,
                            "written" if item.planned.writes else "skipped",
                            item.planned.note,
                            item.planned.writes,
                        )
            last = done[-1].record.offset
            if traced is not None:
                traced.acked(topic, partition, done[0].record.offset, last)
            self.consumer.acknowledge(TP(topic, partition), last + 1)
        if traced is not None and self._outcomes is not None:
            await self._outcomes.send(traced)

    async def _report_parked(self, pending: list[Pending]) -> None:
        """Records that just waited for their parent show in the trace as parked (once)."""
        parked = [
            item
            for item in {id(item): item for item, _ in pending}.values()
            if item.parent_missing_since is not None and not item.parked_shown and not item.done
        ]
        for item in parked:
            item.parked_shown = True
        if parked and self._outcomes is not None:
            traced = outcomes.OutcomeRecord(self.config_version)
            for item in parked:
                traced.exception(item.record, "parked", "its parent does not exist yet")
            await self._outcomes.send(traced)


def merge(fetched: Sequence[Fetched], max_records: int) -> list[tuple[int, list[SourceRecord]]]:
    """Consecutive batches of one fetch epoch joined, up to `max_records` records each."""
    groups: list[tuple[int, list[SourceRecord]]] = []
    for batch in fetched:
        records: list[SourceRecord] = [r for part in batch.records.values() for r in part]
        if (
            groups
            and groups[-1][0] == batch.epoch
            and len(groups[-1][1]) + len(records) <= max_records
        ):
            groups[-1][1].extend(records)
        else:
            groups.append((batch.epoch, records))
    return groups


def _epoch_ms(iso_time: str) -> int:
    moment = datetime.fromisoformat(iso_time.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
