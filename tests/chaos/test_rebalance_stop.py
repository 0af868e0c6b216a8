"""Scenario 5: two workers per workflow; during a drain one is killed and one added (two
rebalances), and a stop is issued while they run. Once STOPPED shows, nothing more reaches the
targets; Start drains everything."""

from __future__ import annotations

import asyncio

import pytest

from crmsync.streams.kafka import topics
from tests.chaos.conftest import pick, record
from tests.chaos.ledger import Comparison, Outcome, Stopwatch
from tests.chaos.traffic import (
    C2D,
    D2C,
    OPT,
    ContactTraffic,
    EmailTraffic,
    OptOutTraffic,
    dlq_count,
    publish,
)
from tests.chaos.workers import wait_drained, wait_quiet, wait_requests_beyond, wait_worker
from tests.integration.harness import Cluster
from tests.integration.workflow_helpers import requests

OPT_TOPICS = [topics.CONTACT_CHANGES, topics.PROFILE_CHANGES]
SOURCES = {D2C: [topics.CONTACT_CHANGES], C2D: [topics.EMAIL_EVENTS], OPT: OPT_TOPICS}

pytestmark = pytest.mark.timeout(pick(300, 1200, 600))


async def test_kill_one_add_one_and_stop_during_the_rebalance(cluster: Cluster) -> None:
    clock = Stopwatch()
    contacts = ContactTraffic()
    emails = await EmailTraffic.with_contacts(cluster, 30)
    optouts = await OptOutTraffic.with_contacts(cluster, 50)
    for flow in SOURCES:
        await cluster.control(flow, "running")
    pairs = {flow: [cluster.start_worker(flow), cluster.start_worker(flow)] for flow in SOURCES}
    for workers in pairs.values():
        for worker in workers:
            await wait_worker(cluster, worker, "RUNNING")
    # A slower target: the drain is still going when the workers change.
    cluster.emulators.faults("campaign", latency_ms=20)
    cluster.emulators.faults("d365", latency_ms=20)
    await asyncio.gather(
        publish(cluster, topics.CONTACT_CHANGES, contacts.versions(pick(400, 8000), 3)),
        publish(cluster, topics.EMAIL_EVENTS, emails.events(pick(400, 8000))),
        publish(cluster, topics.PROFILE_CHANGES, optouts.flips(pick(300, 5000))),
    )
    await wait_requests_beyond(cluster, "campaign", requests(cluster, "campaign") + 50)

    for flow, (doomed, _) in pairs.items():
        doomed.kill()
        pairs[flow].append(cluster.start_worker(flow))
    await asyncio.sleep(1.0)  # the newcomers are joining: the groups rebalance
    generations = {flow: await cluster.control(flow, "stopped") for flow in SOURCES}
    for flow, generation in generations.items():
        await cluster.wait_state(flow, "STOPPED", generation, workers=2, within=90)
    await wait_quiet(cluster, 4.0)  # nothing written once every live worker is STOPPED
    backlogs = {
        flow: sum([await cluster.lag(flow, topic) for topic in names])
        for flow, names in SOURCES.items()
    }
    cluster.emulators.clear_faults()

    for flow in SOURCES:
        started = await cluster.control(flow, "running")
        await cluster.wait_state(flow, "RUNNING", started, workers=2, within=90)
    for flow, names in SOURCES.items():
        await wait_drained(cluster, flow, names, within=180)
    found = Comparison()
    for traffic in (contacts, emails, optouts):
        found.add(await traffic.compare(cluster))
    record(
        Outcome(
            "5. 2 workers/workflow: kill one, add one, stop in the rebalance, start",
            sent=contacts.sent + emails.sent + optouts.sent,
            written=found.written,
            lost=found.lost,
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=await dlq_count(cluster, list(SOURCES)),
            seconds=clock.seconds,
            samples=[f"backlogs when stopped: {backlogs}", *found.samples],
        )
    )
