"""Reading the newest dead letters fetches only what the answer needs: newest first across the
partitions, within a byte budget, whatever the topic holds."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer

from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.offsets import READ_BUDGET, OffsetReader, TopicTail

pytestmark = pytest.mark.timeout(120)
PARTITIONS, PER_PARTITION, SIZE = 3, 30, 300_000  # 27 MB in all, past the 16 MiB budget


@pytest.fixture
async def tail(bootstrap: str) -> AsyncIterator[TopicTail]:
    kafka = KafkaClients(bootstrap)
    offsets = OffsetReader(kafka)
    reader = TopicTail(kafka, offsets)
    await offsets.start()
    await reader.start()
    yield reader
    await reader.close()
    await offsets.close()


async def _fill(bootstrap: str, topic: str) -> list[tuple[int, int]]:
    """Records with timestamps interleaved across the partitions; (timestamp, partition)."""
    await topics.ensure_topics(bootstrap, [topics.TopicSpec(topic, PARTITIONS)])
    sent = []
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=2 * SIZE)
    await producer.start()
    try:
        for n in range(PARTITIONS * PER_PARTITION):
            partition, stamp = n % PARTITIONS, 1_700_000_000_000 + n * 1000
            await producer.send_and_wait(
                topic, b"x" * SIZE, key=str(n).encode(), partition=partition, timestamp_ms=stamp
            )
            sent.append((stamp, partition))
    finally:
        await producer.stop()
    return sent


async def test_the_newest_come_first_across_partitions_and_the_read_stays_in_budget(
    bootstrap: str, topic: str, tail: TopicTail
) -> None:
    sent = await _fill(bootstrap, topic)

    newest = await tail.newest(topic, 10)
    assert [r.timestamp for r in newest] == sorted((s for s, _ in sent), reverse=True)[:10]
    everything = await tail.newest(topic, 1000)
    fetched = sum(len(r.value or b"") for r in everything)
    assert fetched <= READ_BUDGET + 16 * SIZE, f"{fetched} bytes kept for one listing"
    stamps = [r.timestamp for r in everything]
    assert stamps == sorted(stamps, reverse=True), "newest first"
    assert stamps == sorted((s for s, _ in sent), reverse=True)[: len(stamps)], "none skipped"
    records, complete = await tail.newest_within(topic, 1000)
    assert not complete and len(records) == len(everything) < len(sent)
