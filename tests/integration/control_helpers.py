"""The control plane in the test's own loop (uvicorn on a free port), its API, Kafka's own tool."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from crmsync.control.auth import Authenticator
from crmsync.control.server import create_app
from crmsync.deploy.local.kafka import group_lag
from crmsync.streams.settings import Settings
from tests.conftest import free_port
from tests.integration.harness import PARTITIONS, Cluster, wait_for

ADMIN, OPERATOR, VIEWER = (
    "admin-secret-0123456789abcd",
    "operator-secret-0123456789ab",
    "viewer-secret-0123456789abcd",
)


def control_settings(bootstrap: str, home: Path) -> Settings:
    """Matches the workers' test settings (heartbeat 0.5 s): a worker is live for 3.5 s."""
    return Settings(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,  # type: ignore[call-arg]
        home=home,
        topic_partitions=PARTITIONS,
        heartbeat_s=0.5,
        backlog_sample_s=0.5,
        backlog_window_s=10,
        replay_timeout_s=30,
        http_port=free_port(),
        admin_token=ADMIN,  # type: ignore[arg-type]
        api_tokens=f"ops:operator:{OPERATOR},watcher:viewer:{VIEWER}",  # type: ignore[arg-type]
    )


@dataclass
class ControlPlane:
    """`crmsync control` served in this event loop; `restart()` is a new process's worth."""

    settings: Settings
    server: uvicorn.Server | None = None
    task: asyncio.Task[None] | None = None
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.settings.http_port}",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=60,
        )

    async def start(self) -> None:
        app = create_app(self.settings, Authenticator.from_settings(self.settings, ADMIN))
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.settings.http_port,
            lifespan="on",
            log_config=None,
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 60
        while not self.server.started:
            if self.task.done() or time.monotonic() > deadline:
                raise RuntimeError("the control plane did not start")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await self.task
        self.server = self.task = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def close(self) -> None:
        await self.stop()
        await self.http.aclose()

    # -- the API --------------------------------------------------------------------------

    async def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        assert response.status_code == expect, (method, path, response.status_code, response.text)
        return response.json()

    async def workflows(self) -> dict[str, dict[str, Any]]:
        answer = await self.call("GET", "/api/v1/workflows")
        return {w["name"]: w for w in answer["workflows"]}

    async def workflow(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", f"/api/v1/workflows/{name}")
        return result

    async def action(self, name: str, action: str, expect: int = 202, **kwargs: Any) -> Any:
        return await self.call("POST", f"/api/v1/workflows/{name}/{action}", expect, **kwargs)

    async def wait_status(self, name: str, status: str, within: float = 60) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            flow = (await self.workflows())[name]
            return flow if flow["status"] == status else None

        result: dict[str, Any] = await wait_for(reached, within, f"{name} {status}")
        return result

    async def wait_backlog(self, name: str, backlog: int, within: float = 60) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            flow = await self.workflow(name)
            return flow if flow["backlog"] == backlog else None

        result: dict[str, Any] = await wait_for(reached, within, f"{name} backlog {backlog}")
        return result


def kafka_tool_lag(kafka_cache: Path, bootstrap: str, workflow: str) -> dict[tuple[str, int], str]:
    """LAG per (topic, partition) as Kafka's own kafka-consumer-groups prints it ("-": none)."""
    return group_lag(kafka_cache, bootstrap, f"crmsync.{workflow}")


async def plane_on_targets(cluster: Cluster) -> ControlPlane:
    """A started control plane whose targets are the cluster's emulators (preflight, drift,
    preview read them)."""
    settings = control_settings(cluster.bootstrap, cluster.home).model_copy(
        update={
            "dynamics_url": cluster.emulators.dynamics_url,
            "campaign_url": cluster.emulators.campaign_url,
        }
    )
    plane = ControlPlane(settings)
    await plane.start()
    return plane
