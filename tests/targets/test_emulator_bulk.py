"""The Dynamics emulator's bulk messages: each target sees what the targets before it in the same
call wrote, and a refused target leaves nothing of the call behind."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

OPEN = "Microsoft.Dynamics.CRM.crmsync_emailopen"
PURCHASE = "Microsoft.Dynamics.CRM.new_purchase"
REGARDING = "regardingobjectid_contact_crmsync_emailopen@odata.bind"


def _bulk(entity_set: str, action: str) -> str:
    return f"{entity_set}/Microsoft.Dynamics.CRM.{action}"


def _opens(*targets: dict[str, Any]) -> dict[str, Any]:
    return {"Targets": [{"@odata.type": OPEN, **t} for t in targets]}


def _purchases(*targets: dict[str, Any]) -> dict[str, Any]:
    return {"Targets": [{"@odata.type": PURCHASE, **t} for t in targets]}


async def _contact(c: httpx.AsyncClient) -> str:
    contact = str(uuid.uuid4())
    assert (await c.patch(f"contacts({contact})", json={"lastname": "L"})).status_code == 204
    return contact


async def test_a_key_given_twice_in_one_call_names_one_record(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    c = emulated_dynamics
    contact = await _contact(c)
    answer = await c.post(
        _bulk("crmsync_emailopens", "UpsertMultiple"),
        json=_opens(
            {"crmsync_eventid": "ev-1", "subject": "first", REGARDING: f"/contacts({contact})"},
            {"crmsync_eventid": "EV-1", "subject": "second"},  # keys compare case-insensitively
        ),
    )
    assert answer.status_code == 200, answer.text
    first, second = answer.json()["Ids"]
    assert first == second
    (row,) = (await c.get("crmsync_emailopens")).json()["value"]
    assert (row["activityid"], row["subject"]) == (first, "second")
    assert row["_regardingobjectid_value"] == contact  # kept from the first target
    assert row["createdon"] is not None and row["modifiedon"] >= row["createdon"]


async def test_a_key_value_released_earlier_in_the_call_can_be_taken(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    c = emulated_dynamics
    created = await c.post(
        _bulk("new_purchases", "UpsertMultiple"), json=_purchases({"new_name": "n-1"})
    )
    (first,) = created.json()["Ids"]
    moved = await c.post(
        _bulk("new_purchases", "UpsertMultiple"),
        json=_purchases(
            {"new_purchaseid": first, "new_name": "n-2"},  # n-1 is free after this target
            {"new_name": "n-1", "new_product": "tea"},
        ),
    )
    assert moved.status_code == 200, moved.text
    again, other = moved.json()["Ids"]
    assert again == first and other != first
    names = {
        r["new_purchaseid"]: r["new_name"] for r in (await c.get("new_purchases")).json()["value"]
    }
    assert names == {first: "n-2", other: "n-1"}
    # n-2 became taken earlier in this call: the whole call is refused and nothing of it kept.
    taken = await c.post(
        _bulk("new_purchases", "UpsertMultiple"),
        json=_purchases(
            {"new_purchaseid": other, "new_name": "n-3"},
            {"new_purchaseid": first, "new_name": "n-3"},
        ),
    )
    assert taken.status_code == 412
    assert "new_name already exists" in taken.json()["error"]["message"]
    after = {
        r["new_purchaseid"]: r["new_name"] for r in (await c.get("new_purchases")).json()["value"]
    }
    assert after == names
    assert (await c.get("new_purchases(new_name='n-2')")).json()["new_purchaseid"] == first


async def test_create_multiple_refuses_an_id_given_twice_in_the_call(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    c = emulated_dynamics
    activity = str(uuid.uuid4())
    twice = await c.post(
        _bulk("crmsync_emailopens", "CreateMultiple"),
        json=_opens({"activityid": activity, "subject": "a"}, {"activityid": activity}),
    )
    assert twice.status_code == 412
    assert (await c.get("crmsync_emailopens")).json()["value"] == []
    once = await c.post(
        _bulk("crmsync_emailopens", "CreateMultiple"),
        json=_opens({"activityid": activity.upper(), "subject": "a"}),
    )
    assert once.status_code == 200 and once.json()["Ids"] == [activity]
    updated = await c.post(
        _bulk("crmsync_emailopens", "UpdateMultiple"),
        json=_opens({"activityid": activity, "subject": "b"}, {"activityid": str(uuid.uuid4())}),
    )
    assert updated.status_code == 404
    assert (await c.get(f"crmsync_emailopens({activity})")).json()["subject"] == "a"


async def test_a_bound_record_that_is_missing_refuses_the_whole_call(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    c = emulated_dynamics
    contact = await _contact(c)
    missing = str(uuid.uuid4())
    answer = await c.post(
        _bulk("crmsync_emailopens", "UpsertMultiple"),
        json=_opens(
            {"crmsync_eventid": "ev-a", REGARDING: f"/contacts({contact.upper()})"},
            {"crmsync_eventid": "ev-b", REGARDING: f"/contacts({missing})"},
        ),
    )
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == f"contact With Id = {missing} Does Not Exist"
    assert (await c.get("crmsync_emailopens")).json()["value"] == []


async def test_a_deleted_record_upserted_again_by_id_is_a_change_not_a_deletion(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    c = emulated_dynamics
    activity = str(uuid.uuid4())
    body = _opens({"activityid": activity, "crmsync_eventid": "ev-d", "subject": "one"})
    assert (await c.post(_bulk("crmsync_emailopens", "UpsertMultiple"), json=body)).is_success
    initial = await c.get("crmsync_emailopens", headers={"Prefer": "odata.track-changes"})
    delta_link = initial.json()["@odata.deltaLink"]
    assert (await c.delete(f"crmsync_emailopens({activity})")).status_code == 204
    assert (await c.post(_bulk("crmsync_emailopens", "UpsertMultiple"), json=body)).is_success
    delta = (await c.get(delta_link)).json()["value"]
    assert [(d.get("activityid"), d.get("reason")) for d in delta] == [(activity, None)]
    again = await c.get("crmsync_emailopens(crmsync_eventid='ev-d')")
    assert again.json()["activityid"] == activity
