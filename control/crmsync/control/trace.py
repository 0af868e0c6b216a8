"""The record trace: source records and the workflows' outcome records, indexed in local SQLite.

The control plane follows, outside any consumer group, every workflow's source topics and its
`crmsync.<workflow>.outcomes`. Per source record it keeps where it was read, its event's op,
time and the fields it changed, and the ids it is found by (its key, an email event's contact);
per outcome record the offset ranges the workflow acknowledged, under which config version, and
the records it told about (dead-lettered, parked, decided with a reason of its own). A trace
joins the two: a record in a range that was not told about was handled by the config version's
own plan, run again here (`trace_derive`). The store lives under `.local/`; a missing one (or
one of an older layout) is rebuilt from the topics — outcome records as kept
(`CRMSYNC_OUTCOMES_RETENTION_H`), source records from that long ago — and each batch of rows is
stored together with the positions it was read up to, so a restart neither skips nor repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from crmsync.control import models
from crmsync.control.trace_derive import Planner, event_view
from crmsync.streams import outcomes
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients

log = logging.getLogger(__name__)

#: The store's layout; a store of another one is rebuilt from the topics.
_LAYOUT = 5
_SCHEMA = """
CREATE TABLE IF NOT EXISTS event (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    key BLOB,
    value BLOB,
    PRIMARY KEY (topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS event_by_time ON event (at_ms);
CREATE TABLE IF NOT EXISTS lookup (
    key TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS lookup_by_key ON lookup (key);
CREATE TABLE IF NOT EXISTS batch (
    id INTEGER PRIMARY KEY,
    workflow TEXT NOT NULL,
    worker TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    config_version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batch_by_time ON batch (at_ms);
CREATE TABLE IF NOT EXISTS acked (
    batch INTEGER NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS acked_by_place ON acked (topic, partition, first);
CREATE TABLE IF NOT EXISTS told (
    batch INTEGER NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    result TEXT NOT NULL,
    reason TEXT,
    writes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS told_by_place ON told (topic, partition, "offset");
CREATE TABLE IF NOT EXISTS config (
    workflow TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (workflow, version)
);
CREATE TABLE IF NOT EXISTS position (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""

#: Events shown for one key at most (newest first).
MAX_EVENTS = 200
#: How often topics a config names but the cluster does not have yet are looked for again.
_RETRY_TOPICS_S = 5.0


class TraceIndex:
    """Follows the source and outcome topics into the store; `find` answers a trace."""

    def __init__(
        self,
        kafka: KafkaClients,
        path: Path,
        workflows: Sequence[str],
        retention_h: float = topics.OUTCOMES_RETENTION_H,
        registry_url: str | None = None,
    ) -> None:
        self._kafka = kafka
        self._path = path
        self._outcome_topics = {topics.outcomes(name) for name in workflows}
        self._retention_ms = int(retention_h * 3_600_000)
        self._planner = Planner(kafka, registry_url)
        self._db: sqlite3.Connection | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        #: Source topics named by outcome records besides those the configs name.
        self._named: set[str] = set()
        self._followed: dict[str, list[int]] = {}
        self._positions: dict[TopicPartition, int] = {}
        #: Per source partition, the most offsets one acknowledged range spans.
        self._spans: dict[tuple[str, int], int] = {}
        self._assigned_at = 0.0
        #: Records published and not indexed yet, per partition followed.
        self._behind: dict[TopicPartition, int | None] = {}
        self._other_versions: set[tuple[str, object]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.open_store()
        self._consumer = self._kafka.consumer(auto_offset_reset="earliest")
        await self._consumer.start()
        await self._assign()
        self._task = asyncio.create_task(self._follow(), name="trace-index")

    def open_store(self) -> None:
        """Opens (or creates) the store, drops what is past the retention and loads the
        config versions it kept."""
        self._db = self._open()
        cutoff = self._cutoff()
        with self._db:
            for table in ("event", "lookup", "batch"):
                self._db.execute(f"DELETE FROM {table} WHERE at_ms < ?", (cutoff,))
            for table in ("acked", "told"):
                self._db.execute(f"DELETE FROM {table} WHERE batch NOT IN (SELECT id FROM batch)")
            for workflow, version, body in self._db.execute(
                "SELECT workflow, version, body FROM config"
            ).fetchall():
                self._planner.remember(workflow, version, json.loads(body))
            for workflow, version, config in self._planner.configs():
                self._store_config(workflow, version, config)
        self._positions = {
            TopicPartition(topic, partition): offset
            for topic, partition, offset in self._db.execute(
                "SELECT topic, partition, next_offset FROM position"
            ).fetchall()
        }
        self._spans = {
            (topic, partition): span
            for topic, partition, span in self._db.execute(
                "SELECT topic, partition, MAX(last - first) FROM acked GROUP BY topic, partition"
            ).fetchall()
        }

    def _open(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path)
        if db.execute("PRAGMA user_version").fetchone()[0] != _LAYOUT:
            # Another layout (an older release's): rebuilt from the topics.
            db.close()
            self._path.unlink(missing_ok=True)
            db = sqlite3.connect(self._path)
            db.execute(f"PRAGMA user_version = {_LAYOUT}")
        db.executescript(_SCHEMA)
        return db

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
        await self._planner.aclose()
        if self._db is not None:
            self._db.close()

    def remember_config(self, workflow: str, version: int, config: dict[str, Any]) -> None:
        """A workflow's active config version, as the control record names it: what the
        records handled under it are planned with again."""
        if self._planner.remember(workflow, version, config) and self._db is not None:
            with self._db:
                self._store_config(workflow, version, config)

    def _store_config(self, workflow: str, version: int, config: dict[str, Any]) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT OR REPLACE INTO config (workflow, version, body) VALUES (?, ?, ?)",
            (workflow, version, json.dumps(config)),
        )

    def _cutoff(self) -> int:
        return int(time.time() * 1000) - self._retention_ms

    # -- following -------------------------------------------------------------------------

    def _wanted(self) -> set[str]:
        return self._outcome_topics | self._planner.source_topics() | self._named

    async def _assign(self) -> None:
        """Follows every wanted topic the cluster has, each partition from where it was
        indexed up to (a new one: outcome records from the start, source records from the
        retention's cutoff)."""
        assert self._consumer is not None
        self._assigned_at = time.monotonic()
        missing = sorted(self._wanted() - set(self._followed))
        if not missing:
            return
        admin = self._kafka.admin()
        await admin.start()
        try:
            described = await admin.describe_topics(missing)
        except KafkaError as error:
            log.warning("event=trace_topics_not_described error=%r", error)
            return
        finally:
            await admin.close()
        found = {
            d["topic"]: sorted(p["partition"] for p in d.get("partitions") or [])
            for d in described
            if d.get("error_code") == 0 and d.get("partitions")
        }
        if not found:
            return
        self._followed.update(found)
        tps = [TopicPartition(t, p) for t, numbers in self._followed.items() for p in numbers]
        self._consumer.assign(tps)
        new_sources: list[TopicPartition] = []
        for tp in tps:
            if tp in self._positions:
                self._consumer.seek(tp, self._positions[tp])
            elif tp.topic in self._outcome_topics:
                await self._consumer.seek_to_beginning(tp)
            else:
                new_sources.append(tp)
            self._behind.setdefault(tp, None)
        if new_sources:
            since = await self._consumer.offsets_for_times(
                dict.fromkeys(new_sources, self._cutoff())
            )
            ends = await self._consumer.end_offsets(new_sources)
            for tp in new_sources:
                at = since.get(tp)
                self._consumer.seek(tp, at.offset if at is not None else ends[tp])
        log.info("event=trace_following topics=%s", ",".join(sorted(found)))

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                if (
                    self._wanted() - set(self._followed)
                    and time.monotonic() - self._assigned_at > _RETRY_TOPICS_S
                ):
                    await self._assign()
                fetched = await self._consumer.getmany(timeout_ms=1000, max_records=2000)
            except KafkaError as error:
                log.warning("event=trace_index_fetch_failed error=%r", error)
                await asyncio.sleep(1)
                continue
            for tp, records in fetched.items():
                await self.index(tp, records)
            for tp in self._consumer.assignment():
                high = self._consumer.highwater(tp)
                if high is not None:
                    self._behind[tp] = max(0, high - await self._consumer.position(tp))

    async def index(
        self, tp: TopicPartition, records: Sequence[ConsumerRecord[bytes, bytes]]
    ) -> None:
        """Stores records read from one partition (of a source or an outcome topic), with
        the position they were read up to; records below it were stored already."""
        records = [r for r in records if r.offset >= self._positions.get(tp, 0)]
        if not records:
            return
        if tp.topic in self._outcome_topics:
            self._index_outcomes(tp, records)
        else:
            await self._index_events(tp, records)

    def _advance(self, tp: TopicPartition, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """Stores how far `tp` is indexed, in the transaction of the rows read."""
        assert self._db is not None
        self._db.execute(
            "INSERT INTO position (topic, partition, next_offset) VALUES (?, ?, ?) "
            "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
            (tp.topic, tp.partition, records[-1].offset + 1),
        )

    async def _index_events(
        self, tp: TopicPartition, records: Sequence[ConsumerRecord[bytes, bytes]]
    ) -> None:
        """Keeps each record as read and the ids it is found by: its key, and for an event
        whose ids are inside it (an email event: its id and contact), those. The rest (op,
        fields, what a workflow did) is read from the record when a trace asks for it."""
        assert self._db is not None
        inside = self._planner.ids_inside(tp.topic)
        rows, keys = [], []
        for record in records:
            at_ms = record.timestamp if record.timestamp >= 0 else int(time.time() * 1000)
            rows.append((tp.topic, tp.partition, record.offset, at_ms, record.key, record.value))
            found = {(record.key or b"").decode("utf-8", "replace")[: outcomes.MAX_KEY]}
            if inside and record.value is not None:
                view = event_view(record.key, await self._decoded(tp.topic, record.value))
                found |= {view.key, view.also}
            for key in found - {""}:
                keys.append((key.lower(), tp.topic, tp.partition, record.offset, at_ms))
        with self._db:
            self._db.executemany(
                'INSERT OR REPLACE INTO event (topic, partition, "offset", at_ms, key, value) '
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.executemany(
                'INSERT INTO lookup (key, topic, partition, "offset", at_ms) '
                "VALUES (?, ?, ?, ?, ?)",
                keys,
            )
            self._advance(tp, records)
        self._positions[tp] = records[-1].offset + 1

    async def _decoded(self, topic: str, value: bytes) -> dict[str, Any] | None:
        """The event, or None for bytes the workflows dead-letter (a trace shows it as read)."""
        try:
            return await self._planner.decode(topic, value)
        except Exception:
            return None

    def _index_outcomes(
        self, tp: TopicPartition, records: Sequence[ConsumerRecord[bytes, bytes]]
    ) -> None:
        assert self._db is not None
        with self._db:  # one transaction: the rows and the position they were read up to
            for record in records:
                if record.value is None:
                    continue
                try:
                    batch = outcomes.decode(record.value)
                except outcomes.OtherVersion as error:
                    if (tp.topic, error.version) not in self._other_versions:
                        self._other_versions.add((tp.topic, error.version))
                        log.warning(
                            "event=outcome_records_skipped topic=%s offset=%s version=%r "
                            "reason='another release wrote them: their records are not traced'",
                            tp.topic,
                            record.offset,
                            error.version,
                        )
                    continue
                except ValueError as error:
                    log.warning(
                        "event=outcome_unreadable topic=%s offset=%s error=%s",
                        tp.topic,
                        record.offset,
                        str(error)[:200],
                    )
                    continue
                self._insert(batch)
            self._advance(tp, records)
        self._positions[tp] = records[-1].offset + 1

    def _insert(self, batch: outcomes.OutcomeBatch) -> None:
        assert self._db is not None
        cursor = self._db.execute(
            "INSERT INTO batch (workflow, worker, at_ms, config_version) VALUES (?, ?, ?, ?)",
            (batch.workflow, batch.worker, batch.at_ms, batch.config_version),
        )
        id_ = cursor.lastrowid
        self._db.executemany(
            "INSERT INTO acked (batch, topic, partition, first, last) VALUES (?, ?, ?, ?, ?)",
            [(id_, r.topic, r.partition, r.first, r.last) for r in batch.ranges],
        )
        self._db.executemany(
            'INSERT INTO told (batch, topic, partition, "offset", result, reason, writes) '
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    id_,
                    x.topic,
                    x.partition,
                    x.offset,
                    x.result,
                    x.reason,
                    json.dumps([w.model_dump() for w in x.writes]),
                )
                for x in batch.exceptions
            ],
        )
        # A write's key (a profile's externalId, an activity's event id) finds its record too.
        self._db.executemany(
            'INSERT INTO lookup (key, topic, partition, "offset", at_ms) VALUES (?, ?, ?, ?, ?)',
            {
                (w.key.lower(), x.topic, x.partition, x.offset, batch.at_ms)
                for x in batch.exceptions
                for w in x.writes
                if w.key
            },
        )
        for r in batch.ranges:
            self._named.add(r.topic)
            place = (r.topic, r.partition)
            self._spans[place] = max(self._spans.get(place, 0), r.last - r.first)

    # -- answering -------------------------------------------------------------------------

    async def find(self, key: str) -> models.TraceAnswer:
        """Every event that carried `key` (or a write it made), newest first, with what each
        workflow did with it."""
        assert self._db is not None
        places = self._db.execute(
            'SELECT DISTINCT topic, partition, "offset" FROM lookup WHERE key = ?',
            (key.strip().lower(),),
        ).fetchall()
        events = []
        for place in places:
            event = await self._event(*place)
            if event is not None and event.outcomes:
                events.append(event)
        # By the event's source time; one without (a tombstone) by when it was handled.
        newest = sorted(
            events, key=lambda e: (e.time or e.outcomes[0].at, e.topic, e.offset), reverse=True
        )
        known = [b for b in self._behind.values() if b is not None]
        complete = bool(self._behind) and len(known) == len(self._behind)
        return models.TraceAnswer(
            key=key,
            events=newest[:MAX_EVENTS],
            truncated=len(newest) > MAX_EVENTS,
            not_indexed_yet=sum(known) if complete else None,
        )

    async def _event(self, topic: str, partition: int, offset: int) -> models.TraceEvent | None:
        assert self._db is not None
        row = self._db.execute(
            'SELECT key, value FROM event WHERE topic = ? AND partition = ? AND "offset" = ?',
            (topic, partition, offset),
        ).fetchone()
        if row is None:
            return None  # not indexed yet
        key, value = row
        event = None if value is None else await self._decoded(topic, value)
        view = event_view(key, event)
        place = (topic, partition, offset)
        found: list[tuple[int, int, models.TraceOutcome]] = []
        told = self._db.execute(
            "SELECT b.id, b.workflow, b.worker, b.at_ms, t.result, t.reason, t.writes "
            "FROM told t JOIN batch b ON b.id = t.batch "
            'WHERE t.topic = ? AND t.partition = ? AND t."offset" = ?',
            place,
        ).fetchall()
        for id_, workflow, worker, at_ms, result, reason, writes in told:
            outcome = models.TraceOutcome(
                workflow=workflow,
                worker=worker,
                result=result,
                reason=reason,
                writes=[models.TraceWrite(**w) for w in json.loads(writes)],
                at=_iso(at_ms) or "",
            )
            found.append((at_ms, id_, outcome))
        told_in = {id_ for id_, *_ in told}
        for id_, workflow, worker, at_ms, version in self._db.execute(
            "SELECT b.id, b.workflow, b.worker, b.at_ms, b.config_version "
            "FROM acked a JOIN batch b ON b.id = a.batch "
            # the longest range of the partition bounds where one holding `offset` starts
            "WHERE a.topic = ? AND a.partition = ? AND a.first BETWEEN ? AND ? AND a.last >= ?",
            (topic, partition, offset - self._spans.get((topic, partition), 0), offset, offset),
        ).fetchall():
            if id_ in told_in:
                continue
            derived = await self._planner.derive(workflow, version, topic, value, event)
            outcome = models.TraceOutcome(
                workflow=workflow,
                worker=worker,
                result=derived.result,
                reason=derived.reason,
                writes=derived.writes,
                at=_iso(at_ms) or "",
            )
            found.append((at_ms, id_, outcome))
        found.sort(key=lambda f: (f[0], f[1]))
        return models.TraceEvent(
            key=view.key,
            topic=topic,
            partition=partition,
            offset=offset,
            op=view.op,
            time=_iso(view.ts_ms),
            fields=list(view.fields),
            fields_changed=view.changed,
            outcomes=[outcome for _, _, outcome in found],
        )


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
