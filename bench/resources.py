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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from common import (
    GROUP,
    ROOT,
    WORKFLOW,
    BenchError,
    Processes,
    console,
    free_port,
    kafka,
    publish,
    until,
)

from crmsync.streams import catalog
from crmsync.streams.catalog import default_config
from crmsync.streams.control_protocol import (
    ControlRecord,
    Desired,
    WorkerState,
    WorkerStatus,
    write_control,
)
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.follower import CompactedTopicFollower


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
    control: CompactedTopicFollower
    status: CompactedTopicFollower

    @classmethod
    async def follow(cls, bootstrap: str, partitions: int) -> Workflow:
        """Creates the workflow's topics and follows its control and status topics."""
        source = default_config(WORKFLOW).source_topics()
        await topics.ensure_topics(
            bootstrap,
            [
                *catalog.topic_specs(partitions),
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
        control = CompactedTopicFollower(KafkaClients(bootstrap), topics.CONTROL)
        status = CompactedTopicFollower(KafkaClients(bootstrap), topics.STATUS)
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
        await write_control(KafkaClients(self.bootstrap), record)
        encoded = record.encode()

        async def echoed() -> bool:
            return self.control.latest.get(WORKFLOW) == encoded

        await until(echoed, 30, "the control record to come back", every=0.05)
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

        await until(ready, 180, f"{workers} worker(s) {state} with all partitions", every=0.25)


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


# -- the measurements ---------------------------------------------------------------------------


async def _discarding_run(
    workflow: Workflow, processes: Processes, workers: int, records: int
) -> dict[str, Any]:
    """`workers` processes drain the last `records` records with a discarding sink."""
    bootstrap = workflow.bootstrap
    await _reset_group(bootstrap, records)
    generation = await workflow.desire("stopped")
    popens = [
        processes.start(f"discarding-{workers}-{n}", [sys.executable, __file__, "--worker-child"])
        for n in range(workers)
    ]
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
            if not start_lag:
                raise BenchError(f"{records:,} records drained before the first commit: use more")
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
    worker = processes.crmsync("worker", ["worker", WORKFLOW])
    await workflow.wait("RUNNING", generation, 1, processes)
    console.print(f"worker RUNNING, no traffic: sampling RSS for {args.idle:g}s")
    async with Rss(worker.pid).sampling() as idle:
        await asyncio.sleep(args.idle)
    generation = await workflow.desire("stopped")
    await workflow.wait("STOPPED", generation, 1, processes)
    console.print(f"worker STOPPED: publishing a backlog of {args.backlog:,} records")
    async with Rss(worker.pid).sampling() as stopped:
        await publish(workflow.bootstrap, args.backlog)
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
    processes = Processes(tmp)
    try:
        async with kafka(tmp) as (bootstrap, _):
            processes.env = {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "CRMSYNC_HOME": str(tmp),
                "CRMSYNC_TOPIC_PARTITIONS": str(args.partitions),
                "CRMSYNC_CAMPAIGN_URL": f"http://127.0.0.1:{free_port()}",
                "CRMSYNC_DYNAMICS_URL": f"http://127.0.0.1:{free_port()}",
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
                        await publish(bootstrap, short)
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
    from crmsync.streams.app import run_worker
    from crmsync.streams.settings import Settings
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
