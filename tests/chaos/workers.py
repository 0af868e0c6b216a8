"""Worker processes under chaos: waiting for one particular process, progress, draining."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from crmsync.streams.control_protocol import WorkerStatus
from tests.integration.harness import Cluster, Worker, wait_for
from tests.integration.workflow_helpers import requests


async def wait_worker(cluster: Cluster, worker: Worker, state: str, within: float = 90) -> None:
    """Waits until this very process (by pid) reports `state`: a killed predecessor's last
    status stays in the status topic and must not count."""

    async def reached() -> WorkerStatus | None:
        for status in await cluster.statuses(worker.workflow):
            if status.pid == worker.process.pid and status.state == state:
                return status
        if worker.process.poll() is not None:
            raise AssertionError(f"{worker.log.name} exited {worker.process.returncode}")
        return None

    await wait_for(reached, within, f"{worker.log.name} {state}")


async def wait_requests_beyond(
    cluster: Cluster, system: str, count: int, within: float = 60
) -> int:
    """Waits until the target served more than `count` requests: the workers write."""

    async def beyond() -> int | None:
        now = requests(cluster, system)
        return now if now > count else None

    result: int = await wait_for(beyond, within, f"{system} requests beyond {count}", 0.05)
    return result


async def total_lag(cluster: Cluster, workflow: str, topics_: Iterable[str]) -> int:
    return sum([await cluster.lag(workflow, topic) for topic in topics_])


async def wait_drained(
    cluster: Cluster, workflow: str, topics_: Iterable[str], within: float = 120
) -> None:
    names = list(topics_)

    async def drained() -> bool:
        live_after = (time.time() - 5) * 1000
        for status in await cluster.statuses(workflow):
            if status.state == "FAILED" and status.heartbeat_ms > live_after:
                raise AssertionError(f"{workflow} FAILED while draining: {status.error}")
        return await total_lag(cluster, workflow, names) == 0

    await wait_for(drained, within, f"{workflow} drained ({', '.join(names)})", 0.5)


async def wait_quiet(cluster: Cluster, seconds: float = 3.0) -> tuple[int, int]:
    """Request counts of both targets, asserting they do not move for `seconds`."""
    before = (requests(cluster, "d365"), requests(cluster, "campaign"))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = (requests(cluster, "d365"), requests(cluster, "campaign"))
        assert now == before, f"targets written after STOPPED: requests {before} -> {now}"
        await asyncio.sleep(0.25)
    return before
