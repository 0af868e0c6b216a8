"""Stop and start against the real broker: nothing written once STOPPED, nothing lost."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.harness import WORKER_COMMANDS, Cluster, contacts, group_members, wait_for

WORKFLOW = "d365-to-campaign"


@pytest.fixture(autouse=True, params=WORKER_COMMANDS)
def _worker_command(cluster: Cluster, request: pytest.FixtureRequest) -> None:
    """Every test here runs with `crmsync worker` and with `faust -A crmsync.streams.worker`."""
    cluster.command = request.param


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


async def test_a_stop_mid_batch_sends_no_new_request_and_commits_what_was_written(
    cluster: Cluster,
) -> None:
    """A slow target keeps one batch in flight for seconds: a Stop lets the requests already
    sent be answered, sends no other, and commits what they wrote, so the backlog shown is
    exactly what the target lacks."""
    cluster.emulators.faults("campaign", latency_ms=200)  # 500 creates ≈ 6 s at 16 at a time
    cluster.start_worker(WORKFLOW)
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    await cluster.publish_contacts(contacts(500))
    await wait_for(lambda: _profiles_count_positive(cluster), 30, "first profiles")
    stopped = await cluster.control(WORKFLOW, "stopped")
    await cluster.wait_state(WORKFLOW, "STOPPED", stopped)
    requests_at_stop = cluster.emulators.stats("campaign")["requests"]
    await asyncio.sleep(1)  # five times the latency: a request sent after STOPPED would show
    assert cluster.emulators.stats("campaign")["requests"] == requests_at_stop
    written = await _profiles_count(cluster)
    assert 0 < written < 500
    assert await cluster.lag(WORKFLOW) == 500 - written

    cluster.emulators.clear_faults()
    started = await cluster.control(WORKFLOW, "running")
    await cluster.wait_state(WORKFLOW, "RUNNING", started)

    async def drained() -> bool:
        return await cluster.lag(WORKFLOW) == 0 and await _profiles_count(cluster) == 500

    await wait_for(drained, 60, "backlog drained and 500 profiles")


async def _profiles_count_positive(cluster: Cluster) -> bool:
    return await _profiles_count(cluster) > 0


async def _publish_steadily(cluster: Cluster, batches: int, size: int) -> int:
    sent = 0
    for _ in range(batches):
        sent += await cluster.publish_contacts(contacts(size))
        await asyncio.sleep(0.1)
    return sent


async def test_stops_and_starts_mid_batch_under_back_pressure_lose_nothing(
    cluster: Cluster,
) -> None:
    """The pause trap: records fetched before a stop must be read again after the start."""
    cluster.emulators.faults("campaign", latency_ms=15)  # slow target: buffers fill up
    cluster.start_worker(WORKFLOW, CRMSYNC_BATCH_MAX_RECORDS="100")
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    first = contacts(1500, tag="a")
    await cluster.publish_contacts(first)
    # a second version of every contact: the target must end with it (per-key order)
    second = [{**c, "firstname": f"{c['firstname'][:25]}-v2"} for c in first]
    await cluster.publish_contacts(second)

    for _ in range(4):
        await asyncio.sleep(1.5)
        await cluster.wait_state(WORKFLOW, "STOPPED", await cluster.control(WORKFLOW, "stopped"))
        await asyncio.sleep(0.5)
        await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    cluster.emulators.clear_faults()

    async def drained() -> bool:
        return await cluster.lag(WORKFLOW) == 0

    await wait_for(drained, 120, "backlog drained")
    profiles = await cluster.profiles()
    assert len(profiles) == 1500
    stale = [
        c["contactid"] for c in second if profiles[c["contactid"]]["firstName"] != c["firstname"]
    ]
    assert stale == []


async def test_a_worker_joining_while_stopped_leaves_the_workflow_stopped(
    cluster: Cluster,
) -> None:
    cluster.start_worker(WORKFLOW)
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    stopped = await cluster.control(WORKFLOW, "stopped")
    await cluster.wait_state(WORKFLOW, "STOPPED", stopped)
    cluster.start_worker(WORKFLOW)  # joins the group: a rebalance while stopped
    await cluster.wait_state(WORKFLOW, "STOPPED", stopped, workers=2)
    await cluster.publish_contacts(contacts(200))
    await asyncio.sleep(8)  # the rebalance and any wrongly resumed fetch have happened by now
    assert await _profiles_count(cluster) == 0
    assert await cluster.lag(WORKFLOW) == 200

    started = await cluster.control(WORKFLOW, "running")
    await cluster.wait_state(WORKFLOW, "RUNNING", started, workers=2)

    async def drained() -> bool:
        return await cluster.lag(WORKFLOW) == 0 and await _profiles_count(cluster) == 200

    await wait_for(drained, 60, "200 profiles")


async def test_a_stop_longer_than_the_max_poll_interval_keeps_the_group(
    cluster: Cluster,
) -> None:
    cluster.start_worker(WORKFLOW, CRMSYNC_MAX_POLL_INTERVAL_S="4")
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    stopped = await cluster.control(WORKFLOW, "stopped")
    await cluster.wait_state(WORKFLOW, "STOPPED", stopped)
    members = await group_members(cluster.bootstrap, f"crmsync.{WORKFLOW}")
    assert len(members) == 1
    await asyncio.sleep(12)  # three times the max poll interval
    assert await group_members(cluster.bootstrap, f"crmsync.{WORKFLOW}") == members
    await cluster.publish_contacts(contacts(50))
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))

    async def synced() -> bool:
        return await _profiles_count(cluster) == 50

    await wait_for(synced, 30, "50 profiles")


async def test_replay_from_earliest_while_stopped_resyncs_without_duplicates(
    cluster: Cluster,
) -> None:
    cluster.start_worker(WORKFLOW)
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    await cluster.publish_contacts(contacts(120))

    async def synced() -> bool:
        return await cluster.lag(WORKFLOW) == 0 and await _profiles_count(cluster) == 120

    await wait_for(synced, 60, "120 profiles")
    stopped = await cluster.control(WORKFLOW, "stopped")
    await cluster.wait_state(WORKFLOW, "STOPPED", stopped)
    requests_before = cluster.emulators.stats("campaign")["requests"]

    await cluster.control(WORKFLOW, "stopped", replay={"id": "r1", "from": "earliest"})

    async def replayed() -> bool:
        return any(s.replayed == "r1" for s in await cluster.statuses(WORKFLOW))

    await wait_for(replayed, 30, "the worker to carry out the replay")
    assert await cluster.lag(WORKFLOW) == 120  # the whole topic is backlog again
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    await wait_for(synced, 60, "re-synced")
    assert cluster.emulators.stats("campaign")["requests"] > requests_before  # written again
    assert await _profiles_count(cluster) == 120  # and no duplicates


async def test_sigterm_during_a_target_outage_leaves_promptly_without_acking(
    cluster: Cluster,
) -> None:
    worker = cluster.start_worker(WORKFLOW)
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    cluster.emulators.faults("campaign", outage_s=120)
    await cluster.publish_contacts(contacts(100))
    await asyncio.sleep(3)  # the worker is retrying against the outage now
    assert await cluster.lag(WORKFLOW) == 100
    started = asyncio.get_running_loop().time()
    assert worker.terminate(timeout=30) == 0
    assert asyncio.get_running_loop().time() - started < 20
    assert await cluster.lag(WORKFLOW) == 100  # nothing acked that was not written
    assert await group_members(cluster.bootstrap, f"crmsync.{WORKFLOW}") == []  # it left
    assert [s for s in await cluster.statuses(WORKFLOW) if s.state == "RUNNING"] == []

    cluster.emulators.clear_faults()
    cluster.start_worker(WORKFLOW)

    async def synced() -> bool:
        return await _profiles_count(cluster) == 100 and await cluster.lag(WORKFLOW) == 0

    await wait_for(synced, 60, "100 profiles after the restart")


async def test_an_outage_longer_than_the_max_poll_interval_keeps_the_group(
    cluster: Cluster,
) -> None:
    """A target down for long fills the agent's buffer; the worker must keep polling Kafka."""
    cluster.start_worker(WORKFLOW, CRMSYNC_MAX_POLL_INTERVAL_S="4", CRMSYNC_BATCH_MAX_RECORDS="20")
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    cluster.emulators.faults("campaign", outage_s=14)
    await cluster.publish_contacts(contacts(3000))  # far more than the buffers hold
    await asyncio.sleep(1)
    members = await group_members(cluster.bootstrap, f"crmsync.{WORKFLOW}")
    assert len(members) == 1
    await asyncio.sleep(12)  # three times the max poll interval, the target still down
    assert await group_members(cluster.bootstrap, f"crmsync.{WORKFLOW}") == members

    async def drained() -> bool:
        return await cluster.lag(WORKFLOW) == 0

    await wait_for(drained, 240, "backlog drained after the outage")
    assert await _profiles_count(cluster) == 3000


async def test_a_control_record_that_cannot_be_applied_fails_visibly_and_start_recovers(
    cluster: Cluster,
) -> None:
    cluster.start_worker(WORKFLOW)
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    await cluster.wait_state(WORKFLOW, "STOPPED", await cluster.control(WORKFLOW, "stopped"))
    # a replay from before 1970: Kafka cannot look that up
    await cluster.control(
        WORKFLOW, "stopped", replay={"id": "r-old", "from": "1960-01-01T00:00:00Z"}
    )
    (failed,) = await cluster.wait_state(WORKFLOW, "FAILED")
    assert failed.error is not None and "could not apply control generation" in failed.error
    # the worker still follows the control topic: the next Start is honoured
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    await cluster.publish_contacts(contacts(20))

    async def synced() -> bool:
        return await _profiles_count(cluster) == 20

    await wait_for(synced, 30, "20 profiles")


async def test_tombstones_between_changes_are_acked_and_skipped(cluster: Cluster) -> None:
    from aiokafka import AIOKafkaProducer

    from crmsync.streams.kafka import topics

    cluster.start_worker(WORKFLOW)
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    sent = contacts(30)
    await cluster.publish_contacts(sent[:15])
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap)
    await producer.start()
    try:
        for contact in sent[:5]:  # a source deleting records leaves tombstones behind
            await producer.send_and_wait(
                topics.CONTACT_CHANGES, None, key=contact["contactid"].encode()
            )
    finally:
        await producer.stop()
    await cluster.publish_contacts(sent[15:])

    async def synced() -> bool:
        return await cluster.lag(WORKFLOW) == 0 and await _profiles_count(cluster) == 30

    await wait_for(synced, 60, "30 profiles and lag 0")
    (status,) = await cluster.wait_state(WORKFLOW, "RUNNING")
    assert status.error is None and status.dead_lettered == 0
