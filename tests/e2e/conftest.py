"""Debian's Chromium (driven by Playwright) against a real stack: broker, workers, control plane."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import BrowserContext, Page, async_playwright

from tests.conftest import free_port
from tests.integration.harness import Cluster, EmulatorProcess, recreate_topics, start_emulators

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN, OPERATOR, VIEWER = (
    "e2e-admin-token-0123456789",
    "e2e-operator-token-01234567",
    "e2e-viewer-token-0123456789",
)
WORKFLOWS = ("d365-to-campaign", "campaign-to-d365", "opt-in-out")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@dataclass
class Stack:
    """Three workers, the emulators and `crmsync control` as processes; its API as admin."""

    cluster: Cluster
    control: subprocess.Popen[bytes]
    control_log: Path
    url: str

    def api(self, method: str, path: str, token: str = ADMIN, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def workflows(self) -> dict[str, dict[str, Any]]:
        answer = self.api("GET", "/api/v1/workflows")
        answer.raise_for_status()
        return {w["name"]: w for w in answer.json()["workflows"]}

    def workflow(self, name: str) -> dict[str, Any]:
        answer = self.api("GET", f"/api/v1/workflows/{name}")
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    async def wait_status(self, name: str, status: str, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while (await asyncio.to_thread(self.workflows))[name]["status"] != status:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not {status} within {within:.0f}s")
            await asyncio.sleep(0.2)

    async def ensure(self, name: str, status: str) -> None:
        """Puts a workflow in RUNNING or STOPPED (through the API) whatever an earlier test did."""
        await self.wait_settled(name)
        current = (await asyncio.to_thread(self.workflows))[name]["status"]
        if current != status:
            action = "start" if status == "RUNNING" else "stop"
            await asyncio.to_thread(self.api, "POST", f"/api/v1/workflows/{name}/{action}")
        await self.wait_status(name, status)

    async def wait_settled(self, name: str, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while (await asyncio.to_thread(self.workflows))[name]["status"] == "STARTING":
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} still STARTING after {within:.0f}s")
            await asyncio.sleep(0.2)

    def output(self) -> str:
        return self.control_log.read_text(errors="replace")


def _control_env(cluster: Cluster, port: int) -> dict[str, str]:
    return cluster.worker_env(
        CRMSYNC_HTTP_PORT=str(port),
        CRMSYNC_ADMIN_TOKEN=ADMIN,
        CRMSYNC_API_TOKENS=f"ops:operator:{OPERATOR},watcher:viewer:{VIEWER}",
        CRMSYNC_BACKLOG_SAMPLE_S="0.5",
        CRMSYNC_BACKLOG_WINDOW_S="10",
    )


# Module-scoped, not session-scoped: the stack's workers join the workflows' consumer groups,
# and must be gone before other tiers start their own workers against the same broker.
@pytest.fixture(scope="module")
def e2e_emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    emulators = start_emulators(tmp_path_factory.mktemp("e2e-emulators"), free_port(), free_port())
    yield emulators
    emulators.stop()


@pytest.fixture(scope="module")
def stack(
    bootstrap: str, e2e_emulators: EmulatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Fresh topics, one worker per workflow, the control plane; every workflow RUNNING."""
    asyncio.run(recreate_topics(bootstrap))
    e2e_emulators.reset()
    home = tmp_path_factory.mktemp("e2e-home")
    cluster = Cluster(bootstrap, e2e_emulators, home)
    port = free_port()
    log = home / "control.log"
    with log.open("ab") as out:
        control = subprocess.Popen(
            [sys.executable, "-m", "crmsync.control.cli", "control"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_control_env(cluster, port),
            start_new_session=True,
        )
    stack = Stack(cluster, control, log, f"http://127.0.0.1:{port}")
    try:
        for workflow in WORKFLOWS:
            cluster.start_worker(workflow)
        _wait_running(stack)
        yield stack
    finally:
        cluster.stop_all()
        if control.poll() is None:
            control.send_signal(signal.SIGTERM)
            try:
                control.wait(30)
            except subprocess.TimeoutExpired:
                control.kill()


def _wait_running(stack: Stack, within: float = 120) -> None:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        if stack.control.poll() is not None:
            raise AssertionError(f"the control plane exited:\n{stack.output()[-4000:]}")
        try:
            last = stack.workflows()
            if all(w["status"] == "RUNNING" for w in last.values()):
                return
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.3)
    raise AssertionError(f"the stack did not come up RUNNING: {last}\n{stack.output()[-4000:]}")


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Never a skip: CI installs Chromium (`make browser`), so its absence is a failure."""
    if not (CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (`make browser`, or "
            "`apt-get install -y chromium`) — the browser tests need it"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path, tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A fresh Chromium profile per test; Playwright never downloads a browser of its own."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(chromium),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        context.set_default_timeout(20_000)
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def page(browser: BrowserContext) -> Page:
    return browser.pages[0] if browser.pages else await browser.new_page()


async def sign_in(page: Page, stack: Stack, token: str = ADMIN) -> None:
    await page.goto(stack.url + "/")
    await page.get_by_label("Access token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(stack.url + "/")


async def shoot(page: Page, directory: Path, name: str) -> None:
    """Full-page screenshots at a desktop and a phone width."""
    for width, height in ((1280, 800), (390, 844)):
        await page.set_viewport_size({"width": width, "height": height})
        await page.screenshot(path=str(directory / f"{name}-{width}.png"), full_page=True)
    await page.set_viewport_size({"width": 1280, "height": 800})
