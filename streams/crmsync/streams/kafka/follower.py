"""Reads a compacted topic from the beginning, then follows it: the latest value per key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

from aiokafka import TopicPartition

from crmsync.streams.kafka.clients import KafkaClients

OnRecord = Callable[[str, bytes | None], None]
#: Also gets the record's Kafka timestamp (ms), when the broker gave one.
OnTimedRecord = Callable[[str, bytes | None, int | None], None]


class CompactedTopicFollower:
    """Follows ``partitions`` of ``topic`` (None: every partition it has), outside any group.

    ``latest`` keeps the newest value per key (a tombstone removes the key) and ``on_record`` sees
    each record as it comes (``on_timed_record`` with its Kafka timestamp too); ``loaded`` is set
    once everything present at start was read, and ``changes()`` yields after each batch of new
    records, and raises what ended the following if it crashed; ``restart()`` then follows again
    from after the last record it read (the one that crashed it included: a record that crashes
    the follower is not read twice).
    """

    def __init__(
        self,
        kafka: KafkaClients,
        topic: str,
        on_record: OnRecord | None = None,
        *,
        on_timed_record: OnTimedRecord | None = None,
        partitions: Iterable[int] | None = (0,),
    ) -> None:
        self.topic = topic
        self._kafka = kafka
        self.latest: dict[str, bytes] = {}
        self.loaded = asyncio.Event()
        self.changed = asyncio.Event()
        self._on_record = on_record
        self._on_timed_record = on_timed_record
        self._partitions = None if partitions is None else sorted(partitions)
        self._consumer = kafka.consumer(auto_offset_reset="earliest", fetch_max_wait_ms=100)
        self._task: asyncio.Task[None] | None = None
        self._positions: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        await self._consumer.start()
        numbers = self._partitions if self._partitions is not None else await self._every()
        tps = [TopicPartition(self.topic, n) for n in numbers]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        ends = await self._consumer.end_offsets(tps)
        self._task = asyncio.create_task(self._follow(ends), name=f"follow:{self.topic}")

    async def _every(self) -> list[int]:
        """Every partition of the topic, as the cluster describes it (the consumer's own
        metadata names only topics it was asked about: it would say none)."""
        admin = self._kafka.admin()
        await admin.start()
        try:
            (described,) = await admin.describe_topics([self.topic])
        finally:
            await admin.close()
        found = sorted(p["partition"] for p in described.get("partitions") or [])
        if described["error_code"] != 0 or not found:
            raise RuntimeError(
                f"cannot follow {self.topic}: the cluster does not describe it "
                f"(error {described['error_code']})"
            )
        return found

    async def _follow(self, ends: dict[TopicPartition, int]) -> None:
        remaining = {tp for tp, end in ends.items() if end > 0}
        if not remaining:
            self.loaded.set()
        while True:
            batch = await self._consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    self._positions[tp] = record.offset + 1
                    key = record.key.decode() if record.key else ""
                    if record.value is None:
                        self.latest.pop(key, None)
                    else:
                        self.latest[key] = record.value
                    if self._on_record is not None:
                        self._on_record(key, record.value)
                    if self._on_timed_record is not None:
                        stamp = record.timestamp if record.timestamp >= 0 else None
                        self._on_timed_record(key, record.value, stamp)
                    if record.offset + 1 >= ends.get(tp, 0):
                        remaining.discard(tp)
            if not remaining:
                self.loaded.set()
            if batch:
                self.changed.set()

    async def restart(self) -> None:
        """Follows again (after a crash) from where it was; `latest` is kept."""
        await self._cancel()
        tps = list(self._consumer.assignment())
        for tp in tps:
            position = self._positions.get(tp)
            if position is not None:
                self._consumer.seek(tp, position)
        ends = await self._consumer.end_offsets(tps)
        self._task = asyncio.create_task(self._follow(ends), name=f"follow:{self.topic}")

    async def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:
                pass

    async def stop(self) -> None:
        await self._cancel()
        await self._consumer.stop()

    async def changes(self) -> AsyncIterator[None]:
        """Yields after every batch of new records; raises what ended the following."""
        while True:
            task = self._task
            assert task is not None, "start() first"
            changed = asyncio.ensure_future(self.changed.wait())
            try:
                await asyncio.wait({changed, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            if task.done():
                task.result()  # the crash, if it crashed
                raise RuntimeError(f"stopped following {self.topic}")
            self.changed.clear()
            yield None
