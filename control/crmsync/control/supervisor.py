"""The `Supervisor` the HTTP API, the web page and the CLI call, over Kafka: it reads and writes
the control topics.

It follows `crmsync.control` and `crmsync.status` and is the only writer of `crmsync.control`;
every state-changing action is also written to `crmsync.audit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from crmsync.control import dead_letters as dlq
from crmsync.control import models
from crmsync.control.audit import AuditEntry, AuditLog
from crmsync.control.auth import Principal, Role
from crmsync.control.backlog import TrendWindow
from crmsync.control.errors import BadRequest, Conflict, Invalid, Unavailable, UnknownWorkflow
from crmsync.control.history import (
    CHART_S,
    HistoryAnswer,
    HistorySample,
    HistoryStore,
    Sample,
    WrittenRate,
    eta,
)
from crmsync.control.sources import SourceList, view
from crmsync.control.status import Derived, derive, live_workers
from crmsync.control.supervisor_protocol import Figures
from crmsync.control.trace import TraceIndex
from crmsync.schemas.registry import RegistryUnavailable
from crmsync.streams import catalog, drift, preflight
from crmsync.streams import config as configs
from crmsync.streams.catalog import NAMES, WORKFLOWS
from crmsync.streams.control_protocol import (
    ControlRecord,
    ReplayRequest,
    WorkerStatus,
)
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.follower import CompactedTopicFollower
from crmsync.streams.kafka.offsets import Backlog, OffsetReader, TopicTail
from crmsync.streams.preview import STATEFUL_NOTE, Row, Side, dry_run
from crmsync.streams.settings import Settings
from crmsync.streams.source import STATUS_KEY as SOURCE_KEY
from crmsync.streams.source import SourceStatus
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.errors import SinkError

log = logging.getLogger(__name__)

#: How long a control record may take to come back through the topic we follow.
_ECHO_TIMEOUT_S = 15.0
#: How old a backlog sample may be and still answer a request.
_SAMPLE_REUSE_S = 1.0
#: How many of a DLQ's newest records a listing or a re-drive reads (markers included).
MAX_DLQ_READ = 1000
#: How many re-driven records an audit entry lists one by one (the count is always there).
AUDITED_RECORDS = 100


#: Who the audit log names for what the workers did by themselves.
_WORKERS = Principal("crmsync-worker", Role.operator)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _epoch_ms(iso_time: str) -> int:
    moment = datetime.fromisoformat(iso_time.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


class KafkaSupervisor:
    """The `Supervisor` over Kafka: status, backlog, config and actions of every workflow."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        kafka = settings.kafka
        self._producer = kafka.producer()
        self._records: dict[str, ControlRecord] = {}
        self._control_read = asyncio.Event()
        self._reports: dict[str, WorkerStatus] = {}
        self._control = CompactedTopicFollower(kafka, topics.CONTROL, self._on_control)
        self._status = CompactedTopicFollower(kafka, topics.STATUS, self._on_status)
        self._offsets = OffsetReader(kafka)
        self._tail = TopicTail(kafka, self._offsets)
        self._audit = AuditLog(self._producer, self._tail)
        self._locks = {name: asyncio.Lock() for name in NAMES}
        self._sampling = {name: asyncio.Lock() for name in NAMES}
        self._backlogs: dict[str, Backlog] = {}
        self._trends = {name: TrendWindow(settings.backlog_window_s) for name in NAMES}
        self._sampler: asyncio.Task[None] | None = None
        #: (workflow, generation) of the drift stops already written to the audit log.
        self._drift_audited: set[tuple[str, int]] = set()
        self._trace = TraceIndex(
            kafka,
            settings.local_dir / "trace.sqlite",
            NAMES,
            retention_h=settings.outcomes_retention_h,
            registry_url=settings.schema_registry_url,
        )
        self._source: SourceStatus | None = None
        self._history = HistoryStore(settings.local_dir / "control" / "history.sqlite")
        self._written = WrittenRate()
        self._redriving = {name: asyncio.Lock() for name in NAMES}
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await topics.ensure_topics(
            self.settings.kafka,
            catalog.topic_specs(
                self.settings.topic_partitions,
                outcomes_retention_h=self.settings.outcomes_retention_h,
            ),
            replication=self.settings.topic_replication,
        )
        await self._history.open()
        await self._producer.start()
        await self._offsets.start()
        await self._tail.start()
        await self._control.start()
        await self._status.start()
        await asyncio.gather(self._control.loaded.wait(), self._status.loaded.wait())
        for name in NAMES:
            if name not in self._records:
                await self._initialise(name)
        await self.sample()
        self._sampler = asyncio.create_task(self._sample_forever(), name="backlog-sampler")
        await self._trace.start()

    async def close(self) -> None:
        await self._trace.close()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        await self._status.stop()
        await self._control.stop()
        await self._tail.close()
        await self._offsets.close()
        await self._producer.stop()
        await self._history.close()

    async def __aenter__(self) -> KafkaSupervisor:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _initialise(self, name: str) -> None:
        """A workflow the control plane never spoke about: running its default config."""
        record = ControlRecord(
            workflow=name,
            desired="running",
            generation=1,
            active_config=catalog.default_config(name).model_dump(mode="json"),
            active_version=1,
            updated_by="crmsync",
        )
        await self._write(record)
        log.info("event=control_initialised workflow=%s", name)

    # -- following the topics ----------------------------------------------------------

    def _on_control(self, key: str, value: bytes | None) -> None:
        self._control_read.set()
        if value is None:
            self._records.pop(key, None)
            return
        try:
            record = self._records[key] = ControlRecord.decode(value)
        except ValueError as error:
            log.error("event=bad_control_record workflow=%s error=%r", key, error)
            return
        self._trace.remember_config(record.workflow, record.active_version, record.active_config)

    def _on_status(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._reports.pop(key, None)
            if key == SOURCE_KEY:
                self._source = None
            return
        if key == SOURCE_KEY:
            try:
                self._source = SourceStatus.model_validate_json(value)
            except ValueError as error:
                log.warning("event=bad_source_status key=%s error=%r", key, error)
        try:
            self._reports[key] = WorkerStatus.decode(value)
        except ValueError as error:
            log.warning("event=bad_status_record key=%s error=%r", key, error)

    async def _write(self, record: ControlRecord) -> None:
        """Writes a control record and waits until it comes back through the topic, so the
        next read (ours or a worker's) sees it."""
        data = record.encode()
        try:
            await self._producer.send_and_wait(topics.CONTROL, data, key=record.workflow.encode())
            async with asyncio.timeout(_ECHO_TIMEOUT_S):
                while self._control.latest.get(record.workflow) != data:
                    self._control_read.clear()
                    await self._control_read.wait()
        except (KafkaError, TimeoutError) as error:
            raise Unavailable(f"Kafka did not store the control record: {error!r}") from error

    # -- reading -----------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(NAMES)

    def _lock(self, name: str) -> asyncio.Lock:
        """Serialises one workflow's read-modify-write of its control record."""
        if name not in self._locks:
            raise UnknownWorkflow(f"no workflow {name!r}", {"workflows": list(NAMES)})
        return self._locks[name]

    def _record(self, name: str) -> ControlRecord:
        if name not in NAMES:
            raise UnknownWorkflow(f"no workflow {name!r}", {"workflows": list(NAMES)})
        record = self._records.get(name)
        if record is None:
            raise Unavailable(f"{name} has no control record yet")
        return record

    def workers(self, name: str) -> list[WorkerStatus]:
        return [r for r in self._reports.values() if r.workflow == name]

    def _live(self, name: str) -> list[WorkerStatus]:
        return live_workers(self.workers(name), int(time.time() * 1000), self.settings.liveness_s)

    def derived(self, name: str) -> Derived:
        return derive(self._records.get(name), self._live(name))

    def _active_topics(self, record: ControlRecord) -> list[str]:
        try:
            return catalog.parse_config(record.workflow, record.active_config).source_topics()
        except configs.ConfigError:
            return catalog.default_config(record.workflow).source_topics()

    async def backlog(self, name: str, fresh: bool = False) -> Backlog:
        """The latest sample while younger than a second (so a burst of requests reads Kafka
        once), else a new one; `fresh` always reads Kafka."""
        record = self._record(name)
        async with self._sampling[name]:
            cached = self._backlogs.get(name)
            if cached is not None and not fresh and time.time() - cached.at < _SAMPLE_REUSE_S:
                return cached
            try:
                backlog = await self._offsets.backlog(
                    WORKFLOWS[name].group_id, self._active_topics(record)
                )
            except KafkaError as error:
                raise Unavailable(f"cannot read offsets from Kafka: {error!r}") from error
            self._backlogs[name] = backlog
            self._trends[name].add(backlog)
            return backlog

    async def sample(self) -> None:
        """Samples every workflow's backlog once (a failure keeps the previous sample), and
        records it with the written rate in the history."""
        taken: list[tuple[str, Sample]] = []
        for name in NAMES:
            if name not in self._records:
                continue
            try:
                backlog = await self.backlog(name, fresh=True)
            except Unavailable as error:
                log.warning("event=backlog_unavailable workflow=%s error=%s", name, error)
                continue
            counters = {w.worker_id: w.records_written for w in self.workers(name)}
            rate = self._written.rate(name, backlog.at, counters)
            taken.append((name, Sample(backlog.at, backlog.total, rate)))
        try:
            await self._history.add(taken)
        except Exception as error:  # sqlite3.Error, OSError: the history must not stop sampling
            log.warning("event=history_not_stored error=%r", error)

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.backlog_sample_s)
            await self.sample()
            await self.audit_drift_stops()
            await self.keep_drift_baselines()

    async def keep_drift_baselines(self) -> None:
        """Keeps in each control record the drift baseline its active config was first started
        with, as the workers report it: a worker started later compares with that, so a column
        shortened while no worker ran is still caught. It is replaced only by one that widens it
        (a longer field), never narrowed; a new config version takes a new one."""
        for name in NAMES:
            record = self._records.get(name)
            if record is None:
                continue
            kept = record.drift_baseline
            if kept is not None and kept.version != record.active_version:
                kept = None
            reported = next(
                (
                    w.baseline
                    for w in self._live(name)
                    if w.baseline is not None
                    and w.baseline.version == record.active_version
                    and w.config_version == record.active_version
                    and (kept is None or drift.widens(kept.shapes, w.baseline.shapes))
                ),
                None,
            )
            if reported is None:
                continue
            try:
                async with self._lock(name):
                    latest = self._record(name)
                    if latest.active_version != reported.version or latest.drift_baseline != kept:
                        continue
                    await self._write(latest.model_copy(update={"drift_baseline": reported}))
            except Unavailable as error:
                log.warning("event=drift_baseline_not_kept workflow=%s error=%s", name, error)
                continue
            log.info("event=drift_baseline_kept workflow=%s version=%s", name, reported.version)

    async def audit_drift_stops(self) -> None:
        """An audit entry for each workflow that stopped itself on drift (once per generation)."""
        for name in NAMES:
            record = self._records.get(name)
            derived = self.derived(name) if record is not None else None
            if record is None or derived is None or derived.stopped_by != "drift":
                continue
            if (name, record.generation) in self._drift_audited:
                continue
            details = {
                "generation": record.generation,
                "reason": derived.reason,
                "changes": [c.model_dump() for c in self._drift_changes(name) if c.breaking],
            }
            try:
                await self._audited(_WORKERS, "stopped-by-drift", name, details)
            except Unavailable as error:
                log.warning("event=drift_audit_failed workflow=%s error=%s", name, error)
                continue
            self._drift_audited.add((name, record.generation))

    async def summary(self, name: str) -> models.WorkflowSummary:
        record = self._record(name)
        backlog = await self.backlog(name)
        derived = self.derived(name)
        reading = self._trends[name].reading()
        return models.WorkflowSummary(
            name=name,
            title=WORKFLOWS[name].title,
            status=derived.status,
            backlog=backlog.total,
            trend=reading.trend,
            eta_s=reading.eta_s,
            pending_changes=record.pending_config is not None,
            error=derived.error,
            stopped_by=derived.stopped_by,
            reason=derived.reason,
            drift=self._drift_changes(name),
        )

    def _drift_changes(self, name: str) -> list[models.DriftChange]:
        """What the live workers of the current generation last found changed (deduplicated)."""
        record = self._record(name)
        seen: dict[tuple[str, str, str], models.DriftChange] = {}
        for worker in self._live(name):
            if worker.generation != record.generation:
                continue
            for raw in worker.drift:
                difference = drift.Difference.from_dict(raw)
                seen.setdefault(
                    (difference.target, difference.kind, difference.name),
                    models.DriftChange(**difference.as_dict()),
                )
        return sorted(seen.values(), key=lambda d: (not d.breaking, d.name))

    async def summaries(self) -> list[models.WorkflowSummary]:
        return [await self.summary(name) for name in NAMES]

    async def detail(self, name: str) -> models.WorkflowDetail:
        record = self._record(name)
        backlog = await self.backlog(name, fresh=True)
        summary = await self.summary(name)
        live = {w.worker_id for w in self._live(name)}
        return models.WorkflowDetail(
            **summary.model_dump(),
            desired=record.desired,
            generation=record.generation,
            partitions=_partitions(backlog),
            active_config=_redacted(name, record.active_config),
            active_version=record.active_version,
            pending_config=_redacted_or_none(name, record.pending_config),
            pending_version=record.pending_version,
            pending_diff=_diff(name, record),
            workers=[
                _worker_view(w, w.worker_id in live)
                for w in sorted(self.workers(name), key=lambda w: w.worker_id)
            ],
            updated_at=record.updated_at,
            updated_by=record.updated_by,
        )

    def figures(self) -> list[Figures]:
        """Without I/O: the latest backlog sample, status and worker counters."""
        figures = []
        for name in NAMES:
            record = self._records.get(name)
            backlog = self._backlogs.get(name)
            workers = self.workers(name)
            figures.append(
                Figures(
                    name=name,
                    status=self.derived(name).status,
                    backlog=backlog.total if backlog is not None else None,
                    pending_changes=record is not None and record.pending_config is not None,
                    live_workers=len(self._live(name)),
                    records_written=sum(w.records_written for w in workers),
                    dead_lettered=sum(w.dead_lettered for w in workers),
                )
            )
        return figures

    def config(self, name: str) -> models.ConfigAnswer:
        record = self._record(name)
        return models.ConfigAnswer(
            active=_redacted(name, record.active_config),
            active_version=record.active_version,
            pending=_redacted_or_none(name, record.pending_config),
            pending_version=record.pending_version,
            pending_diff=_diff(name, record),
        )

    async def dead_letters(self, name: str, limit: int) -> models.DeadLetterList:
        return await self.dead_letter_listing(name, dlq.DeadLetterFilter(), limit)

    async def dead_letter_listing(
        self, name: str, where: dlq.DeadLetterFilter, limit: int
    ) -> models.DeadLetterList:
        """The newest dead letters matching `where`, each marked when it was re-driven."""
        letters, _, complete = await self._read_dead_letters(name)
        chosen = [letter for letter in letters if where.matches(letter)][:limit]
        return models.DeadLetterList(workflow=name, dead_letters=chosen, complete=complete)

    async def _read_dead_letters(
        self, name: str
    ) -> tuple[list[models.DeadLetter], dict[tuple[int, int], bytes], bool]:
        """The dead letters (newest first), their values as stored, whether that is all."""
        self._record(name)
        try:
            records, complete = await self._tail.newest_within(
                topics.dead_letters(name), MAX_DLQ_READ
            )
        except (KafkaError, TimeoutError) as error:
            raise Unavailable(f"cannot read the dead letters: {error!r}") from error
        values = {(r.partition, r.offset): r.value or b"" for r in records}
        return dlq.letters(records), values, complete and len(records) < MAX_DLQ_READ

    async def redrive(self, name: str, body: dlq.RedriveBody, who: Principal) -> dlq.RedriveAnswer:
        """Sends the matching dead letters not re-driven yet back to their source partitions,
        oldest first (each key's order), then marks each in the DLQ; audited."""
        async with self._redriving[self._known(name)]:
            record = self._record(name)
            letters, values, complete = await self._read_dead_letters(name)
            matched = [letter for letter in letters if body.matches(letter)]
            sources = set(self._active_topics(record))
            chosen: list[models.DeadLetter] = []
            skipped: list[dlq.SkippedItem] = []
            for letter in matched:
                why = _not_redrivable(letter, sources)
                if why is None:
                    chosen.append(letter)
                else:
                    skipped.append(
                        dlq.SkippedItem(
                            partition=letter.partition,
                            offset=letter.offset,
                            key=letter.key,
                            why=why,
                        )
                    )
            chosen.sort(
                key=lambda x: (
                    x.source_topic or "",
                    x.source_partition or 0,
                    x.source_offset or 0,
                    x.partition,
                    x.offset,
                )
            )
            redrive_id = None if body.dry_run else uuid.uuid4().hex
            sent = (
                await self._send_again(name, chosen, values, redrive_id, who)
                if redrive_id
                else [
                    dlq.RedrivenItem(
                        partition=x.partition,
                        offset=x.offset,
                        key=x.key,
                        to_topic=x.source_topic or "",
                        to_partition=x.source_partition or 0,
                        to_offset=None,
                    )
                    for x in chosen
                ]
            )
            answer = dlq.RedriveAnswer(
                workflow=name,
                redrive_id=redrive_id,
                dry_run=body.dry_run,
                matched=len(matched),
                redriven=sent,
                skipped=skipped,
                complete=complete,
            )
            if redrive_id is not None:
                where = body.model_dump(mode="json", exclude={"dry_run"}, exclude_none=True)
                await self._audited(
                    who,
                    "redrive",
                    name,
                    {
                        "redrive_id": redrive_id,
                        "filter": where,
                        "count": len(sent),
                        "skipped": len(skipped),
                        "records": [
                            {
                                "dlq": f"{x.partition}/{x.offset}",
                                "key": x.key,
                                "to": f"{x.to_topic}/{x.to_partition}/{x.to_offset}",
                            }
                            for x in sent[:AUDITED_RECORDS]
                        ],
                    },
                )
            return answer

    async def _send_again(
        self,
        name: str,
        chosen: list[models.DeadLetter],
        values: dict[tuple[int, int], bytes],
        redrive_id: str,
        who: Principal,
    ) -> list[dlq.RedrivenItem]:
        """Events first (in order, all acknowledged), then the markers."""
        dlq_topic = topics.dead_letters(name)
        try:
            pending = [
                await self._producer.send(
                    letter.source_topic or "",
                    values[(letter.partition, letter.offset)],
                    key=letter.key.encode() if letter.key is not None else None,
                    partition=letter.source_partition,
                    headers=dlq.event_headers(
                        redrive_id, dlq_topic, letter.partition, letter.offset
                    ),
                )
                for letter in chosen
            ]
            acked = [await future for future in pending]
            sent = []
            for letter, meta in zip(chosen, acked, strict=True):
                to = f"{meta.topic}/{meta.partition}/{meta.offset}"
                await self._producer.send(
                    dlq_topic,
                    b"",
                    key=letter.key.encode() if letter.key is not None else None,
                    partition=letter.partition,
                    headers=dlq.marker_headers(redrive_id, letter.offset, to, who.name),
                )
                sent.append(
                    dlq.RedrivenItem(
                        partition=letter.partition,
                        offset=letter.offset,
                        key=letter.key,
                        to_topic=meta.topic,
                        to_partition=meta.partition,
                        to_offset=meta.offset,
                    )
                )
            await self._producer.flush()
        except KafkaError as error:
            raise Unavailable(f"re-drive {redrive_id} did not complete: {error!r}") from error
        log.info("event=redriven workflow=%s redrive_id=%s records=%s", name, redrive_id, len(sent))
        return sent

    def sources(self) -> SourceList:
        """The Dynamics source's last status record, STALE once it stops heartbeating."""
        now = int(time.time() * 1000)
        found = [] if self._source is None else [view(self._source, now, self.settings.liveness_s)]
        return SourceList(sources=found)

    def history(self, name: str, span_s: float = CHART_S) -> HistoryAnswer:
        self._known(name)
        since = time.time() - span_s
        samples = self._history.samples(name, since)
        return HistoryAnswer(
            workflow=name,
            since=since,
            sample_interval_s=self.settings.backlog_sample_s,
            eta=eta(samples),
            samples=[
                HistorySample(at=s.at, backlog=s.backlog, written_per_s=s.written_per_s)
                for s in samples
            ],
        )

    def _known(self, name: str) -> str:
        if name not in NAMES:
            raise UnknownWorkflow(f"no workflow {name!r}", {"workflows": list(NAMES)})
        return name

    async def preview(
        self, name: str, config: Mapping[str, Any] | None, limit: int
    ) -> models.PreviewAnswer:
        """A dry run of the given (else the pending) config against the active one, on the
        newest `limit` records of their source topics, read outside the consumer group: the
        group's offsets, the targets and the kept state are left as they are."""
        record = self._record(name)
        active = _stored_config(name, record.active_config, "active")
        source: Literal["body", "pending", "active"]
        if config is not None:
            try:
                pending = catalog.parse_config(name, config)
            except configs.ConfigError as error:
                errors = [{**e, "loc": ["config", *e["loc"]]} for e in error.errors]
                raise Invalid("invalid config", errors) from None
            source, version = "body", None
        elif record.pending_config is not None:
            pending = _stored_config(name, record.pending_config, "pending")
            source, version = "pending", record.pending_version
        else:
            pending, source, version = active, "active", record.active_version
        names = list(dict.fromkeys([*active.source_topics(), *pending.source_topics()]))
        sampled, complete = await self._newest(names, limit)
        try:
            rows = await dry_run(
                name,
                active,
                pending,
                sampled,
                self.settings.kafka,
                timestamps=[r.timestamp for r in sampled],
                registry_url=self.settings.schema_registry_url,
            )
        except (KafkaError, TimeoutError, RegistryUnavailable) as error:
            raise Unavailable(f"cannot read what the dry run needs: {error!r}") from error
        records = [_preview_record(row) for row in rows]
        return models.PreviewAnswer(
            workflow=name,
            pending_source=source,
            active_version=record.active_version,
            pending_version=version,
            records=records,
            changed=sum(r.changed for r in records),
            dropped=sum(r.filter_change == "dropped" for r in records),
            kept=sum(r.filter_change == "kept" for r in records),
            complete=complete,
            note=STATEFUL_NOTE if name == "opt-in-out" else None,
        )

    async def _newest(self, names: list[str], limit: int) -> tuple[list[Any], bool]:
        """The newest `limit` records over the topics, oldest first."""
        found: list[Any] = []
        complete = True
        try:
            for topic in names:
                records, whole = await self._tail.newest_within(topic, limit)
                found += records
                complete = complete and whole
        except (KafkaError, TimeoutError) as error:
            raise Unavailable(f"cannot read the source topics: {error!r}") from error
        found.sort(key=lambda r: (r.timestamp, r.topic, r.partition, r.offset), reverse=True)
        return found[:limit][::-1], complete

    async def targets(self) -> list[preflight.Requirement]:
        configs = {name: catalog.parse_config(name, self.config(name).active) for name in NAMES}
        async with (
            DynamicsClient(self.settings.dynamics) as dynamics,
            CampaignClient(self.settings.campaign) as campaign,
        ):
            return await preflight.check(configs, dynamics, campaign)

    async def audit(self, limit: int) -> models.AuditList:
        try:
            entries = await self._audit.newest(limit)
        except (KafkaError, TimeoutError) as error:
            raise Unavailable(f"cannot read the audit log: {error!r}") from error
        return models.AuditList(audit=[models.AuditView(**e.model_dump()) for e in entries])

    async def trace(self, key: str) -> models.TraceAnswer:
        if not key.strip():
            raise BadRequest("a key is needed: a contact id, an event id or a record id")
        return await self._trace.find(key)

    async def ready(self) -> None:
        """Raises Unavailable unless Kafka answers and both control topics were read."""
        if not (self._control.loaded.is_set() and self._status.loaded.is_set()):
            raise Unavailable("the control topics are still being read")
        try:
            async with asyncio.timeout(3):
                await self._offsets.ping()
        except (KafkaError, TimeoutError, OSError) as error:
            raise Unavailable(f"Kafka is not reachable: {error!r}") from error

    # -- actions -----------------------------------------------------------------------

    async def start_workflow(self, name: str, who: Principal) -> models.StatusAnswer:
        """A new generation, desired running; pending changes become the active config."""
        async with self._lock(name):
            record = self._record(name)
            derived = self.derived(name)
            status = derived.status
            drifted = derived.stopped_by == "drift"
            if record.desired == "running" and status != "FAILED" and not drifted:
                raise Conflict(f"{name} is already {'running' if status == 'RUNNING' else status}")
            await self._preflight(name, record.pending_config or record.active_config)
            if drifted:
                await self._drift_remains(name, record.pending_config or record.active_config)
            update: dict[str, Any] = {
                "desired": "running",
                "generation": record.generation + 1,
                "replay": None,
                "updated_by": who.name,
                "updated_at": _now(),
            }
            details: dict[str, Any] = {"generation": record.generation + 1}
            if record.pending_config is not None:
                update |= {
                    "active_config": record.pending_config,
                    "active_version": record.pending_version or record.active_version + 1,
                    "pending_config": None,
                    "pending_version": None,
                }
                details["config_version"] = update["active_version"]
                details["changes"] = [c.model_dump(mode="json") for c in _diff(name, record)]
            new = record.model_copy(update=update)
            await self._write(new)
            await self._audited(who, "start", name, details)
            return self._status_answer(name, new)

    async def _preflight(self, name: str, config: Any) -> None:
        """Refuse a start (409, with the list) when the targets lack what the config needs."""
        missing = await preflight.missing_for_start(
            name, catalog.parse_config(name, config), self.settings.dynamics, self.settings.campaign
        )
        if missing:
            raise Conflict(
                f"{name} cannot start: its targets lack {len(missing)} piece(s) its config needs",
                {"missing": [r.as_dict() for r in missing]},
            )

    async def _drift_remains(self, name: str, config: Any) -> None:
        """Refuse the Start of a workflow that stopped on drift (409, with the differences)
        until the target is put back or the config no longer needs what changed."""
        reported = [drift.Difference(**c.model_dump()) for c in self._drift_changes(name)]
        parsed = catalog.parse_config(name, config)
        try:
            async with (
                DynamicsClient(self.settings.dynamics) as dynamics,
                CampaignClient(self.settings.campaign) as campaign,
            ):
                found = await preflight.check({name: parsed}, dynamics, campaign)
        except SinkError as error:
            raise Unavailable(f"cannot read the targets' metadata: {error.reason}") from error
        unread = [r for r in found if r.workflow == "*"]
        if unread:
            raise Unavailable(f"cannot read the targets' metadata: {unread[0].fix}")
        remaining = drift.still_breaking(reported, found, name)
        if remaining:
            raise Conflict(
                f"{name} cannot start: its targets still differ from what its config was "
                f"started with: {drift.reason(remaining)}",
                {"drift": [d.as_dict() for d in remaining]},
            )

    async def stop_workflow(self, name: str, who: Principal) -> models.StatusAnswer:
        """A new generation, desired stopped: the workers close the gate and pause."""
        async with self._lock(name):
            record = self._record(name)
            if record.desired == "stopped":
                raise Conflict(f"{name} is already {self.derived(name).status}")
            new = record.model_copy(
                update={
                    "desired": "stopped",
                    "generation": record.generation + 1,
                    "replay": None,
                    "updated_by": who.name,
                    "updated_at": _now(),
                }
            )
            await self._write(new)
            await self._audited(who, "stop", name, {"generation": new.generation})
            return self._status_answer(name, new)

    async def edit_config(
        self, name: str, data: Mapping[str, Any], who: Principal
    ) -> models.PendingAnswer:
        """Validates the config and stores it as pending: the running workers keep the active."""
        async with self._lock(name):
            record = self._record(name)
            try:
                parsed = catalog.parse_config(name, data)
            except configs.ConfigError as error:
                raise Invalid("invalid config", error.errors) from None
            pending: dict[str, Any] | None = parsed.model_dump(mode="json")
            if pending == _normalised(name, record.active_config):
                pending = None  # editing back to the active config drops the pending change
            new = record.model_copy(
                update={
                    "pending_config": pending,
                    "pending_version": record.active_version + 1 if pending else None,
                    "updated_by": who.name,
                    "updated_at": _now(),
                }
            )
            await self._write(new)
            diff = _diff(name, new)
            await self._audited(
                who,
                "edit",
                name,
                {
                    "pending_version": new.pending_version,
                    "changes": [c.model_dump(mode="json") for c in diff],
                },
            )
            return models.PendingAnswer(
                pending=_redacted_or_none(name, new.pending_config),
                pending_version=new.pending_version,
                pending_diff=diff,
            )

    async def replay(self, name: str, from_: str, who: Principal) -> models.ReplayAnswer:
        """Moves the group's committed offsets back while STOPPED; answers the new backlog.

        Live workers are still group members, and Kafka takes commits for a group with members
        only from them: so the request travels in the control record and the supervisor waits
        for every live worker's confirmation. With no live worker it commits itself.
        """
        async with self._lock(name):
            record = self._record(name)
            status = self.derived(name).status
            if status != "STOPPED":
                raise Conflict(f"{name} is {status}: stop it before a replay")
            request = ReplayRequest.model_validate({"id": uuid.uuid4().hex, "from": from_})
            if self._live(name):
                await self._write(
                    record.model_copy(
                        update={"replay": request, "updated_by": who.name, "updated_at": _now()}
                    )
                )
                committed_by = await self._await_replay(name, record, request)
            else:
                committed_by = "control plane"
            if committed_by == "control plane":
                await self._commit_replay(name, record, from_)
            self._trends[name].reset()
            backlog = await self.backlog(name, fresh=True)
            await self._audited(
                who,
                "replay",
                name,
                {"from": from_, "replay_id": request.id, "backlog": backlog.total},
            )
            return models.ReplayAnswer.model_validate(
                {
                    "name": name,
                    "status": self.derived(name).status,
                    "replay_id": request.id,
                    "from": from_,
                    "backlog": backlog.total,
                    "partitions": _partitions(backlog),
                    "committed_by": committed_by,
                }
            )

    async def _await_replay(self, name: str, record: ControlRecord, request: ReplayRequest) -> str:
        """Waits until every live worker reports the replay; 'control plane' when none is left."""
        deadline = time.monotonic() + self.settings.replay_timeout_s
        while True:
            live = self._live(name)
            if not live:
                return "control plane"
            waiting = [w.worker_id for w in live if w.replayed != request.id]
            if not waiting:
                return "workers"
            failed = [w for w in live if w.state == "FAILED" and w.generation == record.generation]
            if failed:
                raise Conflict(f"replay: worker {failed[0].worker_id} failed: {failed[0].error}")
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"replay {request.id} not confirmed within "
                    f"{self.settings.replay_timeout_s:.0f}s by worker(s) {', '.join(waiting)}",
                    {"replay_id": request.id, "waiting_for": waiting},
                )
            await asyncio.sleep(0.1)

    async def _commit_replay(self, name: str, record: ControlRecord, from_: str) -> None:
        tps = await self._offsets.partitions(self._active_topics(record))
        if from_ == "earliest":
            offsets: dict[TopicPartition, int] = (await self._offsets.edges(tps))[0]
        else:
            offsets = await self._offsets.offsets_for_time(tps, _epoch_ms(from_))
        deadline = time.monotonic() + self.settings.replay_timeout_s
        while True:
            try:
                await self._offsets.commit_as_group(WORKFLOWS[name].group_id, offsets)
                return
            except KafkaError as error:
                # A worker that died a moment ago stays a member until its session times out.
                if time.monotonic() > deadline:
                    raise Conflict(
                        f"Kafka refused the replay's commit for group crmsync.{name}: {error!r}; "
                        "a consumer that reports no status is still a member of the group"
                    ) from error
                await asyncio.sleep(1)

    async def _audited(
        self, who: Principal, action: str, name: str, details: dict[str, Any]
    ) -> None:
        entry = AuditEntry(
            who=who.name, role=who.role.name, action=action, workflow=name, details=details
        )
        try:
            await self._audit.record(entry)
        except KafkaError as error:
            raise Unavailable(
                f"{action} done, but the audit entry was not stored: {error!r}"
            ) from error
        log.info(
            "event=audit who=%s action=%s workflow=%s details=%s", who.name, action, name, details
        )

    def _status_answer(self, name: str, record: ControlRecord) -> models.StatusAnswer:
        return models.StatusAnswer(
            name=name, status=self.derived(name).status, generation=record.generation
        )


# -- views ---------------------------------------------------------------------------------


def _normalised(name: str, raw: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        return catalog.parse_config(name, raw).model_dump(mode="json")
    except configs.ConfigError:
        return None


def _redacted(name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Through the model, so a secret field shows masked (a config that no longer parses is
    shown as stored: it holds nothing the model could have masked)."""
    try:
        return configs.redacted(catalog.parse_config(name, raw))
    except configs.ConfigError:
        return dict(raw)


def _redacted_or_none(name: str, raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if raw is None else _redacted(name, raw)


def _diff(name: str, record: ControlRecord) -> list[models.ConfigChange]:
    if record.pending_config is None:
        return []
    changes = configs.config_diff(
        _redacted(name, record.active_config), _redacted(name, record.pending_config)
    )
    return [models.ConfigChange(**change) for change in changes]


def _partitions(backlog: Backlog) -> list[models.PartitionBacklog]:
    return [
        models.PartitionBacklog(
            topic=p.topic,
            partition=p.partition,
            end_offset=p.end_offset,
            committed_offset=p.committed_offset,
            lag=p.lag,
        )
        for p in backlog.partitions
    ]


def _worker_view(status: WorkerStatus, live: bool) -> models.WorkerView:
    return models.WorkerView(
        worker_id=status.worker_id,
        host=status.host,
        pid=status.pid,
        state=status.state,
        generation=status.generation,
        config_version=status.config_version,
        error=status.error,
        partitions=status.partitions,
        records_written=status.records_written,
        dead_lettered=status.dead_lettered,
        replayed=status.replayed,
        stopped_by=status.stopped_by,
        reason=status.reason,
        heartbeat_at=datetime.fromtimestamp(status.heartbeat_ms / 1000, UTC).isoformat(),
        live=live,
    )


def _stored_config(name: str, raw: Mapping[str, Any], which: str) -> configs.WorkflowConfig:
    """A stored config, validated again (one an older release stored may no longer be)."""
    try:
        return catalog.parse_config(name, raw)
    except configs.ConfigError as error:
        raise Conflict(
            f"{name}'s {which} config no longer validates: edit it first", error.errors
        ) from None


def _preview_side(side: Side) -> models.PreviewSide:
    return models.PreviewSide(
        outcome=side.outcome,
        writes=[models.PreviewWrite(**vars(w)) for w in side.writes],
        reason=side.reason,
    )


def _preview_record(row: Row) -> models.PreviewRecord:
    differences = row.differences
    return models.PreviewRecord(
        topic=row.topic,
        partition=row.partition,
        offset=row.offset,
        key=row.key,
        timestamp=_when(row.timestamp_ms),
        event=row.event,
        active=_preview_side(row.active),
        pending=_preview_side(row.pending),
        changed=bool(differences),
        differences=differences,
        filter_change=row.filter_change,
    )


def _when(timestamp_ms: int) -> str:
    """A record's timestamp in ISO-8601; a producer may set any long, so one out of range
    is shown as it is rather than failing the listing."""
    try:
        return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat()
    except (ValueError, OverflowError, OSError):
        return str(timestamp_ms)


def _not_redrivable(letter: models.DeadLetter, sources: set[str]) -> str | None:
    """Why a matched dead letter is not sent again (None: it is)."""
    if letter.redriven is not None:
        return f"already re-driven ({letter.redriven.redrive_id}, {letter.redriven.at})"
    if letter.source_topic is None or letter.source_partition is None:
        return "its headers do not name a source topic and partition"
    if letter.source_topic not in sources:
        return f"{letter.source_topic} is not a source topic of the active config"
    if "crmsync.value.omitted" in letter.headers:
        return (
            "too large for the DLQ: its value was left out; the original is at "
            f"{letter.source_topic}/{letter.source_partition}/{letter.source_offset}"
        )
    return None
