"""The record trace on the real broker: a contact's life through the source, both workflows that
read it and the control plane's index, asked as ops would ask it (the HTTP API)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from functools import partial
from typing import Any

import pytest

from crmsync.streams.catalog import default_config
from crmsync.streams.kafka import topics
from tests.integration.control_helpers import ControlPlane, control_settings
from tests.integration.harness import Cluster, contacts, wait_for
from tests.integration.test_source import start_source
from tests.integration.workflow_helpers import (
    PROFILE,
    contact_change,
    profile_change,
    publish_changes,
    start_running,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
D2C, OPT = "d365-to-campaign", "opt-in-out"


async def _plane(cluster: Cluster) -> ControlPlane:
    plane = ControlPlane(control_settings(cluster.bootstrap, cluster.home))
    await plane.start()
    return plane


async def _trace(plane: ControlPlane, key: str) -> dict[str, Any]:
    answer: dict[str, Any] = await plane.call("GET", f"/api/v1/trace/{key}")
    return answer


def _by_workflow(event: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {outcome["workflow"]: outcome for outcome in event["outcomes"]}


async def test_a_contacts_life_shows_every_event_and_what_each_workflow_did(
    cluster: Cluster,
) -> None:
    plane = await _plane(cluster)
    try:
        await start_running(cluster, D2C)
        await start_running(cluster, OPT)
        start_source(cluster)
        person = contacts(1)[0]
        cid = str(person["contactid"])
        dynamics = cluster.dynamics_client()
        campaign = cluster.campaign_client()

        async def contact_events(at_least: int, op: str | None = None) -> list[Any] | None:
            events = [
                e
                for e in (await _trace(plane, cid))["events"]
                if e["topic"] == topics.CONTACT_CHANGES and {D2C, OPT} <= set(_by_workflow(e))
            ]
            if len(events) < at_least or (op is not None and all(e["op"] != op for e in events)):
                return None
            return events

        try:
            fields = {k: v for k, v in person.items() if k != "contactid"}
            await dynamics.upsert("contacts", cid, fields, mode="create")
            created_at = time.time()
            await wait_for(lambda: contact_events(1), 60, "the created contact traced")
            # Dynamics keeps modifiedon in whole seconds: an edit within the creation's second
            # reads as a create (README, "the Dynamics source")
            await asyncio.sleep(max(0.0, math.floor(created_at) + 1.05 - time.time()))
            for title in ("CFO", "CEO"):
                after = len(await contact_events(0) or []) + 1
                await dynamics.upsert("contacts", cid, {"jobtitle": title}, mode="update")
                await wait_for(partial(contact_events, after), 60, f"the {title} edit traced")
            # The person opts out in Campaign; Campaign's change reaches its topic.
            await campaign.upsert(PROFILE, cid, {"blackListEmail": True}, mode="update")
            await publish_changes(
                cluster,
                topics.PROFILE_CHANGES,
                [
                    profile_change(
                        cid,
                        {"externalId": cid, "blackListEmail": True},
                        before={"blackListEmail": False},
                    )
                ],
            )

            async def opted_out() -> bool:
                row = await dynamics.get("contacts", cid)
                return bool(row and row.get("donotbulkemail"))

            await wait_for(opted_out, 60, "the opt-out written to Dynamics")
            await dynamics.delete("contacts", cid)
            await wait_for(lambda: contact_events(1, op="d"), 60, "the delete traced")
        finally:
            await dynamics.aclose()
            await campaign.aclose()

        trace = await _trace(plane, cid)
    finally:
        await plane.close()

    events = trace["events"]
    times = [e["time"] or e["outcomes"][0]["at"] for e in events]
    assert times == sorted(times, reverse=True), "newest first"
    oldest_first = list(reversed(events))
    contact = [e for e in oldest_first if e["topic"] == topics.CONTACT_CHANGES]
    ops = [e["op"] for e in contact]
    # "r" when the source's initial load found it first, "c" when a poll did
    assert ops[0] in {"c", "r"} and ops.count("u") >= 2 and "d" in ops, ops
    assert ops.index("d") < len(ops) - 1 and ops[-1] is None, "the tombstone after the delete"

    created = _by_workflow(contact[0])
    assert created[D2C]["result"] == "written"
    (profile_write,) = created[D2C]["writes"]
    assert (profile_write["system"], profile_write["target"], profile_write["key"]) == (
        "campaign",
        PROFILE,
        cid,
    )
    assert "firstName" in profile_write["fields"]
    assert created[OPT]["result"] in {"written", "skipped"}
    if created[OPT]["result"] == "skipped":
        assert created[OPT]["reason"]

    edits = [e for e in contact if e["op"] == "u" and "jobtitle" in e["fields"]]
    assert len(edits) >= 2
    assert all(_by_workflow(e)[D2C]["result"] == "written" for e in edits)

    (opt_out,) = [e for e in oldest_first if e["topic"] == topics.PROFILE_CHANGES]
    assert opt_out["fields_changed"] and opt_out["fields"] == ["blackListEmail"]
    decided = _by_workflow(opt_out)[OPT]
    assert decided["result"] == "written", decided
    assert [(w["system"], w["target"]) for w in decided["writes"]] == [("d365", "contacts")]
    assert decided["writes"][0]["fields"] == ["donotbulkemail"]

    (deleted,) = [e for e in contact if e["op"] == "d"]
    assert set(_by_workflow(deleted)) == {D2C, OPT}
    tombstones = [e for e in contact if e["op"] is None]
    assert tombstones and all(
        "tombstone" in (o["reason"] or "") and o["result"] == "skipped"
        for e in tombstones
        for o in e["outcomes"]
    )


async def test_a_refused_record_shows_as_dead_lettered_with_the_servers_reason(
    cluster: Cluster,
) -> None:
    config: dict[str, Any] = default_config(D2C).model_dump(mode="json")
    config["mappings"] = [
        {"source": "contactid", "target": "externalId"},
        {"source": "firstname", "target": "firstName"},  # no max_length: Campaign allows 30
    ]
    plane = await _plane(cluster)
    try:
        await start_running(cluster, D2C, config)
        cid = str(uuid.uuid4())
        too_long = {"contactid": cid, "firstname": "Bartholomew-Maximilian Alexander"}
        await publish_changes(cluster, topics.CONTACT_CHANGES, [contact_change(cid, too_long)])

        async def traced() -> dict[str, Any] | None:
            events = (await _trace(plane, cid))["events"]
            return events[0] if events else None

        event = await wait_for(traced, 60, "the refused record traced")
        unknown = await _trace(plane, str(uuid.uuid4()))
        refused = await plane.call("GET", "/api/v1/trace/%20", expect=400)
        # The index is the control plane's own: a lost one is rebuilt from the topics.
        await plane.stop()
        (plane.settings.local_dir / "trace.sqlite").unlink()
        await plane.start()
        rebuilt = await wait_for(traced, 60, "the refused record traced after a rebuild")
    finally:
        await plane.close()
    assert rebuilt == event
    (outcome,) = event["outcomes"]
    assert (outcome["workflow"], outcome["result"]) == (D2C, "dead-lettered")
    assert (
        "firstName" in outcome["reason"] and "maximum allowed length of '30'" in outcome["reason"]
    )
    assert event["fields"] == ["contactid", "firstname"] and not event["fields_changed"]
    assert unknown["events"] == []
    assert "key" in refused["error"]
