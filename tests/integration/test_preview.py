"""The dry run of a pending edit on the real broker: it writes nothing and moves no offset, and
what it says the edit writes is what the worker writes once the edit is started."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from crmsync.streams.catalog import default_config
from crmsync.streams.kafka import topics
from tests.integration.control_helpers import VIEWER, ControlPlane, plane_on_targets
from tests.integration.harness import Cluster, contacts, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
D2C = "d365-to-campaign"
PREVIEW = f"/api/v1/workflows/{D2C}/preview"


async def _crmsync(plane: ControlPlane, *args: str) -> tuple[int, str, str]:
    """The command line, as a user runs it, against this control plane with a viewer token."""
    env = {**os.environ, "CRMSYNC_CONTROL_URL": str(plane.http.base_url)}
    env["CRMSYNC_ADMIN_TOKEN"] = VIEWER
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "crmsync.control.cli", *args),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _committed(cluster: Cluster) -> dict[tuple[str, int], int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(f"crmsync.{D2C}")
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


def _edited() -> dict[str, Any]:
    """firstname cut to 5 characters, and contacts named Last3 no longer synced."""
    config = default_config(D2C).model_dump(mode="json")
    config["mappings"][1]["max_length"] = 5
    config["filters"] = {"all": [{"field": "lastname", "op": "ne", "value": "Last3"}]}
    return config


async def test_the_preview_of_a_pending_edit_is_what_the_worker_writes_after_start(
    cluster: Cluster,
) -> None:
    plane = await plane_on_targets(cluster)
    try:
        cluster.start_worker(D2C)
        await plane.wait_status(D2C, "RUNNING")
        await plane.action(D2C, "stop")
        await plane.wait_status(D2C, "STOPPED")
        people = contacts(20)
        await cluster.publish_contacts(people)
        await plane.wait_backlog(D2C, 20)
        await plane.call("PUT", f"/api/v1/workflows/{D2C}/config", json=_edited())
        stats, committed = cluster.emulators.stats("campaign"), await _committed(cluster)

        preview = await plane.call(
            "POST", PREVIEW, json={}, headers={"Authorization": f"Bearer {VIEWER}"}
        )

        assert preview["pending_source"] == "pending"
        records = preview["records"]
        by_key = {r["key"]: r for r in records}
        assert sorted(by_key) == sorted(p["contactid"] for p in people)
        assert all(r["topic"] == topics.CONTACT_CHANGES for r in records)
        for person in people:
            row = by_key[person["contactid"]]
            (was,) = row["active"]["writes"]
            assert (was["system"], was["target"], was["operation"]) == (
                "campaign", "profileAndServicesExt/profile", "upsert",
            )  # fmt: skip
            assert was["fields"]["firstName"] == person["firstname"]
            if person["lastname"] == "Last3":
                assert (row["pending"]["outcome"], row["filter_change"]) == ("filtered", "dropped")
                assert row["pending"]["writes"] == []
            else:
                (now,) = row["pending"]["writes"]
                assert now["fields"]["firstName"] == person["firstname"][:5]
                assert row["differences"] == ["firstName"]
        assert (preview["changed"], preview["dropped"], preview["kept"]) == (20, 1, 0)

        # nothing written, no offset moved, the backlog still all there
        assert cluster.emulators.stats("campaign") == stats
        assert await _committed(cluster) == committed
        assert (await plane.workflow(D2C))["backlog"] == 20

        await plane.action(D2C, "start")
        await plane.wait_status(D2C, "RUNNING")
        await plane.wait_backlog(D2C, 0)

        async def written() -> dict[str, dict[str, Any]] | None:
            profiles = await cluster.profiles()
            return profiles if len(profiles) == 19 else None

        profiles = await wait_for(written, 60, "19 profiles")
        for row in records:
            if row["pending"]["outcome"] == "filtered":
                assert row["key"] not in profiles
                continue
            (write,) = row["pending"]["writes"]
            profile = profiles[write["key"]]
            expected = {**write["create_fields"], **write["fields"]}
            assert {name: profile.get(name) for name in expected} == expected
    finally:
        await plane.close()


async def test_bad_previews_are_refused_with_the_field_and_opt_in_out_says_it_uses_state(
    cluster: Cluster, tmp_path: Path
) -> None:
    plane = await plane_on_targets(cluster)
    try:
        invalid = await plane.call("POST", PREVIEW, 422, json={"config": {"mappings": 5}})
        assert invalid["errors"][0]["loc"][:2] == ["config", "mappings"]
        too_many = await plane.call("POST", PREVIEW, 422, json={"limit": 501})
        assert [e["loc"] for e in too_many["errors"]] == [["limit"]]
        await plane.call("POST", "/api/v1/workflows/nope/preview", 404, json={})
        # No pending edit: both sides are the active config, nothing differs.
        await cluster.publish_contacts(contacts(3))
        same = await plane.call("POST", PREVIEW, json={"limit": 2})
        assert (same["pending_source"], len(same["records"]), same["changed"]) == ("active", 2, 0)
        optout = await plane.call("POST", "/api/v1/workflows/opt-in-out/preview", json={})
        assert "state" in optout["note"]

        # the command line: a config file tried on the 3 newest records, printed side by side
        config = default_config(D2C).model_dump(mode="json")
        config["mappings"][1]["max_length"] = 3
        (tmp_path / "edit.json").write_text(json.dumps(config))
        code, out, err = await _crmsync(
            plane,
            "workflows",
            "preview",
            D2C,
            "--records",
            "3",
            "--config",
            str(tmp_path / "edit.json"),
        )
        assert code == 0, err
        assert "firstName" in out and "First0" in out and "Fir " in out and "≠" in out
        assert "3 record(s): 3 changed" in out and "nothing was written" in out
        code, out, _ = await _crmsync(
            plane, "workflows", "preview", D2C, "--records", "2", "--json"
        )
        assert code == 0 and len(json.loads(out)["records"]) == 2
        code, _, err = await _crmsync(plane, "workflows", "preview", D2C, "--records", "501")
        assert code == 1 and "limit" in err
        code, _, err = await _crmsync(
            plane, "workflows", "preview", D2C, "--config", str(tmp_path / "missing.json")
        )
        assert code == 1 and "missing.json" in err
    finally:
        await plane.close()
