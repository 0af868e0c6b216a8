"""Offsets and tail reads outside any group: log edges, a group's commits and lag, tails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
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
#: Bytes (keys, values, headers) one read may fetch: a DLQ takes records of up to 4 MiB, so
#: `limit` records of 6 partitions could otherwise be gigabytes.
READ_BUDGET = 16 * 1024 * 1024
#: Records read back per partition at a time (the newest first).
_WINDOW = 16


def record_size(record: ConsumerRecord[bytes, bytes]) -> int:
    headers = sum(len(k) + len(v or b"") for k, v in record.headers or ())
    return len(record.key or b"") + len(record.value or b"") + headers


class TopicTail:
    """The newest records of a topic (dead letters, audit entries), read outside any group.

    One long-lived consumer; reads are serialised (it is assigned anew for each)."""

    def __init__(self, kafka: KafkaClients, offsets: OffsetReader) -> None:
        self._offsets = offsets
        self._consumer = kafka.consumer(
            fetch_max_wait_ms=50,
            # one fetch holds little: a window of one partition, not the topic
            max_partition_fetch_bytes=1024 * 1024,
            fetch_max_bytes=4 * 1024 * 1024,
        )
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._consumer.start()

    async def close(self) -> None:
        await self._consumer.stop()

    async def newest(
        self, topic: str, limit: int, timeout_s: float = 10.0, budget: int = READ_BUDGET
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """Up to `limit` newest records over all partitions, newest first (by timestamp).

        Each partition is read backwards a window at a time and the partitions are merged, so
        only what the answer needs is fetched; the read stops once `budget` bytes were fetched
        (the answer is then the newest records up to there, still in order)."""
        return (await self.newest_within(topic, limit, timeout_s, budget))[0]

    async def newest_within(
        self, topic: str, limit: int, timeout_s: float = 10.0, budget: int = READ_BUDGET
    ) -> tuple[list[ConsumerRecord[bytes, bytes]], bool]:
        """`newest`, and whether the answer is complete (False: the byte budget ended it)."""
        limit = max(0, min(limit, MAX_RECORDS))
        async with self._lock:
            tps = await self._offsets.partitions([topic])
            if not tps or limit == 0:
                return [], True
            starts = await self._consumer.beginning_offsets(tps)
            ends = await self._consumer.end_offsets(tps)
            reader = _Backwards(self._consumer, starts, ends, budget)
            taken: list[ConsumerRecord[bytes, bytes]] = []
            try:
                async with asyncio.timeout(timeout_s):
                    while len(taken) < limit:
                        for tp in tps:
                            while not reader.buffers[tp] and await reader.fill(tp):
                                pass  # a window can be empty (compaction, transactions)
                            if not reader.buffers[tp] and reader.unread(tp):
                                return taken, False  # the budget is spent: stop, in order
                        ready = [tp for tp in tps if reader.buffers[tp]]
                        if not ready:
                            break
                        tp = max(ready, key=lambda t: _order(reader.buffers[t][-1]))
                        taken.append(reader.buffers[tp].pop())
            finally:
                self._consumer.unsubscribe()
        return taken, True


def _order(record: ConsumerRecord[bytes, bytes]) -> tuple[int, int, int]:
    return record.timestamp, record.partition, record.offset


class _Backwards:
    """Reads partitions from their end towards their start, a window at a time, in budget."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        starts: Mapping[TopicPartition, int],
        ends: Mapping[TopicPartition, int],
        budget: int,
    ) -> None:
        self._consumer = consumer
        self._starts = starts
        self._cursor = dict(ends)  # everything at or past it was read already
        self._left = budget
        self.buffers: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {
            tp: [] for tp in ends
        }

    def unread(self, tp: TopicPartition) -> bool:
        return bool(self._cursor[tp] > self._starts[tp])

    async def fill(self, tp: TopicPartition) -> bool:
        """Reads the window before the cursor of `tp`; False when nothing more may be read."""
        if not self.unread(tp) or self._left <= 0:
            return False
        low, high = max(self._starts[tp], self._cursor[tp] - _WINDOW), self._cursor[tp]
        self._consumer.assign([tp])
        self._consumer.seek(tp, low)
        window: list[ConsumerRecord[bytes, bytes]] = []
        while await self._consumer.position(tp) < high:
            batch = await self._consumer.getmany(tp, timeout_ms=200)
            window += [m for m in batch.get(tp, []) if low <= m.offset < high]
        self._cursor[tp] = low
        self._left -= sum(record_size(m) for m in window)
        self.buffers[tp] = window + self.buffers[tp]
        return True
