"""The revoke fence, against the real broker: a worker that lost a partition writes none of it."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka.partitioner import DefaultPartitioner

from crmsync.streams.app import run_worker
from crmsync.streams.kafka import topics
from crmsync.streams.settings import Settings
from crmsync.streams.sinks.base import Outcome, SinkRecord
from crmsync.targets.errors import Retryable
from tests.integration.harness import PARTITIONS, Cluster, contacts, wait_for

WORKFLOW = "d365-to-campaign"


@dataclass
class _Landed:
    worker: str
    partition: int
    key: str
    first_name: str
    started: float
    landed: float


@dataclass
class _SlowThrottledTarget:
    """A target that takes 2 s per request and throttles two in three (429, Retry-After).

    A write lands when the request ends; a request given up before (cancelled) writes nothing.
    Every sink of every in-process worker shares it, so the test sees who wrote what, when.
    """

    landed: list[_Landed] = field(default_factory=list)
    latest: dict[str, str] = field(default_factory=dict)
    #: Every request: who sent it, the partitions of its records, when it started.
    requests: list[tuple[str, set[int], float]] = field(default_factory=list)
    _calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def sink(self, worker: str) -> _WorkerSink:
        return _WorkerSink(self, worker)

    async def write(self, worker: str, records: Sequence[SinkRecord]) -> list[Outcome]:
        started = time.monotonic()
        self.requests.append((worker, {_partition(r.key) for r in records}, started))
        self._calls[worker] += 1
        await asyncio.sleep(2.0)
        if self._calls[worker] % 3:
            return [Retryable("throttled", retry_after=0.5)] * len(records)
        now = time.monotonic()
        for record in records:
            self.landed.append(
                _Landed(
                    worker,
                    _partition(record.key),
                    record.key,
                    str(record.fields.get("firstName")),
                    started,
                    now,
                )
            )
            self.latest[record.key] = str(record.fields.get("firstName"))
        return [None] * len(records)


@dataclass
class _WorkerSink:
    target: _SlowThrottledTarget
    worker: str

    async def write_batch(self, records: Sequence[SinkRecord]) -> list[Outcome]:
        return await self.target.write(self.worker, records)

    async def aclose(self) -> None:
        return None


async def _both_writing(target: _SlowThrottledTarget) -> bool:
    return {worker for worker, _, _ in target.requests} == {"w1", "w2"}


async def _split(cluster: Cluster) -> bool:
    live = [
        status
        for status in await cluster.statuses(WORKFLOW)
        if status.state == "RUNNING" and status.heartbeat_ms > (time.time() - 5) * 1000
    ]
    contact_partitions = [
        [p for p in status.partitions if p.startswith(f"{topics.CONTACT_CHANGES}[")]
        for status in live
    ]
    return sorted(len(owned) for owned in contact_partitions) == [PARTITIONS // 2] * 2


_partitioner = DefaultPartitioner()


def _partition(key: str) -> int:
    every = list(range(PARTITIONS))
    return int(_partitioner(key.encode(), every, every))


async def test_a_worker_joining_mid_write_never_meets_a_late_write_of_the_partitions_it_got(
    cluster: Cluster,
) -> None:
    target = _SlowThrottledTarget()
    stops: list[asyncio.Event] = []
    runs: list[asyncio.Task[None]] = []

    def start(worker: str) -> None:
        settings = Settings(
            home=cluster.home,
            kafka_bootstrap_servers=cluster.bootstrap,
            topic_partitions=PARTITIONS,
            worker_id=worker,
            heartbeat_s=0.5,
            session_timeout_s=6,
            batch_wait_s=0.05,
            batch_max_records=100,
        )
        stop = asyncio.Event()
        stops.append(stop)
        runs.append(
            asyncio.create_task(
                run_worker(WORKFLOW, settings, sinks={"campaign": target.sink(worker)}, stop=stop)
            )
        )

    await cluster.control(WORKFLOW, "running")
    start("w1")
    start("w2")
    try:
        await wait_for(lambda: _split(cluster), 60, "two workers sharing the partitions")
        # Stopped while the contacts are published: each worker's first batch, fetched at
        # Start, then holds every partition it owns, so whichever partition the third worker
        # takes, its earlier owner is writing it.
        stopped = await cluster.control(WORKFLOW, "stopped")
        await cluster.wait_state(WORKFLOW, "STOPPED", stopped, workers=2)
        people = contacts(100)
        await cluster.publish_contacts(people)
        await cluster.wait_state(
            WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"), workers=2
        )
        await wait_for(lambda: _both_writing(target), 30, "both workers' first writes under way")
        first = {worker: parts for worker, parts, _ in reversed(target.requests)}
        assert all(len(parts) == PARTITIONS // 2 for parts in first.values()), first
        await asyncio.sleep(0.8)  # mid-batch: the first batches land after 7 s
        renamed = [{**person, "firstname": f"{person['firstname']}v2"} for person in people]
        await cluster.publish_contacts(renamed)
        start("w3")

        async def synced() -> bool:
            return await cluster.lag(WORKFLOW) == 0 and len(target.latest) == len(people)

        await wait_for(synced, 240, "every contact written and lag 0")
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*runs, return_exceptions=True)

    # A partition changes hands: every write of its earlier owner must land before the new
    # owner's first request for it starts.
    first_request: dict[tuple[int, str], float] = {}
    for worker, partitions, started in target.requests:
        for partition in partitions:
            first_request.setdefault((partition, worker), started)
    late = [
        (write.worker, write.partition, write.key, round(write.landed - begun, 2), other)
        for write in target.landed
        for (partition, other), begun in first_request.items()
        if partition == write.partition
        and other != write.worker
        and begun > first_request[(partition, write.worker)]
        and write.landed > begun
    ]
    assert len({w.worker for w in target.landed}) == 3, "the third worker got partitions"
    assert not late, (
        f"{len(late)} writes landed after another worker took the partition: {late[:3]}"
    )
    for person in renamed:
        assert target.latest[person["contactid"]] == person["firstname"]
