"""The record trace: every workflow's outcome records, indexed by key in a local SQLite store.

The control plane follows `crmsync.<workflow>.outcomes` (outside any consumer group) and keeps,
per outcome, the ids it is found by: the source record's key, the other ids its event names (an
email event's contact) and the key of each write (a Campaign profile's `externalId`, a Dynamics
activity's event id). The store lives under `.local/`; a missing one is rebuilt from the topics
(kept `CRMSYNC_OUTCOMES_RETENTION_H`), and each batch of rows is stored together with the
position it was read up to, so a restart neither skips nor repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from crmsync.control import models
from crmsync.streams import outcomes
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcome (
    id INTEGER PRIMARY KEY,
    workflow TEXT NOT NULL,
    worker TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lookup (key TEXT NOT NULL, outcome INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS lookup_by_key ON lookup (key);
CREATE INDEX IF NOT EXISTS outcome_by_time ON outcome (at_ms);
CREATE TABLE IF NOT EXISTS position (topic TEXT PRIMARY KEY, next_offset INTEGER NOT NULL);
"""

#: Events shown for one key at most (newest first).
MAX_EVENTS = 200


class TraceIndex:
    """Follows the outcome topics into the store; `find` answers a trace."""

    def __init__(
        self,
        kafka: KafkaClients,
        path: Path,
        workflows: Sequence[str],
        retention_h: float = topics.OUTCOMES_RETENTION_H,
    ) -> None:
        self._kafka = kafka
        self._path = path
        self._topics = [topics.outcomes(name) for name in workflows]
        self._retention_ms = int(retention_h * 3_600_000)
        self._db: sqlite3.Connection | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        #: Outcome records published and not indexed yet, per topic (None: not known yet).
        self._behind: dict[str, int | None] = dict.fromkeys(self._topics)

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self._path)
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "DELETE FROM lookup WHERE outcome IN (SELECT id FROM outcome WHERE at_ms < ?)",
            (self._cutoff(),),
        )
        self._db.execute("DELETE FROM outcome WHERE at_ms < ?", (self._cutoff(),))
        self._db.commit()
        stored = dict(self._db.execute("SELECT topic, next_offset FROM position").fetchall())
        self._consumer = self._kafka.consumer(auto_offset_reset="earliest")
        await self._consumer.start()
        partitions = [TopicPartition(topic, 0) for topic in self._topics]
        self._consumer.assign(partitions)
        for tp in partitions:
            if tp.topic in stored:
                self._consumer.seek(tp, stored[tp.topic])
            else:
                await self._consumer.seek_to_beginning(tp)
        self._task = asyncio.create_task(self._follow(), name="trace-index")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
        if self._db is not None:
            self._db.close()

    def _cutoff(self) -> int:
        return int(time.time() * 1000) - self._retention_ms

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                fetched = await self._consumer.getmany(timeout_ms=1000, max_records=500)
            except KafkaError as error:
                log.warning("event=trace_index_fetch_failed error=%r", error)
                await asyncio.sleep(1)
                continue
            for tp, records in fetched.items():
                self._index(tp.topic, records)
            for tp in self._consumer.assignment():
                high = self._consumer.highwater(tp)
                if high is not None:
                    self._behind[tp.topic] = max(0, high - await self._consumer.position(tp))

    def _index(self, topic: str, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        assert self._db is not None
        last = None
        with self._db:  # one transaction: the rows and the position they were read up to
            for record in records:
                last = record.offset
                if record.value is None:
                    continue
                try:
                    batch = outcomes.decode(record.value)
                except ValueError as error:
                    log.warning(
                        "event=outcome_unreadable topic=%s offset=%s error=%s",
                        topic,
                        record.offset,
                        str(error)[:200],
                    )
                    continue
                for outcome in batch.outcomes:
                    self._insert(batch, outcome)
            if last is not None:
                self._db.execute(
                    "INSERT INTO position (topic, next_offset) VALUES (?, ?) "
                    "ON CONFLICT (topic) DO UPDATE SET next_offset = excluded.next_offset",
                    (topic, last + 1),
                )

    def _insert(self, batch: outcomes.OutcomeBatch, outcome: outcomes.Outcome) -> None:
        assert self._db is not None
        event = outcome.event
        cursor = self._db.execute(
            'INSERT INTO outcome (workflow, worker, topic, partition, "offset", at_ms, body) '
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                batch.workflow,
                batch.worker,
                event.topic,
                event.partition,
                event.offset,
                outcome.at_ms,
                outcome.model_dump_json(),
            ),
        )
        keys = {event.key, *event.also, *(write.key for write in outcome.writes)} - {""}
        self._db.executemany(
            "INSERT INTO lookup (key, outcome) VALUES (?, ?)",
            [(key.lower(), cursor.lastrowid) for key in keys],
        )

    def find(self, key: str) -> models.TraceAnswer:
        """Every event that carried `key` (or a write it made), newest first, with what each
        workflow did with it."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT o.workflow, o.worker, o.body FROM lookup l JOIN outcome o ON o.id = l.outcome "
            "WHERE l.key = ? ORDER BY o.at_ms, o.id",
            (key.strip().lower(),),
        ).fetchall()
        events: dict[tuple[str, int, int], models.TraceEvent] = {}
        for workflow, worker, body in rows:
            outcome = outcomes.Outcome.model_validate(json.loads(body))
            seen = outcome.event
            place = (seen.topic, seen.partition, seen.offset)
            event = events.get(place)
            if event is None:
                event = events[place] = models.TraceEvent(
                    key=seen.key,
                    topic=seen.topic,
                    partition=seen.partition,
                    offset=seen.offset,
                    op=seen.op,
                    time=_iso(seen.ts_ms),
                    fields=seen.fields,
                    fields_changed=seen.changed,
                )
            event.outcomes.append(
                models.TraceOutcome(
                    workflow=workflow,
                    worker=worker,
                    result=outcome.result,
                    reason=outcome.reason,
                    writes=[models.TraceWrite(**w.model_dump()) for w in outcome.writes],
                    at=_iso(outcome.at_ms) or "",
                )
            )
        # By the event's source time; one without (a tombstone) by when it was handled.
        newest = sorted(
            events.values(),
            key=lambda e: (e.time or e.outcomes[0].at, e.topic, e.offset),
            reverse=True,
        )
        known = [b for b in self._behind.values() if b is not None]
        return models.TraceAnswer(
            key=key,
            events=newest[:MAX_EVENTS],
            truncated=len(newest) > MAX_EVENTS,
            not_indexed_yet=sum(known) if len(known) == len(self._behind) else None,
        )


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
