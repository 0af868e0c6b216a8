"""d365-to-campaign throughput and CPU per record, side by side with raw Kafka baselines.

Run: .venv/bin/python bench/throughput.py [--records N]. One run measures, over the same topic:
  (a) a plain aiokafka consumer + fastavro decode loop (the client-side baseline);
  (b) the workflow with a discarding sink (decode, map, batch, ack, commit — no HTTP), and (b')
      the same without outcome records, profiled with py-spy when installed: its CPU per
      record by stage (decode, map, batch/ack, fetch; see bench/stages.py);
  (c) the workflow writing to the Campaign emulator (a separate process), with the worker's CPU
      per target request apart from the emulator's (requests counted by the emulator);
  (d) Kafka's own consumer perf tool (the broker-side ceiling, a JVM: its CPU is not comparable).
CPU µs per record counts the consuming process only (user + sys), the stable figure on a shared
machine; ratios against (a) measured in the same run are what to compare across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import stages
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console

from crmsync.deploy.local.kafka import LocalKafka, run_tool
from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams import catalog
from crmsync.streams.app import run_worker
from crmsync.streams.catalog import spec
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import EventProducer, Scalar, change_event
from crmsync.streams.settings import Settings
from crmsync.streams.sinks.base import DiscardingSink

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = "d365-to-campaign"
console = Console(stderr=True)


async def _partitions(bootstrap: str, *names: str) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(names))
    finally:
        await admin.close()
    return [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _publish(bootstrap: str, n: int, partitions: int) -> None:
    await topics.ensure_topics(
        bootstrap, catalog.topic_specs(partitions, custom_entities=["new_purchase"])
    )
    async with EventProducer(bootstrap) as producer:
        pending = []
        for i in range(n):
            key = str(uuid.uuid4())
            after: dict[str, Scalar] = {
                "contactid": key,
                "firstname": f"First{i}",
                "lastname": f"Last{i}",
                "emailaddress1": f"person{i}@example.org",
                "donotbulkemail": False,
            }
            event = change_event("u", "contact", key, after=after, system="d365")
            pending.append(
                await producer.send_encoded(
                    topics.CONTACT_CHANGES,
                    key,
                    CHANGE_EVENT.encode(event, validate=False),
                    wait=False,
                )
            )
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)


async def _baseline(bootstrap: str, n: int) -> dict[str, float]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=500
    )
    await consumer.start()
    try:
        tps = await _partitions(bootstrap, topics.CONTACT_CHANGES)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        cpu, wall = time.process_time(), time.perf_counter()
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    CHANGE_EVENT.decode(record.value)
                    seen += 1
        return _figures(n, time.perf_counter() - wall, time.process_time() - cpu)
    finally:
        await consumer.stop()


async def _lag(admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, tps: list[Any]) -> int:
    committed = await admin.list_consumer_group_offsets(spec(WORKFLOW).group_id)
    ends = await consumer.end_offsets(tps)
    return sum(
        end - max(committed[tp].offset, 0) if tp in committed else end for tp, end in ends.items()
    )


async def _reset_group(bootstrap: str, tail: int | None) -> None:
    """Commits, while the group has no member, where the next run starts: offset 0, or `tail`
    records before the end spread over the partitions."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=spec(WORKFLOW).group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = await _partitions(
            bootstrap, topics.CONTACT_CHANGES, topics.entity_changes("new_purchase")
        )
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        share = (tail or 0) // max(1, len([tp for tp in tps if ends[tp]]))
        await consumer.commit(
            {tp: max(0, ends[tp] - share) if tail is not None else 0 for tp in tps}
        )
    finally:
        await consumer.stop()


#: Below these a drain is mostly the lag probe's 0.1 s polling, not the workflow.
MIN_TIMED_RECORDS = 200
MIN_TIMED_SECONDS = 0.5


class DrainTooShort(Exception):
    """The workflow drained its backlog before enough of it could be timed."""

    def __init__(self, backlog: int, timed: int, seconds: float) -> None:
        super().__init__(
            f"the drain was too short to time: of {backlog} records, {timed} were left when the "
            f"clock started and they drained in {seconds:.2f} s (need ≥ {MIN_TIMED_RECORDS} "
            f"records over ≥ {MIN_TIMED_SECONDS} s); run with more records"
        )


class _Emulator:
    """The emulators' processes, seen from outside: Campaign's requests served and the CPU spent
    (`crmsync emulators` serves each emulator from a child process: their CPU is counted)."""

    def __init__(self, pid: int, url: str) -> None:
        self.process = psutil.Process(pid)
        self.url = url

    async def reading(self) -> tuple[int, float]:
        async with httpx.AsyncClient(timeout=30) as client:
            stats = (await client.get(f"{self.url}/_admin/stats")).json()
        spent = 0.0
        for process in (self.process, *self.process.children(recursive=True)):
            times = process.cpu_times()
            spent += times.user + times.system
        return int(stats["requests"]), spent


async def _workflow(
    bootstrap: str,
    settings: Settings,
    discard: bool,
    tail: int | None = None,
    emulator: _Emulator | None = None,
    profile: str | None = None,
    profile_out: Path | None = None,
) -> dict[str, Any]:
    """Drains the backlog with one in-process worker; with `discard`, its sink counts what is
    written (the clock runs from the first batch written to the last, then the commit of every
    record is checked untimed), else the group's lag is polled. With `profile` (py-spy), the
    CPU per record is also given by stage. With `emulator`, the worker's and the emulator's CPU
    per request (requests counted by the emulator)."""
    await _reset_group(bootstrap, tail)
    stop = asyncio.Event()
    sink = DiscardingSink()
    sinks = {"campaign": sink} if discard else None
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await probe.start()
    tps = await _partitions(bootstrap, topics.CONTACT_CHANGES)
    initial = await _lag(admin, probe, tps)
    worker = asyncio.create_task(run_worker(WORKFLOW, settings, sinks=sinks, stop=stop))

    async def left() -> int:
        """Records not done yet: not written (discard), else not committed."""
        if worker.done():
            worker.result()
        return initial - sink.records if discard else await _lag(admin, probe, tps)

    try:
        start_lag = initial
        while start_lag == initial:  # startup and group join excluded
            await asyncio.sleep(0.01 if discard else 0.05)
            start_lag = await left()
        # The clock starts at the count just read, so the records it counts are the ones timed.
        served = await emulator.reading() if emulator is not None else None
        # The lag probe runs in this process, so its CPU counts as the worker's: against the
        # emulator (a drain of tens of seconds) it looks less often.
        probe_s = 0.01 if discard else (0.1 if emulator is None else 0.5)
        with stages.profiled(profile) as samples:
            cpu, wall = time.process_time(), time.perf_counter()
            while True:
                if await left() <= 0:
                    break
                await asyncio.sleep(probe_s)
            seconds = time.perf_counter() - wall
            cpu = time.process_time() - cpu
        if start_lag < MIN_TIMED_RECORDS or seconds < MIN_TIMED_SECONDS:
            raise DrainTooShort(initial, start_lag, seconds)
        figures: dict[str, Any] = _figures(start_lag, seconds, cpu)
        if emulator is not None and served is not None:
            requests, emulator_cpu = await emulator.reading()
            # API requests only (the emulator counts neither tokens nor its admin endpoints).
            requests, emulator_cpu = requests - served[0], emulator_cpu - served[1]
            if requests > 0:
                figures |= {
                    "requests": requests,
                    "requests_per_record": requests / start_lag,
                    "worker_cpu_us_per_request": cpu / requests * 1e6,
                    "emulator_cpu_us_per_request": emulator_cpu / requests * 1e6,
                }
        if samples:
            if profile_out is not None:
                await asyncio.to_thread(profile_out.write_text, samples[0])
            counts = stages.stage_samples(samples[0])
            figures["stages_us_per_record"] = stages.per_record(
                counts, figures["cpu_us_per_record"]
            )
            figures["profile_samples"] = dict(counts)
        while discard:  # every record written is also committed
            if await _lag(admin, probe, tps) <= 0:
                break
            await asyncio.sleep(0.1)
        return figures
    finally:
        stop.set()
        await worker
        await probe.stop()
        await admin.close()


def _perf_tool(bootstrap: str, n: int) -> dict[str, float]:
    started = time.perf_counter()
    out = run_tool(
        ROOT / ".cache",
        "kafka-consumer-perf-test",
        [
            "--bootstrap-server",
            bootstrap,
            "--topic",
            topics.CONTACT_CHANGES,
            "--messages",
            str(n),
            "--timeout",
            "60000",
            "--group",
            f"perf-{uuid.uuid4().hex[:6]}",
        ],
        timeout=300,
    )
    wall = time.perf_counter() - started
    lines = [line for line in out.splitlines() if line.strip()]
    header, values = lines[-2].split(","), lines[-1].split(",")
    row = {h.strip(): v.strip() for h, v in zip(header, values, strict=False)}
    rate = float(row.get("nMsg.sec", "0"))
    return {"records_per_s": rate, "cpu_us_per_record": float("nan"), "seconds": wall}


def _figures(n: int, wall: float, cpu: float) -> dict[str, float]:
    return {"records_per_s": n / wall, "cpu_us_per_record": cpu / n * 1e6, "seconds": wall}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="crmsync-bench-"))
    kafka = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        kafka = LocalKafka(
            ROOT / ".cache",
            tmp / "kafka",
            base_port=_free_port(),
            controller_base_port=_free_port(),
        )
        await asyncio.to_thread(kafka.start)
        bootstrap = kafka.bootstrap_servers
    emulators = None
    try:
        console.print(f"publishing {args.records} contact changes on {args.partitions} partitions")
        await _publish(bootstrap, args.records, args.partitions)
        results: dict[str, Any] = {}
        console.print("(a) aiokafka + fastavro baseline")
        results["a_baseline"] = await _baseline(bootstrap, args.records)
        settings = Settings(
            kafka_bootstrap_servers=bootstrap, home=tmp, topic_partitions=args.partitions
        )
        console.print("(b) workflow, discarding sink")
        results["b_workflow_discard"] = await _workflow(bootstrap, settings, True)
        console.print("(b') the same without outcome records (CRMSYNC_TRACE_OUTCOMES=false)")
        untraced = settings.model_copy(update={"trace_outcomes": False})
        spy = None if args.no_profile else stages.available()
        if spy is None and not args.no_profile:
            console.print("(b') no stage profile: py-spy is not installed (pip install py-spy)")
        results["b_workflow_discard_untraced"] = await _workflow(
            bootstrap, untraced, True, profile=spy, profile_out=args.profile_out
        )
        dport, cport = _free_port(), _free_port()
        emulators = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "crmsync.control.cli",
            "emulators",
            "--dynamics-port",
            str(dport),
            "--campaign-port",
            str(cport),
            "--data-dir",
            str(tmp / "emulators"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(3)
        n_emulator = min(args.records, args.emulator_records)
        console.print(f"(c) workflow → Campaign emulator ({n_emulator} records)")
        emulator_settings = Settings(
            kafka_bootstrap_servers=bootstrap,
            home=tmp,
            topic_partitions=args.partitions,
            campaign_url=f"http://127.0.0.1:{cport}",
        )
        if n_emulator:
            try:
                results["c_workflow_emulator"] = await _workflow(
                    bootstrap,
                    emulator_settings,
                    False,
                    tail=n_emulator,
                    emulator=_Emulator(emulators.pid, f"http://127.0.0.1:{cport}"),
                )
            except DrainTooShort as error:
                console.print(f"(c) skipped: {error} (--emulator-records)")
        console.print("(d) kafka-consumer-perf-test")
        results["d_kafka_perf_tool"] = await asyncio.to_thread(_perf_tool, bootstrap, args.records)
        return results
    finally:
        if emulators is not None:
            emulators.terminate()
            await emulators.wait()
        if kafka is not None:
            await asyncio.to_thread(kafka.stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument(
        "--emulator-records",
        type=int,
        default=10_000,
        help="records (c) drains into the Campaign emulator: enough for a drain of seconds, so "
        "its figures are the steady state, not the start-up",
    )
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/throughput.json")
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the py-spy profile of (b') that gives its CPU per record by stage",
    )
    parser.add_argument(
        "--profile-out",
        type=Path,
        help="also write (b')'s py-spy samples there (raw: one stack and its count a line)",
    )
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    base = results["a_baseline"]
    print(f"\nd365-to-campaign, {args.records} records on {args.partitions} partitions\n")
    print("| run | records/s | CPU µs/record | CPU vs baseline |")
    print("|---|---:|---:|---:|")
    for name, row in results.items():
        if not row:
            continue
        ratio = row["cpu_us_per_record"] / base["cpu_us_per_record"]
        print(
            f"| {name} | {row['records_per_s']:,.0f} | {row['cpu_us_per_record']:.1f} "
            f"| {ratio:.2f} |"
        )
    emulated = results.get("c_workflow_emulator") or {}
    if "worker_cpu_us_per_request" in emulated:
        print(
            f"\n(c) per target request ({emulated['requests']:,} requests, "
            f"{emulated['requests_per_record']:.2f} per record): worker "
            f"{emulated['worker_cpu_us_per_request']:,.0f} µs CPU, emulator "
            f"{emulated['emulator_cpu_us_per_request']:,.0f} µs CPU"
        )
    for name in ("b_workflow_discard", "b_workflow_discard_untraced"):
        if name in results:
            row = results[name]
            print(
                f"\n{name}: {row['records_per_s'] / base['records_per_s']:.2f} of the "
                f"baseline's records/s, {row['cpu_us_per_record'] / base['cpu_us_per_record']:.2f}"
                "x its CPU per record"
            )
    by_stage = results.get("b_workflow_discard_untraced", {}).get("stages_us_per_record")
    if by_stage:
        print(
            "\nb_workflow_discard_untraced by stage (CPU per record shared out by py-spy samples)\n"
        )
        print("| stage | CPU µs/record |")
        print("|---|---:|")
        for stage, us in by_stage.items():
            print(f"| {stage} | {us:.1f} |")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
