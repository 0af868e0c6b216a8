"""Scenario 3: a target outage, and a storm of 429s with Retry-After, during a drain."""

from __future__ import annotations

import asyncio
import time

import pytest

from crmsync.streams.kafka import topics
from tests.chaos.conftest import pick, record
from tests.chaos.ledger import Comparison, Outcome, Stopwatch
from tests.chaos.traffic import (
    C2D,
    D2C,
    ContactTraffic,
    EmailTraffic,
    dlq_count,
    publish,
    publish_steadily,
)
from tests.chaos.workers import total_lag, wait_drained, wait_requests_beyond, wait_worker
from tests.integration.harness import Cluster
from tests.integration.workflow_helpers import requests, status_of

OUTAGE_S = pick(15, 60, 30)
STORM_S = pick(15, 60, 30)

pytestmark = pytest.mark.timeout(pick(240, 900, 500))


async def test_target_outage_during_a_drain(cluster: Cluster) -> None:
    clock = Stopwatch()
    traffic = ContactTraffic()
    first = traffic.versions(pick(300, 5000), 3)
    during = traffic.versions(pick(300, 5000), 3, tag="o")
    await cluster.control(D2C, "running")
    worker = cluster.start_worker(D2C)
    await wait_worker(cluster, worker, "RUNNING")
    await publish(cluster, topics.CONTACT_CHANGES, first)
    await wait_requests_beyond(cluster, "campaign", requests(cluster, "campaign") + 20)

    cluster.emulators.faults("campaign", outage_s=OUTAGE_S)
    ends = time.monotonic() + OUTAGE_S
    await publish_steadily(cluster, topics.CONTACT_CHANGES, during, batches=5, pause=OUTAGE_S / 10)
    backlog = await cluster.lag(D2C)
    assert backlog >= len(during), "the backlog holds everything published in the outage"
    (status,) = await status_of(cluster, D2C)
    assert status.state == "RUNNING", "an outage is retried, not a failure"
    await asyncio.sleep(max(0.0, ends - time.monotonic()))

    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES], within=120 + traffic.sent / 20)
    found = await traffic.compare(cluster)
    record(
        Outcome(
            "3a. target outage during a drain",
            sent=traffic.sent,
            written=found.written,
            lost=found.lost,
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=await dlq_count(cluster, [D2C]),
            seconds=clock.seconds,
            samples=[f"backlog during the outage: {backlog}", *found.samples],
        )
    )


async def test_429_storm_with_retry_after_on_both_targets(cluster: Cluster) -> None:
    clock = Stopwatch()
    contacts = ContactTraffic()
    emails = await EmailTraffic.with_contacts(cluster, 50)
    profiles = contacts.versions(pick(300, 5000), 3)
    activities = emails.events(pick(600, 10_000))
    await cluster.control(D2C, "running")
    await cluster.control(C2D, "running")
    workers = [cluster.start_worker(D2C), cluster.start_worker(C2D)]
    for worker in workers:
        await wait_worker(cluster, worker, "RUNNING")

    storm = {"error_rates": {"429": 0.5}, "retry_after_s": 1}
    cluster.emulators.faults("campaign", **storm)
    cluster.emulators.faults("d365", **storm)
    ends = time.monotonic() + STORM_S
    await asyncio.gather(
        publish_steadily(cluster, topics.CONTACT_CHANGES, profiles, batches=5, pause=1),
        publish_steadily(cluster, topics.EMAIL_EVENTS, activities, batches=5, pause=1),
    )
    await asyncio.sleep(max(0.0, ends - time.monotonic()))
    backlog = await total_lag(cluster, D2C, [topics.CONTACT_CHANGES]) + await total_lag(
        cluster, C2D, [topics.EMAIL_EVENTS]
    )
    cluster.emulators.clear_faults()

    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES], within=120 + contacts.sent / 20)
    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS], within=120 + emails.sent / 20)
    found = Comparison()
    found.add(await contacts.compare(cluster))
    found.add(await emails.compare(cluster))
    record(
        Outcome(
            "3b. 429 storm (50 %, Retry-After) on both targets",
            sent=contacts.sent + emails.sent,
            written=found.written,
            lost=found.lost,
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=await dlq_count(cluster, [D2C, C2D]),
            seconds=clock.seconds,
            samples=[f"backlog when the storm ended: {backlog}", *found.samples],
        )
    )


async def test_stop_while_the_target_asks_to_wait_minutes_is_prompt(cluster: Cluster) -> None:
    """Dynamics' service protection answers 429 with a Retry-After of up to five minutes. A Stop
    issued meanwhile must not wait for it: nothing is being written, only waited for."""
    clock = Stopwatch()
    emails = await EmailTraffic.with_contacts(cluster, 20)
    await cluster.control(C2D, "running")
    worker = cluster.start_worker(C2D)
    await wait_worker(cluster, worker, "RUNNING")
    # Every request refused, as once the 5-minute budget is spent: the requests of a batch
    # still queued for a connection slot wait out the Retry-After inside the sink.
    cluster.emulators.faults("d365", error_rates={"429": 1.0}, retry_after_s=240)
    await publish(cluster, topics.EMAIL_EVENTS, emails.events(pick(400, 1000)))
    await asyncio.sleep(3)  # the worker met the 429 and waits out its Retry-After

    took: list[float] = []

    async def stop_promptly() -> None:
        stopped = await cluster.control(C2D, "stopped")
        asked = time.monotonic()
        try:
            await cluster.wait_state(C2D, "STOPPED", stopped, within=15)
        finally:
            took.append(time.monotonic() - asked)

    try:
        await stop_promptly()  # the runtime's own wait for the Retry-After: ends at once
        started = await cluster.control(C2D, "running")
        await cluster.wait_state(C2D, "RUNNING", started, within=30)
        await asyncio.sleep(3)  # a new batch now waits in the sink for the rest of the pause
        await stop_promptly()
    finally:
        record(
            Outcome(
                "3c. stop while the target's Retry-After is minutes long",
                sent=emails.sent,
                written=0,
                lost=0,
                duplicated=0,
                dlq=await dlq_count(cluster, [C2D]),
                seconds=clock.seconds,
                samples=[f"STOPPED after {', '.join(f'{t:.0f} s' for t in took)}"],
                problem=""
                if len(took) == 2 and max(took) < 15
                else f"the stop did not complete within 15 s (times: {took})",
            )
        )
