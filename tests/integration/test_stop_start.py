"""Stop and start against the real broker: nothing written once STOPPED, nothing lost."""

from __future__ import annotations

import asyncio

from tests.integration.harness import Cluster, contacts, wait_for

WORKFLOW = "d365-to-campaign"


async def _profiles_count(cluster: Cluster) -> int:
    return int(cluster.emulators.stats("campaign")["counts"]["profile"])


async def test_a_worker_syncs_published_contacts_and_commits(cluster: Cluster) -> None:
    cluster.start_worker(WORKFLOW)
    generation = await cluster.control(WORKFLOW, "running")
    await cluster.wait_state(WORKFLOW, "RUNNING", generation)
    sent = contacts(300)
    await cluster.publish_contacts(sent)

    async def synced() -> bool:
        return await _profiles_count(cluster) == 300 and await cluster.lag(WORKFLOW) == 0

    await wait_for(synced, 60, "300 profiles and lag 0")
    profiles = await cluster.profiles()
    for contact in sent:
        profile = profiles[contact["contactid"]]
        assert profile["firstName"] == contact["firstname"]
        assert profile["email"] == contact["emailaddress1"]


async def test_stop_during_a_stream_writes_nothing_more_and_start_drains_everything(
    cluster: Cluster,
) -> None:
    cluster.start_worker(WORKFLOW)
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))

    steady = asyncio.create_task(_publish_steadily(cluster, batches=40, size=50))
    await wait_for(lambda: _profiles_count_positive(cluster), 30, "first profiles")
    stopped = await cluster.control(WORKFLOW, "stopped")
    await cluster.wait_state(WORKFLOW, "STOPPED", stopped)
    written_at_stop = cluster.emulators.stats("campaign")["requests"]
    sent_after = await steady
    await asyncio.sleep(3)  # a write that was going to leak would show by now
    assert cluster.emulators.stats("campaign")["requests"] == written_at_stop
    backlog = await cluster.lag(WORKFLOW)
    assert backlog > 0
    assert backlog == 40 * 50 - await _profiles_count(cluster)
    assert sent_after == 40 * 50

    started = await cluster.control(WORKFLOW, "running")
    await cluster.wait_state(WORKFLOW, "RUNNING", started)

    async def drained() -> bool:
        return await cluster.lag(WORKFLOW) == 0 and await _profiles_count(cluster) == 2000

    await wait_for(drained, 90, "backlog drained and 2000 profiles")


async def _profiles_count_positive(cluster: Cluster) -> bool:
    return await _profiles_count(cluster) > 0


async def _publish_steadily(cluster: Cluster, batches: int, size: int) -> int:
    sent = 0
    for _ in range(batches):
        sent += await cluster.publish_contacts(contacts(size))
        await asyncio.sleep(0.1)
    return sent
