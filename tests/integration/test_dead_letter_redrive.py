"""Dead letters an operator can act on: the server's reason in the listing, a re-drive that
writes the record once after the fault is gone, a second re-drive that does nothing, and a
record that fails again coming back with its new reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from crmsync.streams.kafka import topics
from tests.integration.control_helpers import OPERATOR, VIEWER, ControlPlane, control_settings
from tests.integration.harness import Cluster, contacts, wait_for
from tests.integration.workflow_helpers import (
    ACTIVITY_SETS,
    contact_change,
    create_contacts_in_dynamics,
    dynamics_rows,
    email_event,
    publish_changes,
    publish_email_events,
    requests,
    start_running,
    total_end_offset,
    wait_drained,
)

pytestmark = pytest.mark.timeout(180)
D2C = "d365-to-campaign"
C2D = "campaign-to-d365"
DLQ = f"/api/v1/workflows/{D2C}/dead-letters"


@pytest.fixture
async def plane(cluster: Cluster) -> AsyncIterator[ControlPlane]:
    control = ControlPlane(control_settings(cluster.bootstrap, cluster.home))
    await control.start()
    yield control
    await control.close()


async def _letters(plane: ControlPlane, **query: str) -> list[dict[str, Any]]:
    answer = await plane.call("GET", DLQ, params=query)
    letters: list[dict[str, Any]] = answer["dead_letters"]
    return letters


async def _dead_lettered(cluster: Cluster, contact: dict[str, Any]) -> None:
    """Publishes the contact while Campaign refuses the next request."""
    cluster.emulators.faults("campaign", fail_next=[{"status": 400}])
    await publish_changes(
        cluster, topics.CONTACT_CHANGES, [contact_change(contact["contactid"], contact)]
    )
    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES])
    cluster.emulators.clear_faults()


async def test_a_refused_record_is_listed_with_the_reason_and_re_driven_once(
    cluster: Cluster, plane: ControlPlane
) -> None:
    await start_running(cluster, D2C)
    warm, refused = contacts(2, tag="r")
    await publish_changes(
        cluster, topics.CONTACT_CHANGES, [contact_change(warm["contactid"], warm)]
    )
    await wait_for(lambda: _has(cluster, warm["contactid"]), 60, "the first profile")
    await _dead_lettered(cluster, refused)

    (letter,) = await _letters(plane)
    assert letter["key"] == refused["contactid"]
    assert letter["error_class"] == "RecordRejected"
    assert "Service error (fail_next)" in letter["reason"], letter["reason"]
    assert letter["value"]["after"]["firstname"] == refused["firstname"]
    assert letter["attempts"] == 1 and letter["redriven"] is None
    assert await _letters(plane, reason="fail_next") == [letter]
    assert await _letters(plane, reason="no such reason") == []
    assert not await _has(cluster, refused["contactid"])

    body = {"reason": "fail_next"}
    path = f"{DLQ}/redrive"
    viewer = {"Authorization": f"Bearer {VIEWER}"}
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    await plane.call("POST", path, 403, json=body, headers=viewer)
    preview = await plane.call("POST", path, json={**body, "dry_run": True}, headers=operator)
    assert (preview["redrive_id"], len(preview["redriven"])) == (None, 1)
    assert (await _letters(plane))[0]["redriven"] is None, "a dry run re-drives nothing"

    answer = await plane.call("POST", path, json=body, headers=operator)
    assert [r["key"] for r in answer["redriven"]] == [refused["contactid"]]
    await wait_for(lambda: _has(cluster, refused["contactid"]), 60, "the re-driven profile")
    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES])
    profiles = await cluster.profiles()
    assert set(profiles) == {warm["contactid"], refused["contactid"]}
    assert profiles[refused["contactid"]]["firstName"] == refused["firstname"]
    (listed,) = await _letters(plane)
    assert listed["redriven"]["redrive_id"] == answer["redrive_id"]
    assert listed["redriven"]["by"] == "ops"

    sent_before = await total_end_offset(cluster, topics.CONTACT_CHANGES)
    calls_before = requests(cluster, "campaign")
    again = await plane.call("POST", path, json=body, headers=operator)
    assert again["redriven"] == [] and again["matched"] == 1
    assert "already re-driven" in again["skipped"][0]["why"]
    await asyncio.sleep(2)
    assert await total_end_offset(cluster, topics.CONTACT_CHANGES) == sent_before
    assert requests(cluster, "campaign") == calls_before, "nothing was written again"

    audit = await plane.call("GET", "/api/v1/audit")
    second, first = [e for e in audit["audit"] if e["action"] == "redrive"]
    assert (first["who"], first["details"]["count"], second["details"]["count"]) == ("ops", 1, 0)
    assert first["details"]["records"][0]["key"] == refused["contactid"]
    assert second["details"]["skipped"] == 1


async def test_a_re_driven_record_that_fails_again_returns_with_the_new_reason(
    cluster: Cluster, plane: ControlPlane
) -> None:
    await start_running(cluster, D2C)
    warm, refused = contacts(2, tag="f")
    await publish_changes(
        cluster, topics.CONTACT_CHANGES, [contact_change(warm["contactid"], warm)]
    )
    await wait_for(lambda: _has(cluster, warm["contactid"]), 60, "the first profile")
    await _dead_lettered(cluster, refused)
    (first,) = await _letters(plane)

    cluster.emulators.faults("campaign", fail_next=[{"status": 409}])
    await plane.call("POST", f"{DLQ}/redrive", json={"key": refused["contactid"]})
    await wait_for(lambda: _count(plane, 2), 60, "the dead letter back in the DLQ")
    cluster.emulators.clear_faults()
    newest, older = await _letters(plane)
    assert older["offset"] == first["offset"] and older["redriven"] is not None
    assert newest["key"] == refused["contactid"] and newest["redriven"] is None
    assert newest["returned_from"] == {"partition": first["partition"], "offset": first["offset"]}
    assert "HTTP 400" in older["reason"] and "HTTP 409" in newest["reason"], newest["reason"]


async def test_an_email_event_dynamics_refused_is_re_driven_once_as_its_activity(
    cluster: Cluster, plane: ControlPlane
) -> None:
    """The other direction: Dynamics refuses an activity whose campaign name is longer than its
    column (200); an admin widens the column, and the re-drive writes that one activity."""
    dlq = f"/api/v1/workflows/{C2D}/dead-letters"
    (person,) = contacts(1, tag="e")
    await create_contacts_in_dynamics(cluster, [person])
    await start_running(cluster, C2D)
    warm = email_event("open", person["contactid"], 1)
    refused = email_event("open", person["contactid"], 2, campaign_name="Spring " * 40)
    await publish_email_events(cluster, [warm, refused])
    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS])

    (letter,) = (await plane.call("GET", dlq))["dead_letters"]
    assert letter["value"]["event_id"] == refused["event_id"]
    assert "crmsync_campaignname" in letter["reason"] and "200" in letter["reason"], letter
    assert await _opened(cluster) == [warm["event_id"]]

    async with httpx.AsyncClient(base_url=cluster.emulators.dynamics_url) as admin:
        widened = await admin.patch(
            f"/_admin/entity-sets/{ACTIVITY_SETS['open']}/columns/crmsync_campaignname",
            json={"max_length": 400},
        )
        assert widened.status_code == 200, widened.text
    body = {"error_class": letter["error_class"]}
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    answer = await plane.call("POST", f"{dlq}/redrive", json=body, headers=operator)
    assert len(answer["redriven"]) == 1
    await wait_for(lambda: _opened_count(cluster, 2), 60, "the re-driven activity")
    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS])
    assert sorted(await _opened(cluster)) == sorted([warm["event_id"], refused["event_id"]])
    (listed,) = (await plane.call("GET", dlq))["dead_letters"]
    assert listed["redriven"]["redrive_id"] == answer["redrive_id"]

    sent_before = await total_end_offset(cluster, topics.EMAIL_EVENTS)
    again = await plane.call("POST", f"{dlq}/redrive", json=body, headers=operator)
    assert again["redriven"] == [] and again["matched"] == 1
    await asyncio.sleep(2)
    assert await total_end_offset(cluster, topics.EMAIL_EVENTS) == sent_before, "nothing re-sent"
    assert sorted(await _opened(cluster)) == sorted([warm["event_id"], refused["event_id"]])


async def _opened(cluster: Cluster) -> list[str]:
    return [row["crmsync_eventid"] for row in await dynamics_rows(cluster, ACTIVITY_SETS["open"])]


async def _opened_count(cluster: Cluster, count: int) -> bool:
    return len(await _opened(cluster)) >= count


async def test_bad_filters_are_refused_naming_the_field(
    cluster: Cluster, plane: ControlPlane
) -> None:
    bad = await plane.call("GET", DLQ, 400, params={"since": "yesterday"})
    assert "since" in bad["error"]
    bad = await plane.call("GET", DLQ, 400, params={"since": "2026-01-01T00:00:00"})
    assert "since" in bad["error"], "a time without a zone is ambiguous"
    invalid = await plane.call("POST", f"{DLQ}/redrive", 422, json={"offsets": [{"partition": -1}]})
    assert {tuple(e["loc"][:3]) for e in invalid["errors"]} >= {("offsets", 0, "partition")}
    invalid = await plane.call("POST", f"{DLQ}/redrive", 422, json={"everything": True})
    assert invalid["errors"][0]["loc"] == ["everything"]
    await plane.call("POST", "/api/v1/workflows/nope/dead-letters/redrive", 404, json={})
    await plane.call("GET", f"/api/v1/workflows/{D2C}/history", 400, params={"minutes": "0"})
    await plane.call("GET", f"/api/v1/workflows/{D2C}/history", 400, params={"minutes": "x"})
    await plane.call("GET", "/api/v1/workflows/nope/history", 404)


async def _count(plane: ControlPlane, n: int) -> bool:
    return len(await _letters(plane)) == n


async def _has(cluster: Cluster, contact_id: str) -> bool:
    return contact_id in await cluster.profiles()
