"""Scenario 1: a worker killed with SIGKILL at random moments of a drain, restarted each time."""

from __future__ import annotations

import asyncio
import random

import pytest

from crmsync.streams.kafka import topics
from tests.chaos.conftest import pick, record
from tests.chaos.ledger import Outcome, Stopwatch
from tests.chaos.traffic import D2C, ContactTraffic, dlq_count, publish
from tests.chaos.workers import wait_drained, wait_requests_beyond, wait_worker
from tests.integration.harness import Cluster
from tests.integration.workflow_helpers import requests

KILLS = pick(5, 8, 6)
PEOPLE = pick(400, 20_000)
VERSIONS = 5

pytestmark = pytest.mark.timeout(pick(240, 1500, 600))


async def test_worker_killed_at_random_moments_of_a_drain(cluster: Cluster) -> None:
    clock = Stopwatch()
    traffic = ContactTraffic()
    records = traffic.versions(PEOPLE, VERSIONS)
    await publish(cluster, topics.CONTACT_CHANGES, records)
    await cluster.control(D2C, "running")

    # A slower target keeps the drain going through every kill, however fast the machine.
    cluster.emulators.faults("campaign", latency_ms=150)
    kills = []
    worker = cluster.start_worker(D2C)
    for _ in range(KILLS):
        await wait_worker(cluster, worker, "RUNNING")
        await wait_requests_beyond(cluster, "campaign", requests(cluster, "campaign"))
        await asyncio.sleep(random.uniform(0.2, 5.0))
        backlog = await cluster.lag(D2C)
        worker.kill()
        kills.append(backlog)
        assert backlog > 0, f"kill {len(kills)} came after the drain: make it longer"
        worker = cluster.start_worker(D2C)

    cluster.emulators.clear_faults()
    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES], within=60 + len(records) / 20)
    found = await traffic.compare(cluster)
    record(
        Outcome(
            "1. worker kill -9 at random moments, restarted",
            sent=traffic.sent,
            written=found.written,
            lost=found.lost,
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=await dlq_count(cluster, [D2C]),
            seconds=clock.seconds,
            samples=[f"backlog at each kill: {kills}", *found.samples],
        )
    )
