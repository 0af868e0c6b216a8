"""GET /api/v1/targets: the control plane's preflight of the active configs against the targets."""

from __future__ import annotations

import pytest

from tests.integration.control_helpers import VIEWER, ControlPlane, control_settings
from tests.integration.harness import Cluster

pytestmark = pytest.mark.integration


async def test_targets_lists_every_requirement_of_the_active_configs(cluster: Cluster) -> None:
    settings = control_settings(cluster.bootstrap, cluster.home).model_copy(
        update={
            "dynamics_url": cluster.emulators.dynamics_url,
            "campaign_url": cluster.emulators.campaign_url,
        }
    )
    plane = ControlPlane(settings)
    await plane.start()
    try:
        anonymous = await plane.http.get("/api/v1/targets", headers={"Authorization": ""})
        assert anonymous.status_code == 401
        answer = await plane.http.get(
            "/api/v1/targets", headers={"Authorization": f"Bearer {VIEWER}"}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
    finally:
        await plane.close()
    assert body["missing"] == 0
    workflows = {r["workflow"] for r in body["requirements"]}
    assert workflows == {"d365-to-campaign", "campaign-to-d365", "opt-in-out"}
    assert {"crmsync_emailsends(crmsync_eventid)", "profileAndServicesExt/cusPurchase"} <= {
        r["name"] for r in body["requirements"]
    }
