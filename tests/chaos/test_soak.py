"""Scenario 9: soak. Mixed traffic on all three workflows while each is stopped and started at
random every few seconds; at the end every target equals the expected state record by record.

Opt-outs are flipped in Campaign (through its API) while the same people's Dynamics rows are
edited in another field and published as the Dynamics source does, whole, with the flag as
Dynamics holds it then: both sides must end with the last flip (issue 14)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

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
from tests.chaos.workers import wait_drained, wait_worker
from tests.integration.harness import Cluster

SOAK_S = pick(40, 600, 180)
OPT_TOPICS = [topics.CONTACT_CHANGES, topics.PROFILE_CHANGES]
SOURCES = {D2C: [topics.CONTACT_CHANGES], C2D: [topics.EMAIL_EVENTS], OPT: OPT_TOPICS}

pytestmark = pytest.mark.timeout(SOAK_S + pick(600, 1500, 1200))


async def test_soak_mixed_traffic_with_random_stops_and_starts(cluster: Cluster) -> None:
    clock = Stopwatch()
    contacts = ContactTraffic()
    emails = await EmailTraffic.with_contacts(cluster, 40)
    optouts = await OptOutTraffic.on_both_sides(cluster, 80)
    for flow in SOURCES:
        await cluster.control(flow, "running")
    workers = [cluster.start_worker(flow) for flow in SOURCES]
    for worker in workers:
        await wait_worker(cluster, worker, "RUNNING")

    people = [str(uuid.uuid4()) for _ in range(pick(200, 2000))]
    version = dict.fromkeys(people, 0)
    ends = time.monotonic() + SOAK_S
    toggles: list[str] = []

    async def opt_outs() -> None:
        flips = await optouts.applied_flips(cluster, pick(15, 4, 5))
        await publish(cluster, topics.PROFILE_CHANGES, flips)
        await publish(cluster, topics.CONTACT_CHANGES, await optouts.edits(cluster, pick(6, 2, 2)))

    async def traffic() -> None:
        await publish(cluster, topics.CONTACT_CHANGES, [contacts.change(k, 0) for k in people])
        while time.monotonic() < ends:
            changed = random.sample(people, min(len(people), pick(40, 200)))
            for key in changed:
                version[key] += 1
            await asyncio.gather(
                publish(
                    cluster,
                    topics.CONTACT_CHANGES,
                    [contacts.change(k, version[k]) for k in changed],
                ),
                # All three go to Dynamics, whose service protection allows one user 6000
                # requests per 5 minutes (20/s): a longer soak stays within it (8 + 4 + 2 x 2).
                publish(cluster, topics.EMAIL_EVENTS, emails.events(pick(30, 8, 10))),
                opt_outs(),
            )
            await asyncio.sleep(pick(0.5, 1.0))

    async def chaos() -> None:
        desired = dict.fromkeys(SOURCES, "running")
        while time.monotonic() < ends:
            await asyncio.sleep(random.uniform(2, 5))
            flow = random.choice(list(SOURCES))
            desired[flow] = "stopped" if desired[flow] == "running" else "running"
            await cluster.control(flow, desired[flow])
            toggles.append(f"{flow}:{desired[flow]}")

    await asyncio.gather(traffic(), chaos())
    # Dynamics' service protection (6000 requests per 5 minutes) answers with a Retry-After of
    # up to 5 minutes once the soak has spent it; a stop or start waits for that write (see 3c).
    for flow in SOURCES:
        started = await cluster.control(flow, "running")
        await cluster.wait_state(flow, "RUNNING", started, within=330)
    for flow, names in SOURCES.items():
        await wait_drained(cluster, flow, names, within=600)
    assert all(worker.process.poll() is None for worker in workers)
    found = Comparison()
    found.add(await contacts.compare(cluster, ours=set(people)))
    for source in (emails, optouts):
        found.add(await source.compare(cluster))
    record(
        Outcome(
            "9. soak: 3 workflows, mixed traffic, random stop/start",
            sent=contacts.sent + emails.sent + optouts.sent,
            written=found.written,
            lost=found.lost,
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=await dlq_count(cluster, list(SOURCES)),
            seconds=clock.seconds,
            samples=[
                f"{SOAK_S} s, {len(toggles)} stops/starts: {' '.join(toggles)}",
                f"opt-in-out: {optouts.sent} Campaign flips, {optouts.edited} Dynamics edits of "
                f"{len(optouts.contacts)} people, both sides compared",
                *found.samples,
            ],
        )
    )
