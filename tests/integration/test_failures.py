"""What a user sees when things go wrong: bad records, refusals, outages, bad secrets, crashes."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams.catalog import default_config
from crmsync.streams.kafka import topics
from tests.integration.harness import Cluster, contacts, wait_for
from tests.integration.workflow_helpers import (
    ACTIVITY_SETS,
    PROFILE,
    campaign_rows,
    contact_change,
    counts,
    create_contacts_in_dynamics,
    dead_letters,
    dynamics_rows,
    email_event,
    guid,
    publish_changes,
    publish_email_events,
    publish_raw,
    start_running,
    status_of,
    wait_drained,
)

pytestmark = pytest.mark.timeout(150)

D2C = "d365-to-campaign"
C2D = "campaign-to-d365"
CONTACTS = topics.CONTACT_CHANGES


def _encoded(contact: dict[str, Any]) -> tuple[bytes, bytes]:
    key = contact["contactid"]
    return key.encode(), CHANGE_EVENT.encode(contact_change(key, contact))


async def _profile_count(cluster: Cluster, n: int) -> bool:
    return counts(cluster, "campaign")["profile"] == n


async def test_malformed_events_go_to_the_dlq_with_their_context_and_the_rest_is_written(
    cluster: Cluster,
) -> None:
    await start_running(cluster, D2C)
    good = contacts(297)
    valid = CHANGE_EVENT.encode(contact_change(guid(), good[0]))
    malformed = {
        guid().encode(): b"\x00" + os.urandom(63),  # not Avro at all
        guid().encode(): valid[:2] + os.urandom(8) + valid[10:],  # a schema nobody knows
        guid().encode(): valid[:10] + b"\xff\xff\xff\xff",  # known schema, broken body
    }
    records = [_encoded(c) for c in good]
    for position, bad in zip((10, 150, 290), malformed.items(), strict=True):
        records.insert(position, bad)
    published = datetime.now(UTC)

    sent = await publish_raw(cluster, CONTACTS, records)

    await wait_for(lambda: _profile_count(cluster, 297), 30, "297 profiles")
    await wait_drained(cluster, D2C, [CONTACTS])
    assert set(await cluster.profiles()) == {c["contactid"] for c in good}
    letters = await dead_letters(cluster, D2C)
    assert sorted(r.key for r, _ in letters) == sorted(malformed)
    where = {s.key: s for s in sent}
    for record, headers in letters:
        origin = where[record.key]
        assert record.value == malformed[record.key], "the original bytes, untouched"
        assert headers["crmsync.workflow"] == D2C
        assert headers["crmsync.source.topic"] == CONTACTS
        assert headers["crmsync.source.partition"] == str(origin.partition)
        assert headers["crmsync.source.offset"] == str(origin.offset)
        assert headers["crmsync.error.class"] == "RecordRejected"
        assert headers["crmsync.error.message"].startswith("undecodable: ")
        assert int(headers["crmsync.attempts"]) >= 0
        when = datetime.fromisoformat(headers["crmsync.time"])
        assert published - timedelta(seconds=5) < when < datetime.now(UTC)
    messages = {headers["crmsync.error.message"] for _, headers in letters}
    assert any("unknown writer schema fingerprint" in m for m in messages), messages
    (status,) = await status_of(cluster, D2C)
    assert (status.state, status.error, status.dead_lettered) == ("RUNNING", None, 3)


async def test_an_email_event_dated_past_9999_is_dead_lettered_and_the_workflow_runs_on(
    cluster: Cluster,
) -> None:
    """ts_ms = 2**62 is a valid Avro long: it used to turn the workflow FAILED, and Start read
    the same record again, so the workflow stayed stuck."""
    people = contacts(3)
    await create_contacts_in_dynamics(cluster, people)
    await start_running(cluster, C2D)
    events = [email_event("open", person["contactid"], n) for n, person in enumerate(people)]
    events[1]["ts_ms"] = 2**62
    await publish_email_events(cluster, events)

    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS])
    opened = {row["crmsync_eventid"] for row in await dynamics_rows(cluster, ACTIVITY_SETS["open"])}
    assert opened == {events[0]["event_id"], events[2]["event_id"]}
    ((_, headers),) = await dead_letters(cluster, C2D)
    assert headers["crmsync.error.class"] == "MappingError"
    assert "ts_ms 4611686018427387904" in headers["crmsync.error.message"]
    (status,) = await status_of(cluster, C2D)
    assert (status.state, status.error, status.dead_lettered) == ("RUNNING", None, 1)


async def test_a_record_the_target_refuses_goes_to_the_dlq_with_the_servers_reason(
    cluster: Cluster,
) -> None:
    config: dict[str, Any] = default_config(D2C).model_dump(mode="json")
    config["mappings"] = [
        {"source": "contactid", "target": "externalId"},
        {"source": "firstname", "target": "firstName"},  # no max_length: Campaign allows 30
        {"source": "emailaddress1", "target": "email"},
    ]
    await start_running(cluster, D2C, config)
    sent = contacts(50)
    too_long = sent[17]
    too_long["firstname"] = "Bartholomew-Maximilian Alexander"  # 32 characters
    await publish_changes(cluster, CONTACTS, [contact_change(c["contactid"], c) for c in sent])

    await wait_drained(cluster, D2C, [CONTACTS])
    profiles = await cluster.profiles()
    assert set(profiles) == {c["contactid"] for c in sent} - {too_long["contactid"]}
    ((record, headers),) = await dead_letters(cluster, D2C)
    assert record.key.decode() == too_long["contactid"]
    assert headers["crmsync.error.class"] == "RecordRejected"
    message = headers["crmsync.error.message"]
    assert "firstName" in message and "maximum allowed length of '30'" in message, message
    assert headers["crmsync.attempts"] == "1"
    (status,) = await status_of(cluster, D2C)
    assert (status.state, status.dead_lettered) == ("RUNNING", 1)


async def test_a_target_outage_grows_the_backlog_then_it_drains_with_nothing_lost(
    cluster: Cluster,
) -> None:
    await start_running(cluster, D2C)
    sent = contacts(100)
    await publish_changes(cluster, CONTACTS, [contact_change(c["contactid"], c) for c in sent])
    await wait_for(lambda: _profile_count(cluster, 100), 30, "100 profiles")
    await wait_drained(cluster, D2C, [CONTACTS])

    cluster.emulators.faults("campaign", outage_s=30)
    outage_ends = time.monotonic() + 30
    first, second = contacts(100, tag="a"), contacts(100, tag="b")
    await publish_changes(cluster, CONTACTS, [contact_change(c["contactid"], c) for c in first])
    await asyncio.sleep(3)
    backlog_before = await cluster.lag(D2C)
    await publish_changes(cluster, CONTACTS, [contact_change(c["contactid"], c) for c in second])
    await asyncio.sleep(2)
    backlog_after = await cluster.lag(D2C)
    assert (backlog_before, backlog_after) == (100, 200), "the backlog grows during the outage"
    assert counts(cluster, "campaign")["profile"] == 100
    assert (await status_of(cluster, D2C))[0].state == "RUNNING"

    await wait_for(lambda: _profile_count(cluster, 300), outage_ends - time.monotonic() + 30, "300")
    await wait_drained(cluster, D2C, [CONTACTS])
    rows = await campaign_rows(cluster, PROFILE)
    assert sorted(r["externalId"] for r in rows) == sorted(
        c["contactid"] for c in [*sent, *first, *second]
    )
    assert await dead_letters(cluster, D2C) == []


async def test_refused_credentials_fail_the_workflow_and_a_fixed_worker_drains_everything(
    cluster: Cluster,
) -> None:
    bad, generation = await start_running(cluster, D2C, CRMSYNC_CAMPAIGN_CLIENT_SECRET="wrong")
    sent = contacts(20)
    await publish_changes(cluster, CONTACTS, [contact_change(c["contactid"], c) for c in sent])

    (failed,) = await cluster.wait_state(D2C, "FAILED", generation, within=30)
    assert failed.error is not None
    assert "campaign" in failed.error and "401" in failed.error, failed.error
    assert "invalid client_secret" in failed.error, failed.error
    await asyncio.sleep(2)  # Faust's commit interval is 1 s: a commit would show by now
    assert await cluster.lag(D2C) == 20, "no offset advanced past unwritten records"
    assert counts(cluster, "campaign")["profile"] == 0
    assert await dead_letters(cluster, D2C) == []

    bad.terminate()
    cluster.start_worker(D2C)
    started = await cluster.control(D2C, "running")
    await cluster.wait_state(D2C, "RUNNING", started)
    await wait_for(lambda: _profile_count(cluster, 20), 30, "20 profiles")
    await wait_drained(cluster, D2C, [CONTACTS])
    assert set(await cluster.profiles()) == {c["contactid"] for c in sent}


async def test_a_worker_killed_mid_stream_leaves_every_record_written_exactly_once(
    cluster: Cluster,
) -> None:
    worker, _ = await start_running(cluster, D2C)
    people = contacts(200)
    rounds = 5
    changes = [
        contact_change(
            p["contactid"],
            {**p, "firstname": f"v{version} {p['firstname']}"[:30], "lastname": f"L{version}"},
        )
        for version in range(rounds)
        for p in people
    ]
    cluster.emulators.faults("campaign", latency_ms=40)  # a drain that lasts a few seconds
    await publish_changes(cluster, CONTACTS, changes)

    async def mid_stream() -> bool:
        return counts(cluster, "campaign")["profile"] >= 20

    await wait_for(mid_stream, 30, "the first profiles", interval=0.05)
    worker.kill()
    written_at_kill = counts(cluster, "campaign")["profile"]
    backlog_at_kill = await cluster.lag(D2C)
    assert 0 < backlog_at_kill, "killed before the stream was written"
    cluster.emulators.clear_faults()

    cluster.start_worker(D2C)
    await wait_drained(cluster, D2C, [CONTACTS], within=60)
    rows = await campaign_rows(cluster, PROFILE)
    assert len(rows) == len(people), f"{len(rows)} profiles (killed at {written_at_kill})"
    by_id = {row["externalId"]: row for row in rows}
    assert set(by_id) == {p["contactid"] for p in people}
    last = rounds - 1
    for person in people:
        profile = by_id[person["contactid"]]
        assert profile["firstName"] == f"v{last} {person['firstname']}"[:30]
        assert profile["lastName"] == f"L{last}"
        assert profile["email"] == person["emailaddress1"]
    assert await dead_letters(cluster, D2C) == []
