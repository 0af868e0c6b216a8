"""Supervised side work, against the real broker: a crash shows as FAILED and Start recovers."""

from __future__ import annotations

from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from tests.integration.harness import Cluster, contacts, wait_for

WORKFLOW = "d365-to-campaign"


async def test_a_crashed_control_follower_fails_the_workflow_and_start_recovers(
    cluster: Cluster,
) -> None:
    cluster.start_worker(WORKFLOW)
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    # A key that is not UTF-8 on the control topic: the follower cannot read it and crashes.
    producer = KafkaClients(cluster.bootstrap).producer()
    await producer.start()
    try:
        await producer.send_and_wait(topics.CONTROL, b"{}", key=b"\xff\xfe")
    finally:
        await producer.stop()

    (failed,) = await cluster.wait_state(WORKFLOW, "FAILED", within=30)
    assert failed.error is not None and "control follower crashed" in failed.error
    # Following again: the next Stop and Start are honoured, and records flow.
    await cluster.wait_state(WORKFLOW, "STOPPED", await cluster.control(WORKFLOW, "stopped"))
    await cluster.wait_state(WORKFLOW, "RUNNING", await cluster.control(WORKFLOW, "running"))
    await cluster.publish_contacts(contacts(20))

    async def synced() -> bool:
        counts = cluster.emulators.stats("campaign")["counts"]
        return int(counts["profile"]) == 20 and await cluster.lag(WORKFLOW) == 0

    await wait_for(synced, 60, "20 profiles and lag 0")
