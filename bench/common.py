"""What the process-level benchmarks share: child processes, a Kafka of their own, contacts.

Imported by the benchmarks in this folder (run as scripts, so this folder is on their path).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import Progress

from crmsync.deploy.local.kafka import LocalKafka
from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams.catalog import spec
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import EventProducer, Scalar, change_event

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = "d365-to-campaign"
GROUP = f"crmsync.{WORKFLOW}"
console = Console(stderr=True)


class BenchError(RuntimeError):
    """The benchmark cannot go on (a process died, something never happened)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(
    check: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.2
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(every)


@dataclass
class Processes:
    """The bench's child processes, each in a session of its own with a log file."""

    logs: Path
    env: dict[str, str] = field(default_factory=dict)
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env, **(env or {})},
                cwd=self.logs,  # Faust's data directory goes there, not into the checkout
                start_new_session=True,
            )
        self.started.append((name, popen))
        return popen

    def crmsync(
        self, name: str, args: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`crmsync <args>`, as the local stack runs it."""
        return self.start(name, [sys.executable, "-m", "crmsync.control.cli", *args], env)

    def check(self) -> None:
        for name, popen in self.started:
            if popen.poll() is not None:
                raise BenchError(f"{name} exited with {popen.returncode}")

    def stop(self, popens: Sequence[subprocess.Popen[bytes]], timeout: float = 30) -> None:
        """SIGTERM (a worker leaves its group and commits), SIGKILL after `timeout`."""
        for popen in popens:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        for popen in popens:
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        self.started = [(n, p) for n, p in self.started if p not in popens]

    def stop_all(self) -> None:
        """Every process still running, newest first."""
        self.stop([popen for _, popen in reversed(self.started)])

    def tails(self, lines: int = 15) -> None:
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            console.print(f"[bold]--- {log.name}[/bold]\n" + "\n".join(text), highlight=False)


@contextlib.asynccontextmanager
async def kafka(tmp: Path) -> AsyncIterator[tuple[str, Path | None]]:
    """KAFKA_BOOTSTRAP_SERVERS, or a broker of our own on free ports (and its log)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external, None
        return
    broker = LocalKafka(
        ROOT / ".cache", tmp / "kafka", base_port=free_port(), controller_base_port=free_port()
    )
    try:
        console.print("starting Kafka")
        await asyncio.to_thread(broker.start)
        yield broker.bootstrap_servers, broker.specs[0].data_dir / "logs" / "server.log"
    finally:
        await asyncio.to_thread(broker.stop)


def contact() -> tuple[str, bytes]:
    """A new contact's change event: its key and its encoded value."""
    key = str(uuid.uuid4())
    after: dict[str, Scalar] = {
        "contactid": key,
        "firstname": f"First{key[:6]}",
        "lastname": f"Last{key[6:12]}",
        "emailaddress1": f"{key}@example.org",
        "donotbulkemail": False,
    }
    return key, CHANGE_EVENT.encode(
        change_event("u", "contact", key, after=after, system="d365"), validate=False
    )


async def publish(bootstrap: str, n: int) -> None:
    """`n` new contacts on the contact topic, with a progress bar."""
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"publishing {n:,} contact changes", total=n)
        async with EventProducer(bootstrap) as producer:
            pending = []
            for _ in range(n):
                pending.append(
                    await producer.send_encoded(topics.CONTACT_CHANGES, *contact(), wait=False)
                )
                if len(pending) >= 5000:
                    await asyncio.gather(*pending)
                    progress.advance(task, len(pending))
                    pending.clear()
            await asyncio.gather(*pending)


async def workflow_lag(
    bootstrap: str, workflow: str, topic_names: Sequence[str], partitions: int
) -> int:
    """Records of `topic_names` the workflow's group has not committed (the whole topic where
    it committed nothing)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await probe.start()
    try:
        tps = [TopicPartition(t, p) for t in topic_names for p in range(partitions)]
        ends = await probe.end_offsets(tps)
        try:
            committed = await admin.list_consumer_group_offsets(spec(workflow).group_id)
        except KafkaError:  # the group's coordinator is still being elected: nothing committed
            committed = {}
        return sum(
            end - max(committed[tp].offset, 0) if tp in committed else end
            for tp, end in ends.items()
        )
    finally:
        await probe.stop()
        await admin.close()


async def emulator_requests(url: str) -> int:
    """The API requests an emulator has served (its admin stats)."""
    async with httpx.AsyncClient(base_url=url) as http:
        return int((await http.get("/_admin/stats")).json()["requests"])
