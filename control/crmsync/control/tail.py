"""The newest records of a topic (dead letters, audit entries), read outside any group."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from crmsync.control.backlog import OffsetReader

#: A bound on one read, whatever the topic holds.
MAX_RECORDS = 1000


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
            **client_options,
        )
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
