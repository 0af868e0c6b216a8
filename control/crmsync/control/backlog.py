"""A workflow's backlog (its consumer group's lag, as Kafka's tool shows it) and its trend."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

Trend = Literal["caught_up", "draining", "growing", "stalled", "steady"]
#: How long a topic's partition list is trusted before the metadata is read again.
_METADATA_TTL_S = 30.0


def group_id(workflow: str) -> str:
    """The workflow's consumer group (the app id of its Faust workers)."""
    return f"crmsync.{workflow}"


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    end_offset: int
    committed_offset: int | None  # None: the group never committed this partition
    start_offset: int

    @property
    def lag(self) -> int:
        base = self.start_offset if self.committed_offset is None else self.committed_offset
        return max(self.end_offset - base, 0)


@dataclass(frozen=True)
class Backlog:
    partitions: list[PartitionLag]
    at: float = field(default_factory=time.time)

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def consumed(self) -> int:
        """Σ of the group's positions: rises as the workers commit."""
        return sum(
            p.start_offset if p.committed_offset is None else p.committed_offset
            for p in self.partitions
        )


@dataclass(frozen=True)
class TrendReading:
    trend: Trend
    eta_s: float | None = None  # draining only: at the current drain rate


@dataclass
class TrendWindow:
    """Backlog samples over a sliding window, judged in the manner of Burrow.

    caught_up: no backlog. stalled: a backlog and the group committed nothing over the window.
    draining: the backlog shrinks (ETA at the window's rate). growing: it rises although the
    group commits. steady: the group commits as fast as records arrive.
    """

    window_s: float
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, backlog: Backlog) -> None:
        self.samples.append((backlog.at, backlog.total, backlog.consumed))
        while len(self.samples) > 2 and self.samples[1][0] <= backlog.at - self.window_s:
            self.samples.popleft()

    def reset(self) -> None:
        """Forgets the history: offsets moved by a replay are no progress."""
        self.samples.clear()

    def reading(self) -> TrendReading:
        if not self.samples:
            return TrendReading("steady")
        first_at, first_total, first_consumed = self.samples[0]
        last_at, last_total, last_consumed = self.samples[-1]
        if last_total == 0:
            return TrendReading("caught_up")
        if len(self.samples) < 2 or last_at <= first_at:
            return TrendReading("steady")
        if last_consumed <= first_consumed:
            return TrendReading("stalled")
        rate = (first_total - last_total) / (last_at - first_at)
        if rate > 0:
            return TrendReading("draining", round(last_total / rate, 1))
        if last_total > first_total:
            return TrendReading("growing")
        return TrendReading("steady")


class OffsetReader:
    """Long-lived Kafka clients that read log-start/end offsets and a group's commits."""

    def __init__(self, bootstrap_servers: str, client_options: Mapping[str, Any]) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_options)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers, enable_auto_commit=False, **client_options
        )
        self._bootstrap = bootstrap_servers
        self._options = dict(client_options)
        self._partitions: dict[str, tuple[float, list[int]]] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._admin.start()
        await self._consumer.start()

    async def close(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def ping(self) -> None:
        """Raises unless a broker answers."""
        await self._admin.describe_cluster()

    async def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        """The partitions of the topics that exist (a topic not created yet has none)."""
        now = time.monotonic()
        names = list(dict.fromkeys(topics))
        stale = [t for t in names if now - self._partitions.get(t, (-1e9, []))[0] > _METADATA_TTL_S]
        if stale:
            async with self._lock:
                for described in await self._admin.describe_topics(stale):
                    found = [p["partition"] for p in described.get("partitions") or []]
                    if described["error_code"] != 0:
                        found = []  # not created yet: asked again next time
                    self._partitions[described["topic"]] = (now if found else -1e9, sorted(found))
        return [TopicPartition(t, p) for t in names for p in self._partitions.get(t, (0.0, []))[1]]

    async def edges(
        self, tps: list[TopicPartition]
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        """(log-start offsets, log-end offsets) of the partitions."""
        if not tps:
            return {}, {}
        starts, ends = await asyncio.gather(
            self._consumer.beginning_offsets(tps), self._consumer.end_offsets(tps)
        )
        return dict(starts), dict(ends)

    async def offsets_for_time(
        self, tps: list[TopicPartition], at_ms: int
    ) -> dict[TopicPartition, int]:
        """The first offset at or after `at_ms` per partition; the end when no record is newer."""
        if not tps:
            return {}
        found = await self._consumer.offsets_for_times({tp: at_ms for tp in tps})
        _, ends = await self.edges(tps)
        return {tp: found[tp].offset if found.get(tp) else ends[tp] for tp in tps}

    async def backlog(self, workflow: str, topics: Iterable[str]) -> Backlog:
        """DESIGN's backlog: Σ (log end - committed), no commit counting from the log start."""
        tps = await self.partitions(topics)
        if not tps:
            return Backlog([])
        committed, (starts, ends) = await asyncio.gather(
            self._committed(group_id(workflow), tps), self.edges(tps)
        )
        rows = []
        for tp in tps:
            meta = committed.get(tp)
            offset = meta.offset if meta is not None and meta.offset >= 0 else None
            rows.append(PartitionLag(tp.topic, tp.partition, ends[tp], offset, starts[tp]))
        return Backlog(rows)

    async def _committed(
        self, group: str, tps: list[TopicPartition], patience_s: float = 10.0
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """The group's commits; retried while the coordinator is not there yet (a new cluster
        creates __consumer_offsets on first use)."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                result: dict[
                    TopicPartition, OffsetAndMetadata
                ] = await self._admin.list_consumer_group_offsets(group, partitions=tps)
                return result
            except KafkaError as error:
                if not error.retriable or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def commit_as_group(self, workflow: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Commits offsets for the group from outside it: Kafka allows it only while the group
        has no members (a stopped workflow with no live worker)."""
        if not offsets:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=group_id(workflow),
            enable_auto_commit=False,
            **self._options,
        )
        await consumer.start()
        try:
            consumer.assign(list(offsets))
            await consumer.commit(dict(offsets))
        finally:
            await consumer.stop()
