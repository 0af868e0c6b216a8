"""The local stack behind `make run` / `crmsync up`: every process, in order, restarted when it
dies (with backoff), stopped cleanly."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from crmsync.control.auth import resolve_admin_token, token_whereabouts
from crmsync.control.client import ControlClient, Refused, Unreachable
from crmsync.control.secret_files import private_dir, write_secret
from crmsync.deploy.local.kafka import LocalKafka
from crmsync.streams.catalog import NAMES as WORKFLOWS
from crmsync.streams.settings import Settings

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A process of the local stack did not come up."""


#: The wait before restarting a process that died: doubled at each death in a row, capped.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
#: Up this long, a process counts as healthy again: the next death restarts it at once-ish.
HEALTHY_AFTER_S = 60.0


@dataclass
class Process:
    """One child process of the stack, with its log file under .local/logs/."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    #: Restarted by `LocalStack.supervise` when it dies (workers, source, emulators).
    restart: bool = False
    restarts: int = 0
    started_at: float = 0.0
    _deaths_in_a_row: int = 0
    _restart_at: float | None = None

    def start(self, logs: Path) -> None:
        self.started_at = time.monotonic()
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{self.name}.log").open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    def wait_ready(self, timeout: float, logs: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise StackError(
                    f"{self.name} exited with {self.popen.returncode}; see {logs / self.name}.log"
                )
            if self.ready():
                return
            time.sleep(0.2)
        raise StackError(f"{self.name} was not ready after {timeout:.0f}s; see {logs}")

    def supervise(self, logs: Path, now: float) -> None:
        """Restarts the process if it died, after a backoff that grows while it keeps dying."""
        if not self.restart or self.popen is None or self.popen.poll() is None:
            return
        if self._restart_at is None:
            healthy = now - self.started_at >= HEALTHY_AFTER_S
            self._deaths_in_a_row = 1 if healthy else self._deaths_in_a_row + 1
            wait = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** (self._deaths_in_a_row - 1))
            self._restart_at = now + wait
            log.warning(
                "event=process_died name=%s exit=%s restart_in_s=%.1f see=%s",
                self.name,
                self.popen.returncode,
                wait,
                logs / f"{self.name}.log",
            )
        if now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self.start(logs)
            log.warning("event=process_restarted name=%s restarts=%s", self.name, self.restarts)

    def stop(self, timeout: float = 30) -> None:
        self.restart = False  # a stop is not a death
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("event=process_kill name=%s reason=timeout", self.name)
            self.popen.kill()
            self.popen.wait()


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check


@dataclass
class LocalStack:
    """Kafka (unless KAFKA_BOOTSTRAP_SERVERS is set), topics, the emulators, the Dynamics
    source, the control plane and one worker per workflow."""

    settings: Settings
    brokers: int = 1
    kafka: LocalKafka | None = None
    processes: list[Process] = field(default_factory=list)
    admin_token: str = ""
    statuses: dict[str, str] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.settings.local_dir / "logs"

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka.bootstrap_servers if self.kafka else self.settings.bootstrap_servers

    def _crmsync(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "crmsync.control.cli", *args]

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        private_dir(self.settings.local_dir)  # logs and state of the stack: the owner's only
        if self.settings.uses_local_kafka:
            data = self.settings.local_dir / ("kafka" if self.brokers == 1 else "kafka-cluster")
            self.kafka = LocalKafka(self.settings.cache_dir, data, nodes=self.brokers)
            self.kafka.start()
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers}
        create = Process("topics", self._crmsync("topics", "create"), lambda: False, env)
        create.start(self.logs)
        if create.popen is None or create.popen.wait(120) != 0:
            raise StackError(f"creating topics failed; see {self.logs / 'topics.log'}")
        # Each emulator in a process of its own: neither takes CPU from the other.
        emulators = [
            Process(
                f"emulator-{kind}",
                self._crmsync("emulators", "--only", kind),
                _http_ok(f"{url}/_admin/stats"),
                env,
                restart=True,
            )
            for kind, url in (
                ("dynamics", self.settings.dynamics_url),
                ("campaign", self.settings.campaign_url),
            )
        ]
        for process in emulators:
            process.start(self.logs)
            self.processes.append(process)
        for process in emulators:
            process.wait_ready(60, self.logs)
        # What a user runs on a real org first, run on every start (idempotent): crmsync's
        # activity tables, columns and keys, created through the Web API metadata endpoints.
        setup = Process("targets-setup", self._crmsync("targets", "setup", "d365"), bool, env)
        setup.start(self.logs)
        if setup.popen is None or setup.popen.wait(120) != 0:
            raise StackError(
                f"crmsync targets setup d365 failed; see {self.logs}/targets-setup.log"
            )
        # The Dynamics source: change tracking of the emulator → the change topics.
        source = Process(
            "source-d365", self._crmsync("source", "d365"), lambda: True, env, restart=True
        )
        source.start(self.logs)
        self.processes.append(source)
        self.admin_token = resolve_admin_token(self.settings)
        control = Process(
            "control",
            self._crmsync("control"),
            _http_ok(f"{self.settings.control_base_url}/readyz"),
            {**env, "CRMSYNC_ADMIN_TOKEN": self.admin_token},
        )
        control.start(self.logs)
        self.processes.append(control)
        control.wait_ready(90, self.logs)
        workers = [
            Process(
                f"worker-{name}", self._crmsync("worker", name), lambda: True, env, restart=True
            )
            for name in WORKFLOWS
        ]
        for worker in workers:
            worker.start(self.logs)
            self.processes.append(worker)
        self._wait_settled(workers, timeout=180)

    def _wait_settled(self, workers: list[Process], timeout: float) -> None:
        """Waits until no workflow is STARTING (RUNNING, or as a previous session left it)."""
        client = ControlClient(self.settings.control_base_url, self.admin_token, timeout=5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                for worker in workers:
                    if worker.popen is not None and worker.popen.poll() is not None:
                        raise StackError(
                            f"{worker.name} exited with {worker.popen.returncode}; "
                            f"see {self.logs / worker.name}.log"
                        )
                try:
                    self.statuses = {w["name"]: w["status"] for w in client.workflows()}
                except (Unreachable, Refused):
                    self.statuses = {}
                if self.statuses and "STARTING" not in self.statuses.values():
                    return
                if time.monotonic() > deadline:
                    raise StackError(
                        f"workflows not running after {timeout:.0f}s: {self.statuses}; "
                        f"see {self.logs}"
                    )
                time.sleep(0.5)
        finally:
            client.close()

    def supervise(self) -> None:
        """Restarts, with backoff, every worker, source or emulator process that died."""
        now = time.monotonic()
        for process in self.processes:
            process.supervise(self.logs, now)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        if self.kafka is not None:
            self.kafka.stop()

    def describe(self) -> dict[str, str]:
        return {
            "kafka": self.bootstrap_servers,
            "dynamics emulator": f"{self.settings.dynamics_url}/api/data/v9.2",
            "campaign emulator": (
                f"{self.settings.campaign_url}/{self.settings.campaign_org}/campaign"
            ),
            "control plane": self.settings.control_base_url,
            "HTTP API": f"{self.settings.control_base_url}/api/v1/workflows",
            "admin token": token_whereabouts(self.settings),
            "workflows": ", ".join(f"{name} {status}" for name, status in self.statuses.items()),
            "logs": str(self.logs),
        }


def pid_file(settings: Settings) -> Path:
    return settings.local_dir / "run" / "up.json"


def write_pid_file(settings: Settings, stack: LocalStack) -> None:
    write_secret(
        pid_file(settings),
        json.dumps({"pid": os.getpid(), **stack.describe()}),
        private=settings.local_dir,
    )


def down(settings: Settings, timeout: float = 120) -> bool:
    """Stops a stack started with `crmsync up` (detached or not); False when none runs."""
    path = pid_file(settings)
    if not path.exists():
        return False
    pid = int(json.loads(path.read_text())["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            return True
        time.sleep(0.2)
    raise StackError(f"crmsync up (pid {pid}) did not stop within {timeout:.0f}s")
