"""The Dynamics sink splits a batch over its concurrency: keys kept whole and in order."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from crmsync.streams.sinks.base import SinkRecord
from crmsync.streams.sinks.dynamics import DynamicsSink, key_chunks
from crmsync.targets._http import RetryPolicy
from crmsync.targets._multipart import BatchRequest, BatchResponse, ChangeSet
from crmsync.targets.dynamics import DynamicsClient, Key
from crmsync.targets.errors import RecordRejected, Retryable
from crmsync.targets.settings import DynamicsTarget

FAST = RetryPolicy(attempts=2, budget_s=2, backoff_base_s=0.01, backoff_cap_s=0.02)


def event(n: int, key: int | None = None, **fields: Any) -> SinkRecord:
    """An email-open activity keyed by its event id (``key`` shares one between records)."""
    return SinkRecord(
        "crmsync_emailopens",
        f"evt-{n if key is None else key}",
        fields={"subject": f"n{n}", **fields},
        key_field="crmsync_eventid",
    )


def test_chunks_keep_every_key_whole_in_order_and_fill_the_ways() -> None:
    keys = [n % 37 for n in range(500)]  # most keys several times, spread through the batch
    records = [event(n, key=k) for n, k in enumerate(keys)]

    chunks = key_chunks(records, ways=16, least=25)

    assert sorted(i for chunk in chunks for i in chunk) == list(range(500))
    assert 1 < len(chunks) <= 16
    for chunk in chunks:
        for key in {records[i].key for i in chunk}:
            mine = [i for i in chunk if records[i].key == key]
            assert mine == [i for i, r in enumerate(records) if r.key == key]  # all, in order


def test_small_batches_stay_whole_and_no_chunk_is_below_the_minimum() -> None:
    assert key_chunks([event(n) for n in range(40)], ways=16, least=25) == [list(range(40))]
    assert key_chunks([], ways=16, least=25) == []
    chunks = key_chunks([event(n) for n in range(500)], ways=16, least=25)
    assert len(chunks) == 16 and min(len(c) for c in chunks) >= 25
    assert len(key_chunks([event(n) for n in range(100)], ways=16, least=25)) == 4


def _event_id(key: Key) -> str:
    assert isinstance(key, Mapping)
    return str(key["crmsync_eventid"])


class BulkDynamics(DynamicsClient):
    """UpsertMultiple and `$batch` answered in-process after a pause, counting calls in flight."""

    def __init__(self, concurrency: int = 16, fail: str | None = None) -> None:
        target = DynamicsTarget(url="http://127.0.0.1:9", max_concurrency=concurrency)
        super().__init__(target, retry=FAST)
        self.fail = fail
        self.in_flight = 0
        self.most_in_flight = 0
        self.bulk_calls: list[list[tuple[Key, Mapping[str, Any]]]] = []
        self.batch_calls: list[list[BatchRequest | ChangeSet]] = []

    async def _held(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.in_flight -= 1

    async def upsert_multiple(
        self, entity_set: str, items: Sequence[tuple[Key, Mapping[str, Any]]]
    ) -> None:
        self.bulk_calls.append(list(items))
        await self._held()
        if self.fail and any(_event_id(k) == self.fail for k, _ in items):
            raise Retryable("HTTP 503: scripted outage of one chunk")

    async def batch(
        self, items: Sequence[BatchRequest | ChangeSet], *, continue_on_error: bool = True
    ) -> list[BatchResponse]:
        self.batch_calls.append(list(items))
        await self._held()
        count = sum(len(i.requests) if isinstance(i, ChangeSet) else 1 for i in items)
        return [BatchResponse(204, {}, "") for _ in range(count)]


async def test_a_batch_goes_out_as_concurrent_bulk_calls_within_the_cap() -> None:
    client = BulkDynamics(concurrency=8)
    sink = DynamicsSink(client, min_chunk_records=25)

    outcomes = await sink.write_batch([event(n) for n in range(500)])

    assert outcomes == [None] * 500
    assert len(client.bulk_calls) == 8
    assert client.most_in_flight == 8  # every slot used, none more
    written = [_event_id(k) for call in client.bulk_calls for k, _ in call]
    assert sorted(written) == sorted(f"evt-{n}" for n in range(500))


async def test_a_failed_chunk_fails_only_its_records() -> None:
    client = BulkDynamics(concurrency=4, fail="evt-3")
    sink = DynamicsSink(client, min_chunk_records=25)

    outcomes = await sink.write_batch([event(n) for n in range(200)])

    failed = [n for n, o in enumerate(outcomes) if o is not None]
    assert failed == list(range(50))  # the first chunk: evt-0 … evt-49
    assert all(isinstance(outcomes[n], Retryable) for n in failed)
    assert not any(isinstance(o, RecordRejected) for o in outcomes)


async def test_repeated_keys_are_written_in_order_across_concurrent_chunks() -> None:
    client = BulkDynamics(concurrency=4)
    sink = DynamicsSink(client, min_chunk_records=25)
    records = [event(n, key=n % 20) for n in range(200)]  # ten versions of each of 20 keys

    assert await sink.write_batch(records) == [None] * 200

    bodies: dict[str, list[str]] = {}
    for call in client.batch_calls:  # each call: one round of one chunk, one request per key
        for request in call:
            assert isinstance(request, BatchRequest) and request.body is not None
            key = request.url.split("crmsync_eventid='")[1].split("'")[0]
            bodies.setdefault(key, []).append(request.body["subject"])
    assert client.most_in_flight > 1
    for k in range(20):
        assert bodies[f"evt-{k}"] == [f"n{n}" for n in range(200) if n % 20 == k]


async def test_an_atomic_sink_keeps_its_batch_whole() -> None:
    client = BulkDynamics(concurrency=8)
    sink = DynamicsSink(client, atomic=True)

    assert await sink.write_batch([event(n) for n in range(500)]) == [None] * 500
    assert client.most_in_flight == 1
