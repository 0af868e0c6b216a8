"""The Dynamics source against the emulator and a real broker: loads, changes, crashes, expiry."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import quote, unquote

from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams.control_protocol import WorkerStatus
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import EventProducer, change_event
from crmsync.streams.source import STATUS_KEY, SourceStatus, StoredLink
from tests.integration.harness import Cluster, Worker, contacts, wait_for
from tests.integration.kafka_io import read_all
from tests.integration.workflow_helpers import (
    ACTIVITY_SETS,
    PROFILE,
    PURCHASE_CHANGES,
    create_contacts_in_dynamics,
    dynamics_rows,
    start_running,
    wait_drained,
)

FAST = {
    "CRMSYNC_SOURCE_TOMBSTONES": "true",
    "CRMSYNC_SOURCE_POLL_INTERVAL_S": "0.3",
    "CRMSYNC_HEARTBEAT_S": "0.5",
    "CRMSYNC_SOURCE_FATAL_RETRY_S": "2",
}


def start_source(cluster: Cluster, **env: str) -> Worker:
    """`crmsync source d365` as a child process (killed with the cluster's workers)."""
    log = cluster.home / f"source-{len(cluster.workers)}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "crmsync.control.cli", "source", "d365"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cluster.worker_env(**{**FAST, **env}),
            start_new_session=True,
        )
    source = Worker("source-d365", process, log)
    cluster.workers.append(source)
    return source


async def changes(cluster: Cluster, topic: str = topics.CONTACT_CHANGES) -> list[Any]:
    """(key, event or None for a tombstone) of every record of the topic, per partition order."""
    records = await read_all(cluster.bootstrap, topic)
    records.sort(key=lambda r: (r.partition, r.offset))
    return [
        (r.key.decode(), None if r.value is None else CHANGE_EVENT.decode(r.value)) for r in records
    ]


async def wait_events(cluster: Cluster, what: str, check: Any, within: float = 30) -> list[Any]:
    async def ready() -> list[Any] | None:
        found = await changes(cluster)
        return found if check(found) else None

    result: list[Any] = await wait_for(ready, within, what, interval=0.3)
    return result


def ops_by_key(found: list[Any]) -> dict[str, list[str]]:
    ops: dict[str, list[str]] = {}
    for key, event in found:
        ops.setdefault(key, []).append("tombstone" if event is None else event["op"])
    return ops


async def source_status(cluster: Cluster) -> SourceStatus | None:
    latest = None
    for record in await read_all(cluster.bootstrap, topics.STATUS):
        if record.key == STATUS_KEY.encode():
            latest = record.value
    return None if latest is None else SourceStatus.model_validate_json(latest)


async def stored_links(cluster: Cluster) -> dict[str, StoredLink]:
    links: dict[str, StoredLink] = {}
    for record in await read_all(cluster.bootstrap, topics.SOURCE_OFFSETS):
        links[record.key.decode()] = StoredLink.model_validate_json(record.value)
    return links


async def test_initial_load_then_creates_updates_and_deletes_in_order(cluster: Cluster) -> None:
    people = contacts(7)
    await create_contacts_in_dynamics(cluster, people)
    created = time.time()
    start_source(cluster, CRMSYNC_SOURCE_PAGE_SIZE="3")  # 7 rows: three pages
    ids = {p["contactid"] for p in people}
    loaded = await wait_events(
        cluster, "the initial load", lambda found: {k for k, _ in found} >= ids
    )
    assert sorted(ops_by_key(loaded).items()) == sorted((i, ["r"]) for i in ids)
    first = next(event for _, event in loaded if event["key"] == people[0]["contactid"])
    assert first["after"]["firstname"] == people[0]["firstname"]
    assert first["source"]["system"] == "d365" and first["source"]["user"]

    newcomer, changed, gone = contacts(1)[0], people[1], people[2]
    # Dynamics keeps modifiedon in whole seconds: an update within the second of the row's
    # creation reads as a create (README, "the Dynamics source").
    await asyncio.sleep(max(0.0, math.floor(created) + 1.05 - time.time()))
    client = cluster.dynamics_client()
    try:
        fields = {k: v for k, v in newcomer.items() if k != "contactid"}
        await client.upsert("contacts", newcomer["contactid"], fields, mode="create")
        await client.upsert("contacts", changed["contactid"], {"jobtitle": "CFO"}, mode="update")
        await client.upsert("contacts", changed["contactid"], {"jobtitle": "CEO"}, mode="update")
        await client.delete("contacts", gone["contactid"])
        buyer = people[3]["contactid"]
        purchase = str(uuid.uuid4())
        await client.upsert(
            "new_purchases",
            purchase,
            {
                "new_name": "P-1",
                "new_product": "Kettle",
                "new_ContactId@odata.bind": f"/contacts({buyer})",
            },
            mode="create",
        )
    finally:
        await client.aclose()

    def settled(found: list[Any]) -> bool:
        ops = ops_by_key(found)
        return (
            newcomer["contactid"] in ops
            and ops.get(gone["contactid"], [])[-1:] == ["tombstone"]
            and any(
                e and e["after"]["jobtitle"] == "CEO"
                for _, e in found
                if e and e["key"] == changed["contactid"]
            )
        )

    found = await wait_events(cluster, "create, update, delete", settled, within=20)
    ops = ops_by_key(found)
    assert ops[newcomer["contactid"]] == ["c"]
    assert ops[gone["contactid"]] == ["r", "d", "tombstone"]
    assert ops[changed["contactid"]][0] == "r" and set(ops[changed["contactid"]][1:]) == {"u"}
    # Exactly once by content: no (key, version) published twice.
    versions = Counter((e["key"], e["source"]["txid"]) for _, e in found if e and e["op"] != "d")
    assert max(versions.values()) == 1

    purchases = await wait_for(
        lambda: changes(cluster, PURCHASE_CHANGES), 20, "the purchase", interval=0.3
    )
    ((key, event),) = [(k, e) for k, e in purchases if e and e["op"] in ("c", "r")]
    assert key == purchase and event["after"]["_new_contactid_value"] == buyer

    status = await source_status(cluster)
    assert status is not None and status.state == "RUNNING"
    assert status.changes_published >= 11
    assert {e.entity: e.entity_set for e in status.entities} == {
        "contact": "contacts",
        "new_purchase": "new_purchases",
    }
    assert all(e.phase == "incremental" and e.lag_s is not None for e in status.entities)
    assert WorkerStatus.model_validate(status.model_dump()).workflow == "source-d365"
    assert (await stored_links(cluster))["contact"].phase == "delta"


async def test_a_killed_source_skips_nothing_and_repeats_at_most_a_page(cluster: Cluster) -> None:
    people = contacts(24)
    await create_contacts_in_dynamics(cluster, people)
    cluster.emulators.faults("d365", latency_ms=150)
    source = start_source(cluster, CRMSYNC_SOURCE_PAGE_SIZE="2")
    await wait_events(cluster, "a part of the load", lambda found: len(found) >= 6)
    source.kill()  # SIGKILL, mid-load
    cluster.emulators.clear_faults()
    client = cluster.dynamics_client()
    try:
        for person in people[:5]:
            await client.upsert(
                "contacts", person["contactid"], {"jobtitle": "Moved"}, mode="update"
            )
    finally:
        await client.aclose()
    source = start_source(cluster, CRMSYNC_SOURCE_PAGE_SIZE="2")

    def complete(found: list[Any]) -> bool:
        moved = {e["key"] for _, e in found if e and e["after"].get("jobtitle") == "Moved"}
        return {k for k, _ in found} >= {p["contactid"] for p in people} and len(moved) == 5

    found = await wait_events(cluster, "every contact and change", complete)
    await wait_for(lambda: _has_delta(cluster), 20, "a stored delta link", interval=0.3)
    loads = sum(1 for _, e in await changes(cluster) if e and e["op"] == "r")
    # Kill again while polling deltas: the next run resumes from the stored delta link.
    source.kill()
    client = cluster.dynamics_client()
    try:
        await client.upsert("contacts", people[6]["contactid"], {"jobtitle": "Late"}, mode="update")
    finally:
        await client.aclose()
    start_source(cluster, CRMSYNC_SOURCE_PAGE_SIZE="2")
    found = await wait_events(
        cluster,
        "the change made while the source was down",
        lambda f: any(e and e["after"].get("jobtitle") == "Late" for _, e in f),
    )
    repeats = Counter((e["key"], e["source"]["txid"]) for _, e in found if e)
    repeated = sum(n - 1 for n in repeats.values())
    assert repeated <= 4, repeats.most_common(5)  # at most the page in flight at each kill
    assert sum(1 for _, e in found if e and e["op"] == "r") == loads  # no new full load


async def test_an_expired_delta_token_means_a_full_load(cluster: Cluster) -> None:
    people = contacts(3)
    await create_contacts_in_dynamics(cluster, people)
    source = start_source(cluster)
    await wait_events(cluster, "the initial load", lambda found: len(found) >= 3)
    await wait_for(lambda: _has_delta(cluster), 20, "a stored delta link", interval=0.3)
    assert source.terminate(30) == 0
    link = (await stored_links(cluster))["contact"]
    head, _, token = link.link.partition("$deltatoken=")
    seq = unquote(token).split("!", 1)[0]
    expired = link.model_copy(
        update={"link": head + "$deltatoken=" + quote(f"{seq}!01/01/2020 00:00:00", safe="")}
    )
    async with EventProducer(cluster.bootstrap) as producer:
        await producer.send_encoded(
            topics.SOURCE_OFFSETS, "contact", expired.model_dump_json().encode()
        )
    source = start_source(cluster)
    found = await wait_events(
        cluster, "a second full load", lambda f: sum(1 for _, e in f if e and e["op"] == "r") >= 6
    )
    assert Counter(e["key"] for _, e in found if e) == Counter({p["contactid"]: 2 for p in people})
    await wait_for(lambda: _log_has(source, "event=delta_token_expired"), 10, "the log line")


async def _has_delta(cluster: Cluster) -> bool:
    link = (await stored_links(cluster)).get("contact")
    return link is not None and link.phase == "delta"


async def _log_has(worker: Worker, text: str) -> bool:
    return text in worker.output()


async def test_refused_credentials_fail_the_source_without_crashing(cluster: Cluster) -> None:
    source = start_source(cluster, CRMSYNC_DYNAMICS_CLIENT_SECRET="wrong")

    async def failed() -> SourceStatus | None:
        status = await source_status(cluster)
        return status if status is not None and status.state == "FAILED" else None

    status = await wait_for(failed, 30, "the source FAILED")
    assert "contact" in (status.error or "")
    await asyncio.sleep(3)  # past a slow retry: still alive, still FAILED
    assert source.process.poll() is None
    assert (await source_status(cluster)).state == "FAILED"  # type: ignore[union-attr]


async def test_contacts_reach_campaign_and_opt_outs_round_trip_without_echo(
    cluster: Cluster,
) -> None:
    await start_running(cluster, "d365-to-campaign")
    await start_running(cluster, "opt-in-out")
    start_source(cluster)  # tombstones on (the default): the workers skip them
    ada, bob, cy = people = contacts(3)
    await create_contacts_in_dynamics(cluster, people)

    async def profiles_ready() -> dict[str, dict[str, Any]] | None:
        found = await cluster.profiles()
        return found if all(p["contactid"] in found for p in people) else None

    profiles = await wait_for(profiles_ready, 30, "profiles of the new contacts")
    assert profiles[ada["contactid"]]["firstName"] == ada["firstname"]
    assert profiles[ada["contactid"]]["email"] == ada["emailaddress1"]
    opt_topics = [topics.CONTACT_CHANGES, topics.PROFILE_CHANGES]
    await wait_drained(cluster, "opt-in-out", opt_topics)

    # Campaign side: the profile is blacklisted, its change published (no Campaign source).
    campaign = cluster.campaign_client()
    dynamics = cluster.dynamics_client()
    try:
        await campaign.upsert(PROFILE, ada["contactid"], {"blackListEmail": True}, mode="update")
        async with EventProducer(cluster.bootstrap) as producer:
            await producer.send_change(
                topics.PROFILE_CHANGES,
                change_event(
                    "u",
                    "profile",
                    ada["contactid"],
                    after={"externalId": ada["contactid"], "blackListEmail": True},
                    system="campaign",
                ),
            )
        # Dynamics side: through the Web API; the source picks it up.
        await dynamics.upsert("contacts", bob["contactid"], {"donotbulkemail": True}, mode="update")
        await dynamics.delete("contacts", cy["contactid"])
    finally:
        await campaign.aclose()
        await dynamics.aclose()

    async def synced() -> bool:
        rows = {r["contactid"]: r for r in await dynamics_rows(cluster, "contacts")}
        found = await cluster.profiles()
        return (
            rows[ada["contactid"]]["donotbulkemail"] is True
            and found[bob["contactid"]].get("blackListEmail") is True
            and cy["contactid"] not in found
        )

    await wait_for(synced, 30, "opt-outs synced both ways and the delete propagated")

    # The echo of our own Dynamics write comes back through change tracking: it must stop there.
    async def echoed() -> bool:
        found = await changes(cluster)
        return any(
            e and e["key"] == ada["contactid"] and e["after"].get("donotbulkemail") is True
            for _, e in found
        )

    await wait_for(echoed, 20, "the echo of the Dynamics write in the contact topic")
    await wait_drained(cluster, "opt-in-out", opt_topics)
    before = await _write_counts(cluster)
    await asyncio.sleep(4)  # several polls: a ping-pong would write again by now
    await wait_drained(cluster, "opt-in-out", opt_topics)
    assert await _write_counts(cluster) == before
    rows = {r["contactid"]: r for r in await dynamics_rows(cluster, "contacts")}
    assert rows[ada["contactid"]]["donotbulkemail"] is True
    assert (await cluster.profiles())[ada["contactid"]].get("blackListEmail") is True
    for workflow in ("d365-to-campaign", "opt-in-out"):
        assert [s.state for s in await cluster.statuses(workflow)] == ["RUNNING"]


async def _write_counts(cluster: Cluster) -> tuple[int, int, int]:
    """Opt-out writes (worker counter, stored states) and events on the contact topic."""
    (status,) = await cluster.statuses("opt-in-out")
    state = len(await read_all(cluster.bootstrap, topics.OPTOUT_STATE))
    contact_events = len(await read_all(cluster.bootstrap, topics.CONTACT_CHANGES))
    return status.records_written, state, contact_events


async def test_the_demo_moves_every_workflow(cluster: Cluster) -> None:
    for workflow in ("d365-to-campaign", "campaign-to-d365", "opt-in-out"):
        await start_running(cluster, workflow)
    start_source(cluster)
    demo = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "crmsync.control.cli", "demo", "--contacts", "10"],
        env=cluster.worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "demo done" in demo.stdout and "what to look at" in demo.stdout
    rows = await dynamics_rows(cluster, "contacts")
    assert len(rows) == 9  # 10 created, 1 deleted
    assert len({r["emailaddress1"] for r in rows}) == 9
    events = await read_all(cluster.bootstrap, topics.EMAIL_EVENTS)
    assert len(events) == 2 * 5  # a send and one more event for 3/5 of the 9 left
    (profile_change,) = await read_all(cluster.bootstrap, topics.PROFILE_CHANGES)
    blacklisted = CHANGE_EVENT.decode(profile_change.value)
    assert blacklisted["after"]["blackListEmail"] is True
    # One opt-out made in Dynamics, and (through opt-in-out, maybe already) the Campaign one.
    (opted_out,) = {r["contactid"] for r in rows if r["donotbulkemail"]} - {blacklisted["key"]}

    missing: dict[str, Any] = {}

    async def everything_synced() -> bool:
        profiles = await cluster.profiles()
        contacts = {r["contactid"]: r for r in await dynamics_rows(cluster, "contacts")}
        activities = sum([len(await dynamics_rows(cluster, s)) for s in ACTIVITY_SETS.values()])

        def profile_flag(key: str) -> Any:
            return profiles.get(key, {}).get("blackListEmail")

        missing.clear()
        missing.update(
            {
                "profiles without a contact": len(set(profiles) - set(contacts)),
                "contacts without a profile": len(set(contacts) - set(profiles)),
                "Dynamics opt-out on the profile": profile_flag(opted_out),
                "Campaign opt-out kept": profile_flag(blacklisted["key"]),
                "Campaign opt-out in Dynamics": contacts[blacklisted["key"]]["donotbulkemail"],
                "activities": f"{activities} of {len(events)}",
            }
        )
        return (
            set(profiles) == set(contacts)
            and profiles[opted_out].get("blackListEmail") is True
            and profiles[blacklisted["key"]].get("blackListEmail") is True
            and contacts[blacklisted["key"]]["donotbulkemail"] is True
            and activities == len(events)
        )

    try:
        await wait_for(everything_synced, 60, "profiles, activities and opt-outs of the demo")
    except AssertionError as error:
        raise AssertionError(f"{error}: {missing}") from None
