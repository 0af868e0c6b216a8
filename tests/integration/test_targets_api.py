"""GET /api/v1/targets: the control plane's preflight of the active configs against the targets."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.control_helpers import VIEWER, plane_on_targets
from tests.integration.harness import Cluster

pytestmark = pytest.mark.integration


async def test_targets_lists_every_requirement_of_the_active_configs(cluster: Cluster) -> None:
    plane = await plane_on_targets(cluster)
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


async def test_start_is_refused_while_a_target_lacks_a_piece(cluster: Cluster) -> None:
    plane = await plane_on_targets(cluster)
    dynamics = cluster.emulators.dynamics_url
    key = f"{dynamics}/_admin/entity-sets/crmsync_emailsends/keys/crmsync_eventid"
    try:
        await plane.call("POST", "/api/v1/workflows/campaign-to-d365/stop", 202)
        async with httpx.AsyncClient() as admin:
            assert (await admin.delete(key)).status_code == 200
        try:
            refused = await plane.http.post("/api/v1/workflows/campaign-to-d365/start")
        finally:
            await _restore_key(cluster)
        assert refused.status_code == 409, refused.text
        missing = refused.json()["detail"]["missing"]
        assert [(m["kind"], m["name"]) for m in missing] == [
            ("key", "crmsync_emailsends(crmsync_eventid)")
        ]
        await plane.call("POST", "/api/v1/workflows/campaign-to-d365/start", 202)
    finally:
        await plane.close()


async def _restore_key(cluster: Cluster) -> None:
    """The emulator process serves the whole session: put the key back the documented way."""
    from crmsync.streams.settings import Settings
    from crmsync.targets.dynamics import DynamicsClient
    from crmsync.targets.settings import DynamicsTarget

    defaults = Settings()
    target = DynamicsTarget(
        url=cluster.emulators.dynamics_url,
        client_id=defaults.dynamics_client_id,
        client_secret=defaults.dynamics_client_secret,
    )
    async with DynamicsClient(target) as client:
        response = await client.raw(
            "POST",
            f"{client.api_url}/EntityDefinitions(LogicalName='crmsync_emailsend')/Keys",
            what="restore key",
            body={"SchemaName": "crmsync_emailsend_eventid", "KeyAttributes": ["crmsync_eventid"]},
        )
        assert response.status_code == 204, response.text
