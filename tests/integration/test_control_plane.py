"""The control plane against the real broker, real workers and the emulators: CONTRACT's flows."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams.catalog import default_config
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import change_event
from tests.conftest import free_port
from tests.integration.control_helpers import (
    ADMIN,
    OPERATOR,
    VIEWER,
    ControlPlane,
    control_settings,
    kafka_tool_lag,
)
from tests.integration.harness import (
    PARTITIONS,
    Cluster,
    Worker,
    contacts,
    end_offsets,
    wait_for,
)

D2C = "d365-to-campaign"


@pytest.fixture
async def plane(cluster: Cluster) -> AsyncIterator[ControlPlane]:
    control = ControlPlane(control_settings(cluster.bootstrap, cluster.home))
    await control.start()
    yield control
    await control.close()


def _profiles(cluster: Cluster) -> int:
    return int(cluster.emulators.stats("campaign")["counts"].get("profile", 0))


async def _topic_size(bootstrap: str, topic: str) -> int:
    return sum((await end_offsets(bootstrap, topic)).values())


async def _warm_up(cluster: Cluster, plane: ControlPlane) -> int:
    """Contacts on every partition, synced: the group then has a commit everywhere, so Kafka's
    tool prints a number (not "-") in every LAG cell of the contact topic."""
    sent = 0
    while True:
        sent += await cluster.publish_contacts(contacts(12, tag="w"))
        ends = await end_offsets(cluster.bootstrap, topics.CONTACT_CHANGES)
        if len(ends) == PARTITIONS and all(ends.values()):
            break
    await plane.wait_backlog(D2C, 0)
    await wait_for(lambda: _async(_profiles(cluster) == sent), 60, f"{sent} profiles")
    return sent


async def _async(value: Any) -> Any:
    return value


def _tool_total(lags: dict[tuple[str, int], str]) -> int:
    return sum(int(lag) for lag in lags.values() if lag != "-")


async def test_api_rules_tokens_and_replay_without_workers(
    cluster: Cluster, plane: ControlPlane
) -> None:
    listed = await plane.workflows()
    assert set(listed) == {"d365-to-campaign", "campaign-to-d365", "opt-in-out"}
    for flow in listed.values():
        assert (flow["status"], flow["error"], flow["backlog"]) == (
            "STARTING",
            "waiting for a worker",
            0,
        )
    assert listed[D2C]["title"] == "Microsoft Dynamics 365 to Campaign"
    # tokens and roles
    http = plane.http
    no_token = await http.get("/api/v1/workflows", headers={"Authorization": ""})
    assert no_token.status_code == 401
    assert no_token.headers["www-authenticate"].startswith("Bearer")
    viewer = {"Authorization": f"Bearer {VIEWER}"}
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    assert (await http.get("/api/v1/workflows", headers=viewer)).status_code == 200
    assert (await http.post(f"/api/v1/workflows/{D2C}/stop", headers=viewer)).status_code == 403
    assert (await http.get("/api/v1/workflows/nope", headers=viewer)).status_code == 404
    # state rules
    await plane.action(D2C, "start", 409)
    await plane.action(D2C, "replay", 409, json={"from": "earliest"})
    stopped = await plane.call("POST", f"/api/v1/workflows/{D2C}/stop", 202, headers=operator)
    assert stopped["status"] == "STOPPED"  # no live worker: nothing can write
    await plane.action(D2C, "stop", 409)
    # malformed and invalid bodies
    put = f"/api/v1/workflows/{D2C}/config"
    assert (await http.put(put, content=b'{"mappings": [')).status_code == 400
    assert (await http.put(put, json={}, headers=operator)).status_code == 403
    bad = default_config(D2C).model_dump(mode="json")
    bad["mappings"][1]["target"] = "externalId"
    invalid = await plane.call("PUT", put, 422, json=bad)
    assert {"loc": ["mappings", 1, "target"], "msg": invalid["errors"][0]["msg"]} in (
        invalid["errors"]
    )
    assert (await plane.call("PUT", put, 422, json={"mappings": "x"}))["errors"][0]["loc"] == [
        "mappings"
    ]
    replay = f"/api/v1/workflows/{D2C}/replay"
    assert (await http.post(replay, content=b"{")).status_code == 400
    assert (await http.post(replay, json={"from": "yesterday"})).status_code == 422
    assert (await http.post(replay, json={"since": "earliest"})).status_code == 422
    assert (await http.post(replay, json=["earliest"])).status_code == 422
    # replay with no worker alive: the control plane commits for the (empty) group itself
    sent = await cluster.publish_contacts(contacts(50))
    replayed = await plane.action(D2C, "replay", 200, json={"from": "earliest"})
    assert (replayed["backlog"], replayed["committed_by"]) == (sent, "control plane")
    assert sum(p["lag"] for p in replayed["partitions"]) == sent
    future = await plane.action(D2C, "replay", 200, json={"from": "2999-01-01T00:00:00Z"})
    assert future["backlog"] == 0
    await plane.action(D2C, "replay", 200, json={"from": "2000-01-01T00:00:00"})
    assert (await plane.workflow(D2C))["backlog"] == sent
    # the audit log names who did what
    audit = (await plane.call("GET", "/api/v1/audit?limit=4"))["audit"]
    assert [(a["action"], a["who"]) for a in audit] == [
        ("replay", "admin"),
        ("replay", "admin"),
        ("replay", "admin"),
        ("stop", "ops"),
    ]
    assert audit[0]["details"]["from"] == "2000-01-01T00:00:00+00:00"
    # dead letters, newest first, headers decoded
    await _dead_letters(cluster.bootstrap, 3)
    letters = (await plane.call("GET", f"/api/v1/workflows/{D2C}/dead-letters?limit=2"))[
        "dead_letters"
    ]
    assert [d["headers"]["crmsync.source.offset"] for d in letters] == ["2", "1"]
    assert letters[0]["headers"]["crmsync.error.class"] == "RecordRejected"
    assert letters[0]["value"]["after"]["firstname"] == "Dead2"
    # metrics and the OpenAPI description
    metrics = (await http.get("/metrics")).text
    assert f'crmsync_workflow_backlog{{workflow="{D2C}"}} {float(sent)}' in metrics
    assert f'crmsync_workflow_status{{status="STOPPED",workflow="{D2C}"}} 1.0' in metrics
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert "/api/v1/workflows/{name}/replay" in paths
    # a restarted control plane keeps what was desired
    await plane.restart()
    after = await plane.workflows()
    assert after[D2C]["status"] == "STOPPED"
    assert after["opt-in-out"]["status"] == "STARTING"


async def _dead_letters(bootstrap: str, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(n):
            event = change_event(
                "u", "contact", "c-1", after={"firstname": f"Dead{i}"}, system="d365"
            )
            headers = {
                "crmsync.workflow": D2C,
                "crmsync.source.topic": topics.CONTACT_CHANGES,
                "crmsync.source.partition": "0",
                "crmsync.source.offset": str(i),
                "crmsync.error.class": "RecordRejected",
                "crmsync.error.message": "400 from Campaign",
                "crmsync.attempts": "1",
            }
            await producer.send_and_wait(
                topics.dead_letters(D2C),
                CHANGE_EVENT.encode(event, validate=False),
                key=b"c-1",
                partition=0,
                headers=[(k, v.encode()) for k, v in headers.items()],
            )
            await asyncio.sleep(0.01)  # distinct timestamps: "newest" is well defined
    finally:
        await producer.stop()


async def test_stop_publish_start_edit_restart_and_replay(
    cluster: Cluster, plane: ControlPlane, kafka_cache: Path
) -> None:
    for workflow in ("d365-to-campaign", "campaign-to-d365", "opt-in-out"):
        cluster.start_worker(workflow)
    for workflow in ("d365-to-campaign", "campaign-to-d365", "opt-in-out"):
        await plane.wait_status(workflow, "RUNNING", within=90)
    flows = await plane.workflows()
    assert all(flow["backlog"] == 0 for flow in flows.values()), flows
    warm = await _warm_up(cluster, plane)
    figures: dict[str, Any] = {"list_ms": await _list_latency(plane)}

    # stop; 700 contacts wait in Kafka, none reaches Campaign
    began = time.monotonic()
    await plane.action(D2C, "stop")
    await plane.wait_status(D2C, "STOPPED")
    figures["stop_s"] = time.monotonic() - began
    requests_at_stop = cluster.emulators.stats("campaign")["requests"]
    batch = contacts(700, tag="b")
    await cluster.publish_contacts(batch)
    detail = await plane.wait_backlog(D2C, 700)
    assert detail["status"] == "STOPPED"
    assert sum(p["lag"] for p in detail["partitions"]) == 700
    lags = kafka_tool_lag(kafka_cache, cluster.bootstrap, D2C)
    assert _tool_total(lags) == 700
    ours = {(p["topic"], p["partition"]): p["lag"] for p in detail["partitions"]}
    for where, lag in lags.items():
        assert ours[where] == (0 if lag == "-" else int(lag)), where
    await asyncio.sleep(2)
    assert cluster.emulators.stats("campaign")["requests"] == requests_at_stop
    assert _profiles(cluster) == warm

    # start: STARTING, then RUNNING; the backlog drains and all 700 arrive
    began = time.monotonic()
    started = await plane.action(D2C, "start")
    assert started["status"] == "STARTING"
    await plane.wait_status(D2C, "RUNNING")
    figures["start_s"] = time.monotonic() - began
    await plane.wait_backlog(D2C, 0)
    await wait_for(lambda: _async(_profiles(cluster) == warm + 700), 60, "700 more profiles")

    # edit: pending, the running worker keeps the old mapping
    edited = default_config(D2C).model_dump(mode="json")
    edited["mappings"][1]["max_length"] = 5  # firstname → firstName, cut to 5 characters
    pending = await plane.call("PUT", f"/api/v1/workflows/{D2C}/config", json=edited)
    assert pending["pending_version"] == 2
    assert pending["pending_diff"] == [
        {"path": "mappings[1].max_length", "active": 30, "pending": 5}
    ]
    assert (await plane.workflows())[D2C]["pending_changes"] is True
    old_rule = contacts(5, tag="old")
    await cluster.publish_contacts(old_rule)
    await plane.wait_backlog(D2C, 0)
    profiles = await cluster.profiles()
    assert [profiles[c["contactid"]]["firstName"] for c in old_rule] == [
        c["firstname"] for c in old_rule
    ]

    # stop + start: the new mapping is active, nothing pending
    await plane.action(D2C, "stop")
    await plane.wait_status(D2C, "STOPPED")
    await plane.action(D2C, "start")
    await plane.wait_status(D2C, "RUNNING")
    detail = await plane.workflow(D2C)
    assert (detail["pending_changes"], detail["active_version"]) == (False, 2)
    assert detail["active_config"]["mappings"][1]["max_length"] == 5
    new_rule = contacts(5, tag="new")
    await cluster.publish_contacts(new_rule)
    await plane.wait_backlog(D2C, 0)
    profiles = await cluster.profiles()
    await wait_for(
        lambda: _async(all(c["contactid"] in profiles for c in new_rule)), 30, "new profiles"
    )
    assert [profiles[c["contactid"]]["firstName"] for c in new_rule] == ["First"] * 5

    # a stopped workflow stays stopped across restarts of the control plane and the workers
    await plane.action(D2C, "stop")
    await plane.wait_status(D2C, "STOPPED")
    d2c_worker = cluster.workers[0]
    assert d2c_worker.terminate() == 0
    await plane.restart()
    cluster.start_worker(D2C)

    async def confirmed() -> bool:
        detail = await plane.workflow(D2C)
        live = [w for w in detail["workers"] if w["live"]]
        return detail["status"] == "STOPPED" and len(live) == 1 and live[0]["state"] == "STOPPED"

    await wait_for(confirmed, 60, "the new worker confirms STOPPED")
    total = await _profiles_total(cluster)
    await cluster.publish_contacts(contacts(10, tag="late"))
    await plane.wait_backlog(D2C, 10)
    await asyncio.sleep(2)
    assert _profiles(cluster) == total

    # replay from earliest: the backlog is the whole topic; Start re-syncs, no duplicates
    size = await _topic_size(cluster.bootstrap, topics.CONTACT_CHANGES)
    replayed = await plane.action(D2C, "replay", 200, json={"from": "earliest"})
    assert (replayed["backlog"], replayed["committed_by"]) == (size, "workers")
    assert _tool_total(kafka_tool_lag(kafka_cache, cluster.bootstrap, D2C)) == size
    requests_before = cluster.emulators.stats("campaign")["requests"]
    await plane.action(D2C, "start")
    await plane.wait_status(D2C, "RUNNING")
    await plane.wait_backlog(D2C, 0, within=90)
    assert cluster.emulators.stats("campaign")["requests"] > requests_before
    profiles = await cluster.profiles()
    assert len(profiles) == _profiles(cluster) == size  # every contact once
    assert {p["firstName"] for p in profiles.values()} == {"First"}  # re-synced, new mapping
    audit = (await plane.call("GET", "/api/v1/audit?limit=20"))["audit"]
    assert [a["action"] for a in audit][:3] == ["start", "replay", "stop"]
    print(
        f"\nfigures: GET /api/v1/workflows p50 {figures['list_ms'][0]:.2f} ms, "
        f"p99 {figures['list_ms'][1]:.2f} ms; stop→STOPPED {figures['stop_s']:.2f} s, "
        f"start→RUNNING {figures['start_s']:.2f} s"
    )


async def _profiles_total(cluster: Cluster) -> int:
    return _profiles(cluster)


async def _list_latency(plane: ControlPlane, n: int = 300) -> tuple[float, float]:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        response = await plane.http.get("/api/v1/workflows")
        times.append((time.perf_counter() - began) * 1000)
        assert response.status_code == 200
    times.sort()
    return statistics.median(times), times[int(n * 0.99) - 1]


async def _two_running_workers(cluster: Cluster, plane: ControlPlane) -> tuple[Worker, Worker]:
    workers = cluster.start_worker(D2C), cluster.start_worker(D2C)
    await wait_for(
        lambda: _states_are(plane, ["RUNNING", "RUNNING"]), 90, "two live workers RUNNING"
    )
    await plane.wait_status(D2C, "RUNNING")
    return workers


async def test_two_workers_honour_stop_and_start_and_leave_the_replay_to_the_control_plane(
    cluster: Cluster, plane: ControlPlane, kafka_cache: Path
) -> None:
    first, second = await _two_running_workers(cluster, plane)
    await plane.action(D2C, "stop")
    await plane.wait_status(D2C, "STOPPED")
    assert await _live_states(plane) == ["STOPPED", "STOPPED"]
    await cluster.publish_contacts(contacts(200))
    await plane.wait_backlog(D2C, 200)
    await asyncio.sleep(1.5)
    assert _profiles(cluster) == 0
    await plane.action(D2C, "start")
    await plane.wait_status(D2C, "RUNNING")
    await plane.wait_backlog(D2C, 0)
    await wait_for(lambda: _async(_profiles(cluster) == 200), 60, "200 profiles")

    # every worker leaves a stopped workflow: it is STOPPED with none, and its replay is
    # committed by the control plane for the now empty group
    await plane.action(D2C, "stop")
    await plane.wait_status(D2C, "STOPPED")
    assert first.terminate() == second.terminate() == 0
    await wait_for(lambda: _no_live_worker(plane), 30, "no live worker")
    assert (await plane.workflows())[D2C]["status"] == "STOPPED"
    replayed = await plane.action(D2C, "replay", 200, json={"from": "earliest"})
    assert (replayed["backlog"], replayed["committed_by"]) == (200, "control plane")
    assert _tool_total(kafka_tool_lag(kafka_cache, cluster.bootstrap, D2C)) == 200


async def test_a_killed_workers_partitions_go_to_the_other_and_the_status_stays_truthful(
    cluster: Cluster, plane: ControlPlane
) -> None:
    first, _ = await _two_running_workers(cluster, plane)
    first.kill()
    await cluster.publish_contacts(contacts(200))
    seen: set[str] = set()
    last: dict[str, Any] = {}

    async def survivor_has_everything() -> bool:
        detail = await plane.workflow(D2C)
        last.update(detail)
        seen.add(detail["status"])
        live = [w for w in detail["workers"] if w["live"]]
        contact_partitions = [p for p in live[0]["partitions"] if topics.CONTACT_CHANGES in p]
        return (
            len(live) == 1
            and len(contact_partitions) == PARTITIONS
            and detail["backlog"] == 0
            and detail["status"] == "RUNNING"
        )

    try:
        await wait_for(survivor_has_everything, 60, "the survivor takes every partition, drains")
    except AssertionError:
        print({k: last.get(k) for k in ("status", "trend", "backlog", "workers", "partitions")})
        raise
    assert seen <= {"RUNNING", "STARTING"}, seen  # never STOPPED nor FAILED
    await wait_for(lambda: _async(_profiles(cluster) == 200), 60, "200 profiles")


async def _live_states(plane: ControlPlane) -> list[str]:
    return sorted(w["state"] for w in (await plane.workflow(D2C))["workers"] if w["live"])


async def _states_are(plane: ControlPlane, expected: list[str]) -> bool:
    return await _live_states(plane) == expected


async def _no_live_worker(plane: ControlPlane) -> bool:
    return not [w for w in (await plane.workflow(D2C))["workers"] if w["live"]]


async def test_a_failed_workflow_shows_why_and_start_resumes_it(
    cluster: Cluster, plane: ControlPlane
) -> None:
    cluster.start_worker(D2C)
    await plane.wait_status(D2C, "RUNNING", within=90)
    cluster.emulators.faults("campaign", fail_next=[{"status": 403}])
    await cluster.publish_contacts(contacts(5))
    failed = await plane.wait_status(D2C, "FAILED")
    assert "403" in failed["error"]
    assert (await plane.workflow(D2C))["backlog"] == 5  # nothing skipped
    cluster.emulators.clear_faults()
    assert (await plane.action(D2C, "start"))["status"] in ("STARTING", "RUNNING")
    await plane.wait_status(D2C, "RUNNING")
    await plane.wait_backlog(D2C, 0)
    await wait_for(lambda: _async(_profiles(cluster) == 5), 30, "5 profiles")


async def _crmsync(plane: ControlPlane, *args: str, url: str | None = None) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "CRMSYNC_CONTROL_URL": url or str(plane.http.base_url),
        "CRMSYNC_ADMIN_TOKEN": ADMIN,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "crmsync.control.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_workflows_command_uses_the_api_and_its_exit_codes(
    cluster: Cluster, plane: ControlPlane
) -> None:
    code, out, _ = await _crmsync(plane, "workflows", "list")
    assert code == 0
    assert out.split()[:6] == ["WORKFLOW", "STATUS", "BACKLOG", "TREND", "PENDING", "ERROR"]
    assert "d365-to-campaign  STARTING" in out
    code, out, _ = await _crmsync(plane, "workflows", "stop", D2C, "--wait")
    assert (code, out.splitlines()[-1]) == (0, f"{D2C}: STOPPED")
    code, _, err = await _crmsync(plane, "workflows", "stop", D2C)
    assert code == 1
    assert "409" in err and "already STOPPED" in err
    code, out, _ = await _crmsync(plane, "workflows", "replay", D2C, "--from", "earliest")
    assert (code, out.strip()) == (0, f"{D2C}: replay from earliest: backlog 0")
    code, _, err = await _crmsync(plane, "workflows", "replay", D2C, "--from", "last tuesday")
    assert code == 1 and "earliest" in err
    code, _, _ = await _crmsync(plane, "workflows", "stop", "no-such-workflow")
    assert code == 2
    code, _, err = await _crmsync(plane, "workflows", "list", url=f"http://127.0.0.1:{free_port()}")
    assert code == 3 and "no control plane" in err
    code, out, _ = await _crmsync(plane, "workflows", "--json", "show", D2C)
    assert code == 0 and json.loads(out)["status"] == "STOPPED"
