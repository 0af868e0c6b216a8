"""Offsets and tail reads outside any group: log edges, a group's commits and lag, tails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from crmsync.streams.kafka.clients import KafkaClients

#: How long a topic's partition list is trusted before the metadata is read again.
_METADATA_TTL_S = 30.0


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


class OffsetReader:
    """Long-lived Kafka clients that read log-start/end offsets and a group's commits."""

    def __init__(self, kafka: KafkaClients) -> None:
        self._kafka = kafka
        self._admin = kafka.admin()
        self._consumer = kafka.consumer()
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

    async def backlog(self, group: str, topics: Iterable[str]) -> Backlog:
        """DESIGN's backlog of a consumer group: Σ (log end - committed), a partition with no
        commit counting from the log start."""
        tps = await self.partitions(topics)
        if not tps:
            return Backlog([])
        committed, (starts, ends) = await asyncio.gather(
            self._committed(group, tps), self.edges(tps)
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

    async def commit_as_group(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Commits offsets for the group from outside it: Kafka allows it only while the group
        has no members (a stopped workflow with no live worker)."""
        if not offsets:
            return
        consumer = self._kafka.consumer(group_id=group)
        await consumer.start()
        try:
            consumer.assign(list(offsets))
            await consumer.commit(dict(offsets))
        finally:
            await consumer.stop()


#: A bound on one read, whatever the topic holds.
MAX_RECORDS = 1000


class TopicTail:
    """The newest records of a topic (dead letters, audit entries), read outside any group.

    One long-lived consumer; reads are serialised (it is assigned anew for each)."""

    def __init__(self, kafka: KafkaClients, offsets: OffsetReader) -> None:
        self._offsets = offsets
        self._consumer = kafka.consumer(fetch_max_wait_ms=50)
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._consumer.start()

    async def close(self) -> None:
        await self._consumer.stop()

    async def newest(
        self, topic: str, limit: int, timeout_s: float = 10.0
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """Up to `limit` newest records over all partitions, newest first (by timestamp)."""
        limit = max(0, min(limit, MAX_RECORDS))
        async with self._lock:
            tps = await self._offsets.partitions([topic])
            if not tps or limit == 0:
                return []
            self._consumer.assign(tps)
            starts = await self._consumer.beginning_offsets(tps)
            ends = await self._consumer.end_offsets(tps)
            wanted = {tp: ends[tp] for tp in tps if ends[tp] > starts[tp]}
            for tp in tps:
                self._consumer.seek(tp, max(starts[tp], ends[tp] - limit))
            records: list[ConsumerRecord[bytes, bytes]] = []
            async with asyncio.timeout(timeout_s):
                while wanted:
                    batch = await self._consumer.getmany(*wanted, timeout_ms=200)
                    for tp, messages in batch.items():
                        records += [m for m in messages if m.offset < wanted.get(tp, 0)]
                    for tp in list(wanted):
                        if await self._consumer.position(tp) >= wanted[tp]:
                            del wanted[tp]
            self._consumer.unsubscribe()
        records.sort(key=lambda r: (r.timestamp, r.partition, r.offset), reverse=True)
        return records[:limit]
