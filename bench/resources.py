"""Worker memory (RSS) in each state, and d365-to-campaign records/s with one and two workers.

Run: .venv/bin/python bench/resources.py [--backlog N] [--drain-records N] [--scale-records N].
It starts its own Kafka on free ports (unless KAFKA_BOOTSTRAP_SERVERS is set) and worker processes
on 127.0.0.1; stop and start go through the control topic, as the control plane would write them
(none runs here). RSS is read with psutil every 0.2 s; MB are 10^6 bytes.
  memory: `crmsync worker d365-to-campaign` RUNNING with no traffic for --idle seconds (idle);
    then STOPPED while --backlog contact changes are published and for --idle seconds after
    (stopped, holding the backlog). Its Campaign URL leads nowhere: idle or stopped, a worker
    writes nothing. Then the workflow with a discarding sink (this script with --worker-child:
    run_worker in a process of its own) drains the last --drain-records of them: the peak RSS
    while draining.
  scale: the workflow with a discarding sink (bench/throughput.py's (b): decode, map, batch, ack,
    commit, no HTTP) over the last --scale-records records, in one and then in two worker
    processes of the group crmsync.d365-to-campaign, reset before each run. The processes join
    the group while the workflow is stopped, so the clock (first commit → no backlog) measures
    neither start-up nor a rebalance; CPU µs/record counts the worker processes (user + sys).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import Progress

from crmsync import topics
from crmsync.deploy.local.kafka import LocalKafka
from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.schemas.producer import EventProducer, Scalar, change_event
from crmsync.streams.config import default_config
from crmsync.streams.control_protocol import (
    ControlRecord,
    Desired,
    TopicFollower,
    WorkerState,
    WorkerStatus,
    write_control,
)

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = "d365-to-campaign"
GROUP = f"crmsync.{WORKFLOW}"
console = Console(stderr=True)


class BenchError(RuntimeError):
    """A process or a measurement did not do what the bench waits for."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _until(
    check: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.2
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(every)


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Processes:
    """The bench's child processes, each in a session of its own with a log file."""

    logs: Path
    env: dict[str, str]
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=self.logs,  # Faust's data directory goes there, not into the checkout
                start_new_session=True,
            )
        self.started.append((name, popen))
        return popen

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        """`crmsync worker d365-to-campaign`, as the local stack runs it."""
        return self.start(name, [sys.executable, "-m", "crmsync.control.cli", "worker", WORKFLOW])

    def discarding_worker(self, name: str) -> subprocess.Popen[bytes]:
        """The workflow with a discarding sink (this script's --worker-child)."""
        return self.start(name, [sys.executable, str(Path(__file__).resolve()), "--worker-child"])

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
        self.stop([popen for _, popen in reversed(self.started)])

    def tails(self, lines: int = 15) -> None:
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            console.print(f"[bold]--- {log.name}[/bold]\n" + "\n".join(text), highlight=False)


@contextlib.asynccontextmanager
async def _kafka(tmp: Path) -> AsyncIterator[str]:
    """KAFKA_BOOTSTRAP_SERVERS, or a broker of our own on free ports."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    kafka = LocalKafka(
        ROOT / ".cache", tmp / "kafka", base_port=_free_port(), controller_base_port=_free_port()
    )
    try:
        console.print("starting Kafka")
        await asyncio.to_thread(kafka.start)
        yield kafka.bootstrap_servers
    finally:
        await asyncio.to_thread(kafka.stop)


@dataclass
class Rss:
    """RSS samples of one process, every `every` seconds while `sampling()` is open."""

    pid: int
    every: float = 0.2
    samples: list[int] = field(default_factory=list)

    async def _run(self) -> None:
        process = psutil.Process(self.pid)
        while True:
            with contextlib.suppress(psutil.Error):
                self.samples.append(int(process.memory_info().rss))
            await asyncio.sleep(self.every)

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[Rss]:
        task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def figures(self) -> dict[str, int]:
        if not self.samples:
            raise BenchError(f"no RSS sample of process {self.pid}")
        return {
            "peak_bytes": max(self.samples),
            "median_bytes": int(statistics.median(self.samples)),
            "samples": len(self.samples),
        }


def _cpu_seconds(popens: Sequence[subprocess.Popen[bytes]]) -> float:
    total = 0.0
    for popen in popens:
        times = psutil.Process(popen.pid).cpu_times()
        total += float(times.user) + float(times.system)
    return total


# -- the workflow: control record, worker reports, group offsets ------------------------------


@dataclass
class Workflow:
    """The workflow's control record (written here) and its workers' reports (read here)."""

    bootstrap: str
    partitions: int  # of every topic the workflow reads
    control: TopicFollower
    status: TopicFollower

    @classmethod
    async def follow(cls, bootstrap: str, partitions: int) -> Workflow:
        """Creates the workflow's topics and follows its control and status topics."""
        source = default_config(WORKFLOW).source_topics()
        await topics.ensure_topics(
            bootstrap,
            [
                *topics.topic_specs(partitions),
                *(topics.TopicSpec(name, partitions) for name in source),
            ],
        )
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics(source)
        finally:
            await admin.close()
        held = sum(len(topic["partitions"]) for topic in described)  # what the group shares
        control = TopicFollower(bootstrap, topics.CONTROL)
        status = TopicFollower(bootstrap, topics.STATUS)
        await control.start()
        await status.start()
        loaded = asyncio.gather(control.loaded.wait(), status.loaded.wait())
        await asyncio.wait_for(loaded, 60)
        return cls(bootstrap, held, control, status)

    async def close(self) -> None:
        await self.status.stop()
        await self.control.stop()

    async def desire(self, desired: Desired) -> int:
        """A new generation asking for `desired`, as Stop/Start would; returns its number."""
        data = self.control.latest.get(WORKFLOW)
        current = ControlRecord.decode(data) if data is not None else None
        record = ControlRecord(
            workflow=WORKFLOW,
            desired=desired,
            generation=(current.generation if current else 0) + 1,
            active_config=(
                current.active_config
                if current
                else default_config(WORKFLOW).model_dump(mode="json")
            ),
            active_version=current.active_version if current else 1,
            updated_by="bench",
        )
        await write_control(self.bootstrap, record)
        encoded = record.encode()

        async def echoed() -> bool:
            return self.control.latest.get(WORKFLOW) == encoded

        await _until(echoed, 30, "the control record to come back", every=0.05)
        return record.generation

    def reports(self, generation: int, state: WorkerState) -> list[WorkerStatus]:
        """Live workers (heartbeat within 10 s) in `state` at `generation`."""
        recent = time.time() * 1000 - 10_000
        found = [
            WorkerStatus.decode(value)
            for key, value in self.status.latest.items()
            if key.startswith(f"{WORKFLOW}/")
        ]
        return [
            r
            for r in found
            if r.heartbeat_ms > recent and r.generation == generation and r.state == state
        ]

    async def wait(
        self, state: WorkerState, generation: int, workers: int, processes: Processes
    ) -> None:
        """Until `workers` workers report `state`, sharing every partition between them."""

        async def ready() -> bool:
            processes.check()
            found = self.reports(generation, state)
            held = [len(r.partitions) for r in found]
            return len(found) == workers and all(held) and sum(held) == self.partitions

        await _until(ready, 180, f"{workers} worker(s) {state} with all partitions", every=0.25)


async def _partitions(bootstrap: str) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topics.CONTACT_CHANGES])
    finally:
        await admin.close()
    return [TopicPartition(topics.CONTACT_CHANGES, p["partition"]) for p in described["partitions"]]


async def _ends(bootstrap: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(await _partitions(bootstrap)))
    finally:
        await consumer.stop()


@dataclass
class Lag:
    """The group's lag over the contact topic: Σ (log end - committed)."""

    bootstrap: str
    admin: AIOKafkaAdminClient
    consumer: AIOKafkaConsumer
    tps: list[TopicPartition]

    @classmethod
    @contextlib.asynccontextmanager
    async def reading(cls, bootstrap: str) -> AsyncIterator[Lag]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await admin.start()
        await consumer.start()
        try:
            yield cls(bootstrap, admin, consumer, await _partitions(bootstrap))
        finally:
            await consumer.stop()
            await admin.close()

    async def now(self) -> int:
        committed = await self.admin.list_consumer_group_offsets(GROUP)
        ends = await self.consumer.end_offsets(self.tps)
        return sum(
            end - max(committed[tp].offset, 0) if tp in committed else end
            for tp, end in ends.items()
        )


async def _reset_group(bootstrap: str, tail: int) -> None:
    """Commits, while the group has no member, `tail` records before the end, spread over the
    partitions that hold records: where the next run starts."""
    tps = await _partitions(bootstrap)
    ends = await _ends(bootstrap)
    share = tail // max(1, len([tp for tp in tps if ends[tp]]))
    deadline = time.monotonic() + 60
    while True:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign(tps)
            await consumer.commit({tp: max(0, ends[tp] - share) for tp in tps})
            return
        except KafkaError:
            if time.monotonic() > deadline:  # a member that left is still in the group
                raise
        finally:
            await consumer.stop()
        await asyncio.sleep(1)


def _contact() -> tuple[str, bytes]:
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


async def _publish(bootstrap: str, n: int) -> None:
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"publishing {n:,} contact changes", total=n)
        async with EventProducer(bootstrap) as producer:
            pending = []
            for _ in range(n):
                pending.append(
                    await producer.send_encoded(topics.CONTACT_CHANGES, *_contact(), wait=False)
                )
                if len(pending) >= 5000:
                    await asyncio.gather(*pending)
                    progress.advance(task, len(pending))
                    pending.clear()
            await asyncio.gather(*pending)


# -- the measurements ---------------------------------------------------------------------------


async def _discarding_run(
    workflow: Workflow, processes: Processes, workers: int, records: int
) -> dict[str, Any]:
    """`workers` processes drain the last `records` records with a discarding sink."""
    bootstrap = workflow.bootstrap
    await _reset_group(bootstrap, records)
    generation = await workflow.desire("stopped")
    popens = [processes.discarding_worker(f"discarding-{workers}-{n}") for n in range(workers)]
    try:
        await workflow.wait("STOPPED", generation, workers, processes)
        samplers = [Rss(popen.pid) for popen in popens]
        async with Lag.reading(bootstrap) as lag, contextlib.AsyncExitStack() as stack:
            for sampler in samplers:
                await stack.enter_async_context(sampler.sampling())
            initial = await lag.now()
            await workflow.desire("running")
            while (start_lag := await lag.now()) >= initial:  # resuming is not timed
                processes.check()
                await asyncio.sleep(0.05)
            cpu, wall = _cpu_seconds(popens), time.perf_counter()
            while await lag.now() > 0:
                processes.check()
                await asyncio.sleep(0.1)
            wall, cpu = time.perf_counter() - wall, _cpu_seconds(popens) - cpu
    finally:
        await asyncio.to_thread(processes.stop, popens)
    return {
        "workers": workers,
        "records": start_lag,
        "records_per_s": start_lag / wall,
        "cpu_us_per_record": cpu / start_lag * 1e6,
        "seconds": wall,
        "rss_peak_bytes": [sampler.figures()["peak_bytes"] for sampler in samplers],
    }


async def _memory(
    args: argparse.Namespace, workflow: Workflow, processes: Processes
) -> dict[str, Any]:
    generation = await workflow.desire("running")
    worker = processes.worker("worker")
    await workflow.wait("RUNNING", generation, 1, processes)
    console.print(f"worker RUNNING, no traffic: sampling RSS for {args.idle:g}s")
    async with Rss(worker.pid).sampling() as idle:
        await asyncio.sleep(args.idle)
    generation = await workflow.desire("stopped")
    await workflow.wait("STOPPED", generation, 1, processes)
    console.print(f"worker STOPPED: publishing a backlog of {args.backlog:,} records")
    async with Rss(worker.pid).sampling() as stopped:
        await _publish(workflow.bootstrap, args.backlog)
        await asyncio.sleep(args.idle)
    processes.check()
    await asyncio.to_thread(processes.stop, [worker])
    console.print(f"draining {args.drain_records:,} records with a discarding sink")
    drain = await _discarding_run(workflow, processes, 1, args.drain_records)
    return {
        "idle": idle.figures(),
        "stopped_with_backlog": {**stopped.figures(), "backlog_records": args.backlog},
        "draining": {
            "peak_bytes": max(drain["rss_peak_bytes"]),
            "records": drain["records"],
            "records_per_s": drain["records_per_s"],
        },
    }


async def _scale(
    args: argparse.Namespace, workflow: Workflow, processes: Processes
) -> dict[str, Any]:
    runs = {}
    for workers in (1, 2):
        console.print(f"scale: {args.scale_records:,} records, {workers} worker process(es)")
        runs[workers] = await _discarding_run(workflow, processes, workers, args.scale_records)
        console.print(f"  {runs[workers]['records_per_s']:,.0f} records/s")
    return {
        "records": args.scale_records,
        "workers_1": runs[1],
        "workers_2": runs[2],
        "ratio": runs[2]["records_per_s"] / runs[1]["records_per_s"],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    current = asyncio.current_task()
    assert current is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
    tmp = Path(tempfile.mkdtemp(prefix="crmsync-bench-resources-"))
    processes = Processes(tmp, {})
    try:
        async with _kafka(tmp) as bootstrap:
            processes.env = {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "CRMSYNC_HOME": str(tmp),
                "CRMSYNC_TOPIC_PARTITIONS": str(args.partitions),
                "CRMSYNC_CAMPAIGN_URL": f"http://127.0.0.1:{_free_port()}",
                "CRMSYNC_DYNAMICS_URL": f"http://127.0.0.1:{_free_port()}",
            }
            workflow = await Workflow.follow(bootstrap, args.partitions)
            try:
                result: dict[str, Any] = {
                    "config": {
                        "partitions": args.partitions,
                        "backlog": args.backlog,
                        "drain_records": args.drain_records,
                        "scale_records": args.scale_records,
                        "idle_s": args.idle,
                    }
                }
                if not args.skip_memory:
                    result["memory"] = await _memory(args, workflow, processes)
                if not args.skip_scale:
                    short = args.scale_records - sum((await _ends(bootstrap)).values())
                    if short > 0:
                        await _publish(bootstrap, short)
                    result["scale"] = await _scale(args, workflow, processes)
            finally:
                await asyncio.to_thread(processes.stop_all)
                await workflow.close()
    except BaseException:
        processes.tails()
        console.print(f"logs kept in {tmp}")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _worker_child() -> int:
    """One worker of the workflow with a discarding sink, until SIGTERM."""
    from crmsync.settings import Settings
    from crmsync.streams.app import run_worker
    from crmsync.streams.sinks.base import DiscardingSink

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    for noisy in ("aiokafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    asyncio.run(run_worker(WORKFLOW, Settings(), sinks={"campaign": DiscardingSink()}))
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f}"


def _report(result: dict[str, Any]) -> None:
    memory = result.get("memory")
    if memory:
        print(f"\n{WORKFLOW} worker RSS (MB = 10^6 bytes)\n")
        print("| state | peak MB | median MB |")
        print("|---|---:|---:|")
        idle, stopped = memory["idle"], memory["stopped_with_backlog"]
        print(f"| RUNNING, idle | {_mb(idle['peak_bytes'])} | {_mb(idle['median_bytes'])} |")
        print(
            f"| STOPPED, {stopped['backlog_records']:,} records of backlog "
            f"| {_mb(stopped['peak_bytes'])} | {_mb(stopped['median_bytes'])} |"
        )
        drain = memory["draining"]
        print(
            f"| draining {drain['records']:,} records (discarding sink, "
            f"{drain['records_per_s']:,.0f}/s) | {_mb(drain['peak_bytes'])} | |"
        )
    scale = result.get("scale")
    if scale:
        print(f"\n{WORKFLOW} with a discarding sink, {scale['records']:,} records\n")
        print("| worker processes | records/s | CPU µs/record | peak RSS MB per process |")
        print("|---:|---:|---:|---|")
        for key in ("workers_1", "workers_2"):
            run = scale[key]
            print(
                f"| {run['workers']} | {run['records_per_s']:,.0f} "
                f"| {run['cpu_us_per_record']:.1f} "
                f"| {', '.join(_mb(n) for n in run['rss_peak_bytes'])} |"
            )
        print(f"\n2 workers / 1 worker: {scale['ratio']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=1_000_000, help="records held while stopped")
    parser.add_argument("--drain-records", type=int, default=200_000)
    parser.add_argument("--scale-records", type=int, default=200_000)
    parser.add_argument("--idle", type=float, default=10, help="seconds sampled in each state")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/resources.json")
    parser.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_child:
        return _worker_child()
    if args.drain_records > args.backlog:
        parser.error("--drain-records must not exceed --backlog")
    result = asyncio.run(main_async(args))
    _report(result)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
