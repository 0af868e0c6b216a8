"""Scenario 8: a config edit applied while a backlog exists (the vendor warns edits made while
running may lose data). Edit while running → Stop → more changes → Start: the backlog is synced
with the new config, nothing lost."""

from __future__ import annotations

import pytest

from crmsync.streams.catalog import default_config
from crmsync.streams.kafka import topics
from tests.chaos.conftest import pick, record
from tests.chaos.ledger import Outcome, Stopwatch
from tests.chaos.traffic import D2C, ContactTraffic, dlq_count, publish
from tests.chaos.workers import wait_drained, wait_requests_beyond, wait_worker
from tests.integration.control_helpers import ControlPlane, control_settings
from tests.integration.harness import Cluster
from tests.integration.workflow_helpers import requests

pytestmark = pytest.mark.timeout(pick(180, 900, 400))


async def test_config_edit_applied_with_a_backlog(cluster: Cluster) -> None:
    clock = Stopwatch()
    plane = ControlPlane(control_settings(cluster.bootstrap, cluster.home))
    await plane.start()
    try:
        await _scenario(cluster, plane, clock)
    finally:
        await plane.close()


async def _scenario(cluster: Cluster, plane: ControlPlane, clock: Stopwatch) -> None:
    traffic = ContactTraffic()
    people = pick(500, 10_000)
    first = traffic.versions(people, 1)
    ids = [str(key) for key, _ in first]
    worker = cluster.start_worker(D2C)
    await wait_worker(cluster, worker, "RUNNING")
    await plane.wait_status(D2C, "RUNNING")
    cluster.emulators.faults("campaign", latency_ms=20)  # a backlog builds up
    await publish(cluster, topics.CONTACT_CHANGES, first)
    await wait_requests_beyond(cluster, "campaign", requests(cluster, "campaign") + 30)

    edited = default_config(D2C).model_dump(mode="json")
    edited["mappings"].append({"source": "contactid", "target": "cusCrmId"})
    await plane.call("PUT", f"/api/v1/workflows/{D2C}/config", json=edited)
    assert (await plane.workflow(D2C))["pending_changes"] is True
    await plane.action(D2C, "stop")
    stopped = await plane.wait_status(D2C, "STOPPED")
    backlog_at_stop = stopped["backlog"]
    assert backlog_at_stop > 0, "the edit must meet a backlog"
    # Changes go on while stopped: a second version of every contact, and new contacts.
    second = [traffic.change(key, 1) for key in ids] + traffic.versions(people // 5, 1, "n")
    await publish(cluster, topics.CONTACT_CHANGES, second)
    cluster.emulators.clear_faults()
    await plane.action(D2C, "start")
    await plane.wait_status(D2C, "RUNNING")
    assert (await plane.workflow(D2C))["pending_changes"] is False

    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES], within=120 + traffic.sent / 20)
    # Every key's last change was read after the Start: all carry the new mapping.
    for key, row in traffic.expected.rows.items():
        row["cusCrmId"] = key
    found = await traffic.compare(cluster)
    record(
        Outcome(
            "8. config edit (stop, new config, start) with a backlog",
            sent=traffic.sent,
            written=found.written,
            lost=found.lost,
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=await dlq_count(cluster, [D2C]),
            seconds=clock.seconds,
            samples=[f"backlog at the stop: {backlog_at_stop}", *found.samples],
        )
    )
