"""Requests the targets see per record: none for a change that moves no opt-out flag, and
chunked Dynamics writes (several calls in flight) that keep each key's order."""

from __future__ import annotations

from typing import Any

import pytest

from crmsync.streams.kafka import topics
from tests.integration.harness import Cluster, contacts
from tests.integration.workflow_helpers import (
    ACTIVITY_SETS,
    campaign_rows,
    contact_change,
    create_contacts_in_dynamics,
    create_profiles_in_campaign,
    dead_letters,
    dynamics_rows,
    email_event,
    now_ms,
    profile_change,
    publish_changes,
    publish_email_events,
    requests,
    start_running,
    wait_drained,
)

pytestmark = pytest.mark.timeout(180)

OPT = "opt-in-out"
C2D = "campaign-to-d365"
PROFILE = "profileAndServicesExt/profile"
OPT_TOPICS = [topics.CONTACT_CHANGES, topics.PROFILE_CHANGES]
# Workers run with CRMSYNC_DRIFT_CHECK_S=0: a drift check's metadata reads are requests too.


async def test_opt_in_out_sends_nothing_for_changes_that_move_no_opt_out(
    cluster: Cluster,
) -> None:
    people = contacts(20)
    await create_contacts_in_dynamics(cluster, [{**p, "donotbulkemail": False} for p in people])
    await create_profiles_in_campaign(
        cluster,
        [{"externalId": p["contactid"], "email": p["emailaddress1"]} for p in people],
    )
    await start_running(cluster, OPT, CRMSYNC_DRIFT_CHECK_S="0")
    ts = now_ms()
    opted = people[:5]
    await publish_changes(
        cluster,
        topics.CONTACT_CHANGES,
        [
            contact_change(p["contactid"], {**p, "donotbulkemail": True}, source_ts_ms=ts)
            for p in opted
        ],
    )
    await wait_drained(cluster, OPT, OPT_TOPICS)
    assert {
        r["externalId"] for r in await campaign_rows(cluster, PROFILE) if r["blackListEmail"]
    } == {p["contactid"] for p in opted}

    # Edits of other fields, as the Dynamics source publishes them (whole rows, no before-image),
    # and Campaign profile edits carrying the flag each side already holds.
    d365_before, campaign_before = requests(cluster, "d365"), requests(cluster, "campaign")
    edits: list[dict[str, Any]] = []
    for n in range(10):
        for i, p in enumerate(people):
            after = {**p, "lastname": f"Edited{n}", "donotbulkemail": i < 5}
            edits.append(contact_change(p["contactid"], after, source_ts_ms=ts + 1000 + n))
    await publish_changes(cluster, topics.CONTACT_CHANGES, edits)
    profile_edits = [
        profile_change(
            p["contactid"],
            {"externalId": p["contactid"], "firstName": "Renamed", "blackListEmail": i < 5},
            before={"firstName": "Old", "blackListEmail": i < 5},
            source_ts_ms=ts + 2000,
        )
        for i, p in enumerate(people)
    ]
    await publish_changes(cluster, topics.PROFILE_CHANGES, profile_edits)
    await wait_drained(cluster, OPT, OPT_TOPICS)

    assert requests(cluster, "d365") - d365_before == 0
    assert requests(cluster, "campaign") - campaign_before == 0

    # The counts do move for a real change: one opt-out, written to Campaign (lookup + update).
    mover = people[10]
    await publish_changes(
        cluster,
        topics.CONTACT_CHANGES,
        [
            contact_change(
                mover["contactid"], {**mover, "donotbulkemail": True}, source_ts_ms=ts + 3000
            )
        ],
    )
    await wait_drained(cluster, OPT, OPT_TOPICS)
    assert requests(cluster, "campaign") - campaign_before == 2
    assert requests(cluster, "d365") - d365_before == 0


async def test_chunked_activity_writes_keep_each_keys_order(cluster: Cluster) -> None:
    people = contacts(30)
    await create_contacts_in_dynamics(cluster, people)
    # Published before the worker starts, so it reads them in full batches (split into chunks).
    # Each event id of the first 100 comes in three versions (a producer's corrections), in
    # order on its contact's partition; the activity must hold the last.
    corrected = [email_event("open", people[n % 30]["contactid"], n) for n in range(100)]
    events = []
    for version in range(3):
        events += [{**e, "campaign_name": f"{e['campaign_name']} v{version}"} for e in corrected]
        events += [email_event("send", people[n % 30]["contactid"], n) for n in range(150)]
    await publish_email_events(cluster, events)
    before = requests(cluster, "d365")

    await start_running(cluster, C2D, CRMSYNC_DRIFT_CHECK_S="0")
    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS], within=120)

    opens = {r["crmsync_eventid"]: r for r in await dynamics_rows(cluster, ACTIVITY_SETS["open"])}
    assert len(opens) == 100
    for event in corrected:
        assert opens[event["event_id"]]["crmsync_campaignname"] == f"{event['campaign_name']} v2"
    sends = await dynamics_rows(cluster, ACTIVITY_SETS["send"])
    assert len(sends) == 450 and len({r["crmsync_eventid"] for r in sends}) == 450
    assert await dead_letters(cluster, C2D) == []
    # Written in more calls than batches: the chunks (each a bulk call or a `$batch` round).
    assert requests(cluster, "d365") - before > len(events) // 500 + 4
