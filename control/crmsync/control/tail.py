"""The newest records of a topic (dead letters, audit entries), read outside any group."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from crmsync.control.backlog import OffsetReader

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
    """One long-lived consumer; reads are serialised (it is assigned anew for each)."""

    def __init__(
        self, bootstrap_servers: str, client_options: Mapping[str, Any], offsets: OffsetReader
    ) -> None:
        self._offsets = offsets
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            # one fetch holds little: a window of one partition, not the topic
            max_partition_fetch_bytes=1024 * 1024,
            fetch_max_bytes=4 * 1024 * 1024,
            **client_options,
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
