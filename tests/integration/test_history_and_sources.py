"""What the page shows besides the figures: each workflow's backlog history (built up while
stopped, drained after Start, kept across a control plane restart) and the Dynamics source."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.integration.control_helpers import VIEWER, ControlPlane, control_settings
from tests.integration.harness import Cluster, contacts, wait_for
from tests.integration.test_source import start_source
from tests.integration.workflow_helpers import start_running

pytestmark = pytest.mark.timeout(180)
D2C = "d365-to-campaign"


@pytest.fixture
async def plane(cluster: Cluster) -> AsyncIterator[ControlPlane]:
    control = ControlPlane(control_settings(cluster.bootstrap, cluster.home))
    await control.start()
    yield control
    await control.close()


async def _history(plane: ControlPlane, **query: str) -> dict[str, Any]:
    answer: dict[str, Any] = await plane.call(
        "GET", f"/api/v1/workflows/{D2C}/history", params=query
    )
    return answer


async def test_a_backlog_built_while_stopped_and_drained_after_start_shows_in_the_history(
    cluster: Cluster, plane: ControlPlane
) -> None:
    await start_running(cluster, D2C)
    await plane.wait_status(D2C, "RUNNING")
    await plane.action(D2C, "stop")
    await plane.wait_status(D2C, "STOPPED")
    sent = await cluster.publish_contacts(contacts(300, tag="h"))
    await plane.wait_backlog(D2C, sent)
    await asyncio.sleep(2)  # a few samples of the full backlog

    await plane.action(D2C, "start")
    await plane.wait_backlog(D2C, 0, within=90)
    await asyncio.sleep(1.5)
    history = await _history(plane)
    backlogs = [s["backlog"] for s in history["samples"]]
    peak = backlogs.index(sent)
    assert backlogs.count(sent) >= 3, backlogs
    assert 0 in backlogs[peak:], "drained after the start"
    assert max(s["written_per_s"] for s in history["samples"]) > 0
    assert history["eta"]["text"] == "caught up"

    await plane.restart()  # a new control plane process reads the history back
    again = await _history(plane, minutes="5")
    assert [s["backlog"] for s in again["samples"]][: len(backlogs)] == backlogs
    viewer = {"Authorization": f"Bearer {VIEWER}"}
    await plane.call("GET", f"/api/v1/workflows/{D2C}/history", headers=viewer)
    await plane.call("GET", f"/api/v1/workflows/{D2C}/history", 401, headers={"Authorization": ""})


async def _source(plane: ControlPlane, status: str) -> dict[str, Any] | None:
    sources = (await plane.call("GET", "/api/v1/sources"))["sources"]
    return sources[0] if sources and sources[0]["status"] == status else None


async def test_the_source_shows_its_state_a_missing_heartbeat_and_its_failure(
    cluster: Cluster, plane: ControlPlane
) -> None:
    assert (await plane.call("GET", "/api/v1/sources"))["sources"] == []
    source = start_source(cluster)
    running: dict[str, Any] = await wait_for(lambda: _source(plane, "RUNNING"), 60, "RUNNING")
    assert running["name"] == "d365" and running["last_poll_at"] is not None
    assert "contact" in {e["entity"] for e in running["entities"]}
    assert running["error"] is None and running["lag_s"] < 30

    source.kill()  # no goodbye: its last record still says RUNNING
    stale: dict[str, Any] = await wait_for(lambda: _source(plane, "STALE"), 30, "STALE")
    assert stale["reported_state"] == "RUNNING" and "no heartbeat" in stale["error"]

    start_source(cluster, CRMSYNC_DYNAMICS_CLIENT_SECRET="wrong")
    failed: dict[str, Any] = await wait_for(lambda: _source(plane, "FAILED"), 60, "FAILED")
    assert failed["error"].startswith("contact: ") and "Invalid client secret" in failed["error"]
    async with httpx.AsyncClient(base_url=str(plane.http.base_url)) as anonymous:
        assert (await anonymous.get("/api/v1/sources")).status_code == 401
        viewer = {"Authorization": f"Bearer {VIEWER}"}
        assert (await anonymous.get("/api/v1/sources", headers=viewer)).status_code == 200
