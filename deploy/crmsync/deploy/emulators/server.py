"""Runs the Dynamics 365 and Campaign emulators with uvicorn on the running event loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Coroutine, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
import uvloop

from crmsync.deploy.emulators.campaign import CampaignEmulator, CampaignOptions
from crmsync.deploy.emulators.dynamics import DynamicsEmulator, DynamicsOptions

T = TypeVar("T")


@dataclass(frozen=True)
class Emulators:
    """Where the running emulators listen and which credentials they accept."""

    dynamics_url: str
    campaign_url: str
    tenant: str
    org: str
    client_id: str
    client_secret: str
    data_dir: Path

    @property
    def dynamics_api_url(self) -> str:
        return f"{self.dynamics_url}/api/data/v9.2"

    @property
    def dynamics_token_url(self) -> str:
        return f"{self.dynamics_url}/{self.tenant}/oauth2/v2.0/token"

    @property
    def campaign_api_url(self) -> str:
        return f"{self.campaign_url}/{self.org}/campaign"

    @property
    def campaign_token_url(self) -> str:
        return f"{self.campaign_url}/ims/token/v3"


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
EMULATOR_KINDS = ("dynamics", "campaign")


class _Server(uvicorn.Server):
    # Two servers share one loop; signals belong to whoever owns the process (serve_emulators).
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _split_options(options: dict[str, Any]) -> tuple[DynamicsOptions, CampaignOptions]:
    """`dynamics_<field>=` / `campaign_<field>=` keyword arguments into the two option objects."""
    picked: dict[str, dict[str, Any]] = {"dynamics": {}, "campaign": {}}
    known = {
        "dynamics": {f.name for f in dataclasses.fields(DynamicsOptions)},
        "campaign": {f.name for f in dataclasses.fields(CampaignOptions)},
    }
    for key, value in options.items():
        prefix, _, name = key.partition("_")
        if prefix not in picked or name not in known[prefix]:
            raise TypeError(f"unknown emulator option {key!r}")
        picked[prefix][name] = value
    return DynamicsOptions(**picked["dynamics"]), CampaignOptions(**picked["campaign"])


async def _start(
    app: Any, host: str, port: int, tls: tuple[Path, Path] | None = None
) -> tuple[_Server, asyncio.Task[None], int]:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=None if tls is None else str(tls[0]),
        ssl_keyfile=None if tls is None else str(tls[1]),
        # httptools parses HTTP/1.1 in C (h11, the pure-Python default, costs more per request
        # than the emulators' own work); no access log, no per-request logging at all.
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            # uvicorn reports a failed bind by exiting; make it an ordinary error.
            with contextlib.suppress(BaseException):
                task.result()
            raise OSError(f"emulator could not listen on {host}:{port}")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, task, int(bound)


async def _stop(server: _Server, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError, SystemExit):
        await task


@contextlib.asynccontextmanager
async def running_emulators(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    dynamics_port: int = 8081,
    campaign_port: int = 8082,
    tenant: str = "local",
    org: str = "local",
    client_id: str = "crmsync-local",
    client_secret: str = "crmsync-local",
    tls: tuple[Path, Path] | None = None,
    only: Sequence[str] = EMULATOR_KINDS,
    **options: Any,
) -> AsyncIterator[Emulators]:
    """Starts both emulators with uvicorn on the running loop; port 0 = pick a free port.

    ``tls`` (certificate file, key file) serves both over https, as the real services are (the
    vendors' SDKs refuse anything else); the default is plain http on loopback.

    Extra options are `dynamics_<field>` / `campaign_<field>` of DynamicsOptions / CampaignOptions,
    e.g. `dynamics_token_lifetime_s=2` or `campaign_requests_per_window=10`.

    ``only`` names the emulators to run (the others' URLs are empty): `crmsync emulators` runs
    each in a process of its own, so neither takes CPU from the other.
    """
    if host not in _LOOPBACK:
        raise ValueError(f"the emulators listen on loopback only, not on {host!r}")
    unknown = set(only) - set(EMULATOR_KINDS)
    if unknown or not only:
        raise ValueError(f"only: pick from {EMULATOR_KINDS}, not {sorted(unknown)}")
    dynamics_options, campaign_options = _split_options(options)
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    dynamics = DynamicsEmulator(
        data_dir / "dynamics.sqlite3",
        tenant=tenant,
        client_id=client_id,
        client_secret=client_secret,
        options=dynamics_options,
    )
    campaign = CampaignEmulator(
        data_dir / "campaign.sqlite3",
        org=org,
        client_id=client_id,
        client_secret=client_secret,
        options=campaign_options,
    )
    scheme = "http" if tls is None else "https"
    urls = {"dynamics": "", "campaign": ""}
    async with contextlib.AsyncExitStack() as stack:
        for kind, emulator, port in (
            ("dynamics", dynamics, dynamics_port),
            ("campaign", campaign, campaign_port),
        ):
            if kind not in only:
                continue
            await emulator.open()
            stack.push_async_callback(emulator.close)
            server, task, bound = await _start(emulator.app, host, port, tls)
            stack.push_async_callback(_stop, server, task)
            urls[kind] = f"{scheme}://{host}:{bound}"
        yield Emulators(
            dynamics_url=urls["dynamics"],
            campaign_url=urls["campaign"],
            tenant=tenant,
            org=org,
            client_id=client_id,
            client_secret=client_secret,
            data_dir=data_dir,
        )


def _stop_signals() -> tuple[asyncio.Event, list[signal.Signals]]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    return stop, installed


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs an emulator process's main coroutine to its end on uvloop's event loop (libuv: less
    CPU per request than asyncio's own loop)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    # Nothing signals a parent's death (SIGKILL): its pid stops being ours.
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    stop.set()


async def serve_emulators(data_dir: Path, parent_pid: int | None = None, **kwargs: Any) -> None:
    """Runs the emulators (both, or `only=`) until cancelled or until SIGINT/SIGTERM, or, with
    `parent_pid`, until that process is gone (killed: its children must not live on)."""
    stop, installed = _stop_signals()
    watch = None if parent_pid is None else asyncio.create_task(_orphaned(parent_pid, stop))
    try:
        async with running_emulators(data_dir, **kwargs):
            await stop.wait()
    finally:
        if watch is not None:
            watch.cancel()
        for sig in installed:
            asyncio.get_running_loop().remove_signal_handler(sig)


async def serve_app(app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
    """Any ASGI app with the emulators' server settings until SIGINT/SIGTERM (the bench's
    baseline)."""
    stop, installed = _stop_signals()
    server, task, _ = await _start(app, host, port)
    try:
        await stop.wait()
    finally:
        await _stop(server, task)
        for sig in installed:
            asyncio.get_running_loop().remove_signal_handler(sig)
