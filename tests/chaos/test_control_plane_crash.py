"""Scenario 4: the control plane killed with SIGKILL and restarted while two workflows run and
one is stopped. The data plane does not need it: the running keep running (and writing), the
stopped one stays stopped, and the API tells the truth again once it is back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest

from crmsync.streams.kafka import topics
from tests.chaos.conftest import pick, record
from tests.chaos.ledger import Comparison, Outcome, Stopwatch
from tests.chaos.traffic import (
    C2D,
    D2C,
    OPT,
    ContactTraffic,
    EmailTraffic,
    OptOutTraffic,
    dlq_count,
    publish,
    publish_steadily,
)
from tests.chaos.workers import total_lag, wait_drained, wait_requests_beyond, wait_worker
from tests.conftest import free_port
from tests.integration.harness import Cluster, wait_for
from tests.integration.workflow_helpers import requests

TOKEN = "chaos-admin-token-0123456789"
OPT_TOPICS = [topics.CONTACT_CHANGES, topics.PROFILE_CHANGES]

pytestmark = pytest.mark.timeout(pick(240, 900, 500))


class ControlProcess:
    """`crmsync control` as a process of its own, so that it can be killed."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = cluster.home / "control.log"
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )

    async def start(self) -> None:
        self._spawn()

        async def up() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            try:
                return (await self.http.get("/api/v1/workflows")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(up, 60, "the control plane to answer")

    def _spawn(self) -> None:
        env = self.cluster.worker_env(
            CRMSYNC_HTTP_PORT=str(self.port),
            CRMSYNC_ADMIN_TOKEN=TOKEN,
            CRMSYNC_BACKLOG_SAMPLE_S="0.5",
            CRMSYNC_BACKLOG_WINDOW_S="10",
        )
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "crmsync.control.cli", "control"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    async def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        await self.http.aclose()

    async def flows(self) -> dict[str, dict[str, Any]]:
        answer = (await self.http.get("/api/v1/workflows")).json()
        return {flow["name"]: flow for flow in answer["workflows"]}

    async def action(self, workflow: str, action: str) -> None:
        response = await self.http.post(f"/api/v1/workflows/{workflow}/{action}")
        assert response.status_code == 202, response.text

    async def wait_statuses(self, expected: dict[str, str], within: float = 60) -> None:
        async def reached() -> bool:
            flows = await self.flows()
            return all(flows[name]["status"] == status for name, status in expected.items())

        await wait_for(reached, within, f"statuses {expected}", 0.5)


async def test_control_plane_killed_while_workflows_run_and_one_is_stopped(
    cluster: Cluster,
) -> None:
    clock = Stopwatch()
    control = ControlProcess(cluster)
    try:
        await _scenario(cluster, control, clock)
    finally:
        await control.close()


async def _scenario(cluster: Cluster, control: ControlProcess, clock: Stopwatch) -> None:
    contacts = ContactTraffic()
    emails = await EmailTraffic.with_contacts(cluster, 30)
    optouts = await OptOutTraffic.with_contacts(cluster, 50)
    await control.start()
    workers = [cluster.start_worker(flow) for flow in (D2C, C2D, OPT)]
    for worker in workers:
        await wait_worker(cluster, worker, "RUNNING")
    await control.wait_statuses({D2C: "RUNNING", C2D: "RUNNING", OPT: "RUNNING"})
    await control.action(OPT, "stop")
    await control.wait_statuses({OPT: "STOPPED"})

    profiles = contacts.versions(pick(300, 5000), 3)
    flips = optouts.flips(pick(200, 3000))
    stream = asyncio.gather(
        publish_steadily(cluster, topics.CONTACT_CHANGES, profiles, batches=10, pause=0.5),
        publish_steadily(
            cluster, topics.EMAIL_EVENTS, emails.events(pick(300, 5000)), batches=10, pause=0.5
        ),
        publish(cluster, topics.PROFILE_CHANGES, flips),
    )
    await wait_requests_beyond(cluster, "campaign", requests(cluster, "campaign") + 20)
    control.kill()
    await stream
    # The data plane goes on without it: what is published now is written now.
    before = {system: requests(cluster, system) for system in ("campaign", "d365")}
    await asyncio.gather(
        publish(cluster, topics.CONTACT_CHANGES, contacts.versions(pick(100, 1000), 1, "d")),
        publish(cluster, topics.EMAIL_EVENTS, emails.events(pick(100, 1000))),
    )
    for system, count in before.items():
        await wait_requests_beyond(cluster, system, count)
    await asyncio.sleep(2)
    stopped_backlog = await total_lag(cluster, OPT, OPT_TOPICS)
    assert stopped_backlog >= len(flips), "the stopped workflow read nothing"

    await control.start()
    await control.wait_statuses({D2C: "RUNNING", C2D: "RUNNING", OPT: "STOPPED"})
    flows = await control.flows()
    assert flows[OPT]["backlog"] >= len(flips)
    # Killed again right after a Start: the Start was written, the workers carry it out.
    await control.action(OPT, "start")
    control.kill()
    await wait_worker(cluster, workers[2], "RUNNING")
    await control.start()
    await control.wait_statuses({D2C: "RUNNING", C2D: "RUNNING", OPT: "RUNNING"})

    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES], within=120 + contacts.sent / 20)
    await wait_drained(cluster, C2D, [topics.EMAIL_EVENTS], within=120 + emails.sent / 20)
    await wait_drained(cluster, OPT, OPT_TOPICS, within=120 + optouts.sent / 20)
    assert all(worker.process.poll() is None for worker in workers)
    found = Comparison()
    for traffic in (contacts, emails, optouts):
        found.add(await traffic.compare(cluster))
    record(
        Outcome(
            "4. control plane kill -9 (twice) with 2 workflows running, 1 stopped",
            sent=contacts.sent + emails.sent + optouts.sent,
            written=found.written,
            lost=found.lost,
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=await dlq_count(cluster, [D2C, C2D, OPT]),
            seconds=clock.seconds,
            samples=[f"stopped workflow's backlog: {stopped_backlog}", *found.samples],
        )
    )
