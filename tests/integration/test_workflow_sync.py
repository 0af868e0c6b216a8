"""Each workflow syncs what DESIGN.md says, read back from the targets through their real APIs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from crmsync.streams.catalog import default_config
from crmsync.streams.kafka import topics
from tests.integration.harness import Cluster, contacts, wait_for
from tests.integration.workflow_helpers import (
    ACTIVITY_SETS,
    PROFILE,
    PURCHASE_CHANGES,
    PURCHASES,
    campaign_rows,
    contact_change,
    counts,
    create_contacts_in_dynamics,
    create_profiles_in_campaign,
    dead_letters,
    dynamics_rows,
    email_event,
    guid,
    now_ms,
    profile_change,
    publish_changes,
    publish_email_events,
    purchase_change,
    requests,
    start_running,
    total_end_offset,
    wait_drained,
)

pytestmark = pytest.mark.timeout(120)

D2C = "d365-to-campaign"
C2D = "campaign-to-d365"
OPT = "opt-in-out"


async def _profile_count(cluster: Cluster, n: int) -> bool:
    return counts(cluster, "campaign")["profile"] == n


# -- d365-to-campaign ------------------------------------------------------------------------


async def test_contacts_become_profiles_with_the_mapped_fields(cluster: Cluster) -> None:
    await start_running(cluster, D2C)
    sent = contacts(40)
    for i, contact in enumerate(sent):
        contact["telephone1"] = f"+33 1 23 45 67 {i:02d}"
        contact["mobilephone"] = f"+33 6 00 00 00 {i:02d}"
        contact["jobtitle"] = "not mapped"
    sent[0]["firstname"] = "Maximilian-Alexander Christopher"  # 32: the default mapping cuts at 30
    await publish_changes(
        cluster, topics.CONTACT_CHANGES, [contact_change(c["contactid"], c) for c in sent]
    )

    await wait_for(lambda: _profile_count(cluster, 40), 30, "40 profiles")
    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES])
    profiles = await cluster.profiles()
    for contact in sent:
        profile = profiles[contact["contactid"]]
        assert profile["firstName"] == contact["firstname"][:30]
        assert profile["lastName"] == contact["lastname"]
        assert profile["email"] == contact["emailaddress1"]
        assert profile["phone"] == contact["telephone1"]
        assert profile["mobilePhone"] == contact["mobilephone"]
    assert profiles[sent[0]["contactid"]]["firstName"] == "Maximilian-Alexander Christoph"


async def test_an_edited_config_is_applied_by_the_running_worker(cluster: Cluster) -> None:
    """Edit → Stop → Start: the new rules show in Campaign, the old profiles stay as they were."""
    await start_running(cluster, D2C)
    before = contacts(10)
    for contact in before:
        contact["statecode"] = 0
    await publish_changes(
        cluster, topics.CONTACT_CHANGES, [contact_change(c["contactid"], c) for c in before]
    )
    await wait_for(lambda: _profile_count(cluster, 10), 30, "10 profiles with the first config")

    edited: dict[str, Any] = default_config(D2C).model_dump(mode="json")
    edited["mappings"] = [
        {"source": "contactid", "target": "externalId"},
        {"source": "firstname", "target": "firstName", "apply_updates": False, "max_length": 30},
        {"source": "lastname", "target": "lastName", "replacements": {"N/A": "Unknown"}},
        {"source": "emailaddress1", "target": "email"},
        {"source": "contactid", "target": "cusCrmId"},
    ]
    edited["filters"] = {"all": [{"field": "statecode", "op": "eq", "value": 0}]}
    edited["propagate_deletes"] = False
    stopped = await cluster.control(D2C, "stopped")
    await cluster.wait_state(D2C, "STOPPED", stopped)
    started = await cluster.control(D2C, "running", edited, version=2)
    (status,) = await cluster.wait_state(D2C, "RUNNING", started)
    assert status.config_version == 2

    inactive = contacts(5, tag="x")
    for contact in inactive:
        contact["statecode"] = 1
    changes = [
        # apply_updates=False: the first name of an existing profile is left alone
        contact_change(
            before[0]["contactid"], {"firstname": "Renamed", "lastname": "Newname", "statecode": 0}
        ),
        # a value replacement
        contact_change(before[1]["contactid"], {"lastname": "N/A", "statecode": 0}),
        # filtered out: no longer synced
        contact_change(before[2]["contactid"], {"lastname": "Ignored", "statecode": 1}),
        # deletes are not propagated any more
        contact_change(before[3]["contactid"], None, op="d", before=before[3]),
        *(contact_change(c["contactid"], c) for c in inactive),
    ]
    created = contacts(3, tag="new")
    for contact in created:
        contact["statecode"] = 0
    changes += [contact_change(c["contactid"], c) for c in created]
    await publish_changes(cluster, topics.CONTACT_CHANGES, changes)

    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES])
    profiles = await cluster.profiles()
    assert len(profiles) == 13, "3 new active contacts; 5 inactive ones filtered out"
    first = profiles[before[0]["contactid"]]
    assert (first["firstName"], first["lastName"]) == (before[0]["firstname"], "Newname")
    assert profiles[before[1]["contactid"]]["lastName"] == "Unknown"
    assert profiles[before[2]["contactid"]]["lastName"] == before[2]["lastname"]
    assert before[3]["contactid"] in profiles
    assert not {c["contactid"] for c in inactive} & set(profiles)
    for contact in created:
        profile = profiles[contact["contactid"]]
        assert profile["firstName"] == contact["firstname"], "create-only fields go into a create"
        assert profile["cusCrmId"] == contact["contactid"]


async def test_a_deleted_contact_deletes_its_profile(cluster: Cluster) -> None:
    await start_running(cluster, D2C)
    sent = contacts(12)
    await publish_changes(
        cluster, topics.CONTACT_CHANGES, [contact_change(c["contactid"], c) for c in sent]
    )
    await wait_for(lambda: _profile_count(cluster, 12), 30, "12 profiles")

    gone, kept = sent[:5], sent[5:]
    await publish_changes(
        cluster,
        topics.CONTACT_CHANGES,
        [contact_change(c["contactid"], None, op="d", before=c) for c in gone],
    )
    await wait_for(lambda: _profile_count(cluster, 7), 30, "7 profiles left")
    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES])
    assert set(await cluster.profiles()) == {c["contactid"] for c in kept}


async def test_purchases_are_linked_to_the_profile_of_their_buyer(cluster: Cluster) -> None:
    await start_running(cluster, D2C)
    buyers = contacts(4)
    await publish_changes(
        cluster, topics.CONTACT_CHANGES, [contact_change(c["contactid"], c) for c in buyers]
    )
    await wait_for(lambda: _profile_count(cluster, 4), 30, "4 profiles")
    purchases = {guid(): (buyers[i % 4]["contactid"], f"Product {i}") for i in range(8)}
    await publish_changes(
        cluster,
        PURCHASE_CHANGES,
        [purchase_change(pid, buyer, product) for pid, (buyer, product) in purchases.items()],
    )

    await wait_drained(cluster, D2C, [PURCHASE_CHANGES])
    pkeys = {p["externalId"]: p["PKey"] for p in await campaign_rows(cluster, PROFILE)}
    rows = {row["purchaseId"]: row for row in await campaign_rows(cluster, PURCHASES)}
    assert set(rows) == set(purchases)
    for pid, (buyer, product) in purchases.items():
        row = rows[pid]
        assert row["product"] == product
        assert row["quantity"] == 3
        assert float(row["amount"]) == 19.5
        assert row["profile"]["PKey"] == pkeys[buyer]


async def test_a_purchase_published_before_its_buyer_is_written_once_the_buyer_arrives(
    cluster: Cluster,
) -> None:
    await start_running(cluster, D2C)
    (buyer,) = contacts(1)
    purchase_id = guid()
    await publish_changes(
        cluster, PURCHASE_CHANGES, [purchase_change(purchase_id, buyer["contactid"], "Early")]
    )
    await asyncio.sleep(3)  # the purchase was read, its profile is missing: it waits
    assert counts(cluster, "campaign")["cusPurchase"] == 0
    assert await cluster.lag(D2C, PURCHASE_CHANGES) == 1, "not committed while it waits"

    await publish_changes(
        cluster, topics.CONTACT_CHANGES, [contact_change(buyer["contactid"], buyer)]
    )

    async def linked() -> bool:
        return counts(cluster, "campaign")["cusPurchase"] == 1

    await wait_for(linked, 30, "the purchase written after its buyer's profile")
    await wait_drained(cluster, D2C, [PURCHASE_CHANGES, topics.CONTACT_CHANGES])
    (profile,) = await campaign_rows(cluster, PROFILE)
    (row,) = await campaign_rows(cluster, PURCHASES)
    assert row["purchaseId"] == purchase_id
    assert row["profile"]["PKey"] == profile["PKey"]
    assert await dead_letters(cluster, D2C) == []


async def test_a_purchase_whose_buyer_never_comes_is_dead_lettered(cluster: Cluster) -> None:
    await start_running(cluster, D2C, CRMSYNC_PARENT_WAIT_S="3")
    (buyer,) = contacts(1)
    await publish_changes(
        cluster, topics.CONTACT_CHANGES, [contact_change(buyer["contactid"], buyer)]
    )
    await wait_for(lambda: _profile_count(cluster, 1), 30, "the buyer's profile")
    orphan, bought = guid(), guid()
    await publish_changes(
        cluster,
        PURCHASE_CHANGES,
        [
            purchase_change(orphan, guid(), "Orphan"),
            purchase_change(bought, buyer["contactid"], "Ok"),
        ],
    )

    await wait_drained(cluster, D2C, [PURCHASE_CHANGES], within=30)
    assert [row["purchaseId"] for row in await campaign_rows(cluster, PURCHASES)] == [bought]
    ((record, headers),) = await dead_letters(cluster, D2C)
    assert record.key.decode() == orphan
    assert headers["crmsync.source.topic"] == PURCHASE_CHANGES
    assert headers["crmsync.error.class"] == "RecordRejected"
    assert "parent never arrived" in headers["crmsync.error.message"]
    assert "no profile with externalId" in headers["crmsync.error.message"]
    await cluster.wait_state(D2C, "RUNNING")


# -- campaign-to-d365 ------------------------------------------------------------------------


async def _activities(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    return {kind: await dynamics_rows(cluster, name) for kind, name in ACTIVITY_SETS.items()}


async def test_email_events_become_activities_linked_to_the_contact(cluster: Cluster) -> None:
    people = contacts(3)
    await create_contacts_in_dynamics(cluster, people)
    await start_running(cluster, C2D)
    events = [
        email_event(kind, person["contactid"], n)
        for n, person in enumerate(people)
        for kind in ("send", "open", "click", "bounce")
    ]
    await publish_email_events(cluster, events)

    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS])
    found = await _activities(cluster)
    assert {kind: len(rows) for kind, rows in found.items()} == dict.fromkeys(ACTIVITY_SETS, 3)
    by_event = {row["crmsync_eventid"]: row for rows in found.values() for row in rows}
    for event in events:
        row = by_event[event["event_id"]]
        assert row["_regardingobjectid_value"] == event["contact_id"]
        assert row["subject"] == f"{event['campaign_id']} / {event['delivery_id']}"
        assert row["crmsync_campaignname"] == event["campaign_name"]
        assert row["crmsync_deliveryname"] == event["delivery_name"]
        assert row["crmsync_mirrorpageurl"] == event["mirror_page_url"]
        assert row["crmsync_eventtime"].startswith("2024-05-01T12:00:0")
        if event["type"] == "click":
            assert row["crmsync_url"] == event["url"]
        if event["type"] == "bounce":
            assert row["crmsync_bouncetype"] == "hard"
            assert row["crmsync_bouncereason"] == "mailbox does not exist"
    assert await dead_letters(cluster, C2D) == []


async def test_events_published_twice_make_one_activity_each(cluster: Cluster) -> None:
    people = contacts(5)
    await create_contacts_in_dynamics(cluster, people)
    await start_running(cluster, C2D)
    events = [
        email_event(kind, person["contactid"], n)
        for n, person in enumerate(people)
        for kind in ("send", "open", "click")
    ]
    await publish_email_events(cluster, events)
    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS])
    changed = [{**event, "campaign_name": "Renamed campaign"} for event in events]
    await publish_email_events(cluster, changed)  # the same event ids: a replay

    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS])
    found = await _activities(cluster)
    ids = [row["crmsync_eventid"] for rows in found.values() for row in rows]
    assert sorted(ids) == sorted(e["event_id"] for e in events), "one activity per event id"
    assert {row["crmsync_campaignname"] for rows in found.values() for row in rows} == {
        "Renamed campaign"
    }


async def test_batches_written_side_by_side_leave_each_activity_at_its_last_version(
    cluster: Cluster,
) -> None:
    """campaign-to-d365 sends the next batch while Dynamics answers one, never two writes of
    one activity at once: through latency and failed requests retried, every activity ends at
    the version published last."""
    people = contacts(5)
    await create_contacts_in_dynamics(cluster, people)
    cluster.emulators.faults("d365", latency_ms=100, error_rates={"503": 0.2}, seed=7)
    await start_running(cluster, C2D, CRMSYNC_BATCH_MAX_RECORDS="50")
    events = []
    for group in range(12):  # each event again 30 records later: often in the next batch
        first = [
            email_event("open", people[n % 5]["contactid"], n)
            for n in range(30 * group, 30 * group + 30)
        ]
        events += first + [{**e, "campaign_name": f"{e['campaign_name']} v2"} for e in first]
    await publish_email_events(cluster, events)

    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS], within=90)
    rows = await dynamics_rows(cluster, ACTIVITY_SETS["open"])
    assert len(rows) == 360 and len({row["crmsync_eventid"] for row in rows}) == 360
    stale = [
        row["crmsync_eventid"] for row in rows if not row["crmsync_campaignname"].endswith(" v2")
    ]
    assert stale == []
    assert cluster.emulators.stats("d365")["in_flight_peak"] >= 2  # two batches were in flight


async def test_a_disabled_event_type_writes_nothing(cluster: Cluster) -> None:
    people = contacts(4)
    await create_contacts_in_dynamics(cluster, people)
    await start_running(cluster, C2D, {"events": {"open": {"enabled": False}}})
    events = [
        email_event(kind, person["contactid"], n)
        for n, person in enumerate(people)
        for kind in ("send", "open", "open", "click")
    ]
    await publish_email_events(cluster, events)

    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS])
    written = counts(cluster, "d365")
    assert written["crmsync_emailopens"] == 0
    assert written["crmsync_emailsends"] == 4
    assert written["crmsync_emailclicks"] == 4
    assert await dead_letters(cluster, C2D) == []


# -- opt-in-out ------------------------------------------------------------------------------

OPT_TOPICS = [topics.CONTACT_CHANGES, topics.PROFILE_CHANGES]


async def _flags(cluster: Cluster) -> tuple[dict[str, bool], dict[str, bool]]:
    """(Dynamics donotbulkemail by contactid, Campaign blackListEmail by externalId)."""
    d365 = {
        row["contactid"]: bool(row.get("donotbulkemail"))
        for row in await dynamics_rows(cluster, "contacts")
    }
    campaign = {
        row["externalId"]: bool(row.get("blackListEmail"))
        for row in await campaign_rows(cluster, PROFILE)
    }
    return d365, campaign


async def _both_sides(
    cluster: Cluster, people: list[dict[str, Any]], d365: list[bool], campaign: list[bool]
) -> None:
    """Each person as a Dynamics contact and a Campaign profile, with these opt-out flags."""
    await create_contacts_in_dynamics(
        cluster, [{**p, "donotbulkemail": flag} for p, flag in zip(people, d365, strict=True)]
    )
    await create_profiles_in_campaign(
        cluster,
        [
            {"externalId": p["contactid"], "email": p["emailaddress1"], "blackListEmail": flag}
            for p, flag in zip(people, campaign, strict=True)
        ],
    )


async def test_a_dynamics_opt_out_blacklists_the_campaign_profile(cluster: Cluster) -> None:
    people = contacts(6)
    await _both_sides(cluster, people, [False] * 6, [False] * 6)
    await start_running(cluster, OPT)
    ts = now_ms()
    await publish_changes(
        cluster,
        topics.CONTACT_CHANGES,
        [
            contact_change(
                p["contactid"],
                {"donotbulkemail": True},
                before={"donotbulkemail": False},
                source_ts_ms=ts,
            )
            for p in people[:4]
        ],
    )

    await wait_drained(cluster, OPT, OPT_TOPICS)
    _, campaign = await _flags(cluster)
    assert campaign == {p["contactid"]: i < 4 for i, p in enumerate(people)}

    await publish_changes(  # and back in, later
        cluster,
        topics.CONTACT_CHANGES,
        [
            contact_change(
                people[0]["contactid"],
                {"donotbulkemail": False},
                before={"donotbulkemail": True},
                source_ts_ms=ts + 1000,
            )
        ],
    )
    await wait_drained(cluster, OPT, OPT_TOPICS)
    _, campaign = await _flags(cluster)
    assert campaign == {p["contactid"]: 1 <= i < 4 for i, p in enumerate(people)}


async def test_a_campaign_opt_out_sets_donotbulkemail_on_the_contact(cluster: Cluster) -> None:
    people = contacts(6)
    await _both_sides(cluster, people, [False] * 6, [False] * 6)
    await start_running(cluster, OPT)
    await publish_changes(
        cluster,
        topics.PROFILE_CHANGES,
        [
            profile_change(
                p["contactid"],
                {"externalId": p["contactid"], "blackListEmail": True},
                before={"blackListEmail": False},
            )
            for p in people[:3]
        ],
    )

    await wait_drained(cluster, OPT, OPT_TOPICS)
    d365, campaign = await _flags(cluster)
    assert d365 == {p["contactid"]: i < 3 for i, p in enumerate(people)}
    assert not any(campaign.values()), "nothing written back to Campaign"


async def test_opt_out_conflicts_newer_change_wins_and_a_tie_goes_to_opt_out(
    cluster: Cluster,
) -> None:
    stale, newer, tie_out_first, tie_in_first = people = contacts(4)
    # Each side starts as its own change left it: three opt-outs made in Dynamics, one in Campaign.
    await _both_sides(cluster, people, [True, True, False, True], [False, False, True, False])
    await start_running(cluster, OPT)
    t = now_ms() - 60_000

    def d365(person: dict[str, Any], value: bool, ts: int) -> dict[str, Any]:
        return contact_change(
            person["contactid"],
            {"donotbulkemail": value},
            before={"donotbulkemail": not value},
            source_ts_ms=ts,
        )

    def campaign(person: dict[str, Any], value: bool, ts: int) -> dict[str, Any]:
        return profile_change(
            person["contactid"],
            {"blackListEmail": value},
            before={"blackListEmail": not value},
            source_ts_ms=ts,
        )

    # First round: opt-outs made in Dynamics (and one in Campaign), all synced.
    await publish_changes(
        cluster,
        topics.CONTACT_CHANGES,
        [d365(stale, True, t + 1000), d365(newer, True, t + 1000), d365(tie_in_first, True, t)],
    )
    await publish_changes(cluster, topics.PROFILE_CHANGES, [campaign(tie_out_first, True, t)])
    await wait_drained(cluster, OPT, OPT_TOPICS)
    d365_flags, campaign_flags = await _flags(cluster)
    assert campaign_flags == {
        stale["contactid"]: True,
        newer["contactid"]: True,
        tie_out_first["contactid"]: True,
        tie_in_first["contactid"]: True,
    }
    assert d365_flags[tie_out_first["contactid"]] is True

    # Second round: opposite changes made on the other side.
    await publish_changes(
        cluster,
        topics.PROFILE_CHANGES,
        [
            campaign(stale, False, t + 500),  # older than the synced opt-out: ignored
            campaign(newer, False, t + 2000),  # newer: opt back in, written to Dynamics
            campaign(tie_in_first, False, t),  # same time as the opt-out: opt-out wins
        ],
    )
    await publish_changes(
        cluster,
        topics.CONTACT_CHANGES,
        [d365(tie_out_first, False, t)],  # tie: opt-out wins
    )
    await wait_drained(cluster, OPT, OPT_TOPICS)
    d365_flags, campaign_flags = await _flags(cluster)
    assert d365_flags == {
        stale["contactid"]: True,  # the older opt-in changed nothing
        newer["contactid"]: False,  # the newer opt-in was written
        tie_out_first["contactid"]: True,
        tie_in_first["contactid"]: True,  # a tie: the opt-out stays
    }
    assert campaign_flags == {
        stale["contactid"]: True,
        # The newer opt-in is also written back to Campaign (these events were published without
        # changing the profile): the last sync had written the opt-out there.
        newer["contactid"]: False,
        tie_out_first["contactid"]: True,  # a tie: the opt-out stays
        tie_in_first["contactid"]: True,
    }


async def test_the_echo_of_a_synced_opt_out_is_not_synced_back(cluster: Cluster) -> None:
    from_d365, from_campaign = people = contacts(2)
    await _both_sides(cluster, people, [True, False], [False, True])
    await start_running(cluster, OPT)
    t = now_ms() - 60_000
    await publish_changes(
        cluster,
        topics.CONTACT_CHANGES,
        [
            contact_change(
                from_d365["contactid"],
                {"donotbulkemail": True},
                before={"donotbulkemail": False},
                source_ts_ms=t,
            )
        ],
    )
    await publish_changes(
        cluster,
        topics.PROFILE_CHANGES,
        [
            profile_change(
                from_campaign["contactid"],
                {"blackListEmail": True},
                before={"blackListEmail": False},
                source_ts_ms=t,
            )
        ],
    )

    async def synced() -> bool:
        d365, campaign = await _flags(cluster)
        return campaign[from_d365["contactid"]] and d365[from_campaign["contactid"]]

    await wait_for(synced, 30, "both opt-outs synced")
    await wait_drained(cluster, OPT, OPT_TOPICS)

    # What each side's change feed reports after our writes: a change made later, by the
    # integration's account, with the value we wrote.
    state_end = await total_end_offset(cluster, topics.OPTOUT_STATE)
    writes = (requests(cluster, "d365"), requests(cluster, "campaign"))
    await publish_changes(
        cluster,
        topics.PROFILE_CHANGES,
        [
            profile_change(
                from_d365["contactid"],
                {"blackListEmail": True},
                before={"blackListEmail": False},
                source_ts_ms=t + 1500,
                user="crmsync",
            )
        ],
    )
    await publish_changes(
        cluster,
        topics.CONTACT_CHANGES,
        [
            contact_change(
                from_campaign["contactid"],
                {"donotbulkemail": True},
                before={"donotbulkemail": False},
                source_ts_ms=t + 1500,
                user="crmsync",
            )
        ],
    )
    await wait_drained(cluster, OPT, OPT_TOPICS)
    await asyncio.sleep(2)  # a write sent back would show by now

    assert (requests(cluster, "d365"), requests(cluster, "campaign")) == writes
    assert await total_end_offset(cluster, topics.OPTOUT_STATE) == state_end
    assert await total_end_offset(cluster, topics.CONTACT_CHANGES) == 2
    assert await total_end_offset(cluster, topics.PROFILE_CHANGES) == 2
    assert await dead_letters(cluster, OPT) == []


async def test_a_dynamics_edit_made_before_a_campaign_opt_out_reached_it_keeps_the_opt_out(
    cluster: Cluster,
) -> None:
    """Issue 14, through the real APIs: Dynamics change tracking has no before-image, so a
    first-name edit publishes the row with donotbulkemail as it was, opted in. Made after a
    Campaign opt-out but before crmsync's write of it reached Dynamics (the workflow is
    stopped), it must not opt the person back in on both sides."""
    from tests.integration.test_source import start_source

    people = contacts(8)
    ids = [p["contactid"] for p in people]
    await start_running(cluster, OPT)
    start_source(cluster)
    await _both_sides(cluster, people, [False] * 8, [False] * 8)
    await _contact_events(cluster, ids, lambda after: True)  # their creation, published
    await wait_drained(cluster, OPT, OPT_TOPICS)
    stopped = await cluster.control(OPT, "stopped")
    await cluster.wait_state(OPT, "STOPPED", stopped)

    campaign = cluster.campaign_client()
    dynamics = cluster.dynamics_client()
    try:
        opted_out_at = now_ms()
        for cid in ids:
            await campaign.upsert(PROFILE, cid, {"blackListEmail": True}, mode="update")
        await publish_changes(
            cluster,
            topics.PROFILE_CHANGES,
            [
                profile_change(
                    cid,
                    {"externalId": cid, "blackListEmail": True},
                    before={"blackListEmail": False},
                    source_ts_ms=opted_out_at,
                )
                for cid in ids
            ],
        )
        await asyncio.sleep(1.1)  # Dynamics keeps whole seconds: the edit is newer
        for cid in ids:
            await dynamics.upsert("contacts", cid, {"firstname": "Renamed"}, mode="update")
    finally:
        await campaign.aclose()
        await dynamics.aclose()
    edits = await _contact_events(cluster, ids, lambda after: after.get("firstname") == "Renamed")
    assert all(after["donotbulkemail"] is False for after in edits.values())

    started = await cluster.control(OPT, "running")
    await cluster.wait_state(OPT, "RUNNING", started)

    async def settled() -> bool:
        # Both sides opted out, and the echo of our Dynamics write came back and was read.
        await wait_drained(cluster, OPT, OPT_TOPICS)
        d365, campaign = await _flags(cluster)
        echoed = await _contact_events(cluster, ids, lambda a: a.get("donotbulkemail"), 0)
        return all(d365[c] and campaign[c] for c in ids) and len(echoed) == len(ids)

    try:
        await wait_for(settled, 30, "both sides opted out, the echoes read")
    finally:
        d365, campaign_flags = await _flags(cluster)
        print("Dynamics", [d365[c] for c in ids], "Campaign", [campaign_flags[c] for c in ids])
    marks = await _write_marks(cluster, ids)
    await asyncio.sleep(4)  # several polls of the source: a ping-pong would have written
    await wait_drained(cluster, OPT, OPT_TOPICS)
    assert await _write_marks(cluster, ids) == marks
    d365, campaign_flags = await _flags(cluster)
    assert all(d365[c] for c in ids) and all(campaign_flags[c] for c in ids)
    assert await dead_letters(cluster, OPT) == []


async def _contact_events(
    cluster: Cluster, ids: list[str], match: Any, within: float = 30
) -> dict[str, dict[str, Any]]:
    """The latest `after` of each contact's events on the contact topic that `match`; waits
    (up to `within` seconds) until every contact has one."""
    from crmsync.schemas.codec import CHANGE_EVENT
    from tests.integration.kafka_io import read_all

    async def found() -> dict[str, dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for record in await read_all(cluster.bootstrap, topics.CONTACT_CHANGES):
            if record.value is None:
                continue
            event = CHANGE_EVENT.decode(record.value)
            if event["key"] in ids and event["after"] and match(event["after"]):
                latest[event["key"]] = event["after"]
        return latest

    if within <= 0:
        return await found()

    async def every() -> dict[str, dict[str, Any]] | None:
        latest = await found()
        return latest if len(latest) == len(ids) else None

    result: dict[str, dict[str, Any]] = await wait_for(every, within, "the contacts' events")
    return result


async def _write_marks(cluster: Cluster, ids: list[str]) -> tuple[Any, ...]:
    """What changes when crmsync writes: Dynamics rows' modifiedon, Campaign profiles'
    lastModified, and the number of records on the contact topic (each write is published)."""
    rows = {r["contactid"]: r for r in await dynamics_rows(cluster, "contacts")}
    profiles = {r["externalId"]: r for r in await campaign_rows(cluster, PROFILE)}
    return (
        [rows[c]["modifiedon"] for c in ids],
        [profiles[c].get("lastModified") for c in ids],
        await total_end_offset(cluster, topics.CONTACT_CHANGES),
    )
