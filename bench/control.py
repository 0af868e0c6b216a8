"""Stop/start latency of a workflow under load, and the control plane's backlog: speed, accuracy.

Run: .venv/bin/python bench/control.py [--rounds N] [--rate R]. It starts its own Kafka on free
ports (unless KAFKA_BOOTSTRAP_SERVERS is set), then `crmsync emulators`, `crmsync control` and one
`crmsync worker d365-to-campaign`, each in a process of its own on 127.0.0.1, and publishes new
contacts at a steady --rate. The Campaign emulator's `/_admin/stats` tells what reaches the
target: its API request count (every request the sink makes belongs to a write: the profile
lookup, POST or PATCH) and its profile count (a new contact's write adds one; a write done again
after a stop abandoned it is a PATCH and adds none). Measured:
  (a) --rounds of Stop and Start over the HTTP API while the stream runs. Stop: from the POST
      until the status is STOPPED *and* the last request has reached Campaign (the time of the
      count's last change, once it has not changed for --quiet-ms). Start: from the POST until
      RUNNING *and* requests reach Campaign again. Requests seen after STOPPED (the contract
      allows no write) are counted. The worker's group must not rebalance: its member ids are
      compared before and after, and with our own broker its rebalances are counted in the
      broker's log.
  (b) GET /api/v1/workflows: latency of --requests sequential calls (three workflows, each
      backlog over every partition of the topics it reads), the stream still running.
  (c) backlog accuracy: with the workflow stopped, records are published up to each of
      --backlog-points (cumulative); once nothing moves, the API's backlog is compared with the
      LAG that Kafka's `kafka-consumer-groups --describe` prints, summed, read at the same time.
The worker's RSS is sampled throughout. Percentiles are nearest-rank (p99 of 20 rounds = max).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psutil
from aiokafka.admin import AIOKafkaAdminClient
from common import (
    GROUP,
    ROOT,
    WORKFLOW,
    BenchError,
    Processes,
    console,
    contact,
    free_port,
    kafka,
    publish,
    until,
)
from rich.progress import Progress

from crmsync.deploy.local.kafka import group_lag
from crmsync.streams import catalog
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import EventProducer


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": _percentile(values, 50),
        "p99": _percentile(values, 99),
        "max": max(values),
        "n": len(values),
    }


# -- processes ----------------------------------------------------------------------------------


# -- the control plane and the target ---------------------------------------------------------


@dataclass
class Api:
    """The control plane's HTTP API, as an operator calls it."""

    http: httpx.AsyncClient

    async def workflows(self) -> dict[str, dict[str, Any]]:
        response = await self.http.get("/api/v1/workflows")
        response.raise_for_status()
        return {flow["name"]: flow for flow in response.json()["workflows"]}

    async def status(self) -> str:
        return str((await self.workflows())[WORKFLOW]["status"])

    async def detail(self) -> dict[str, Any]:
        response = await self.http.get(f"/api/v1/workflows/{WORKFLOW}")
        response.raise_for_status()
        detail: dict[str, Any] = response.json()
        return detail

    async def action(self, action: str) -> None:
        response = await self.http.post(f"/api/v1/workflows/{WORKFLOW}/{action}")
        if response.status_code != 202:
            raise BenchError(f"{action}: {response.status_code} {response.text}")

    async def until_status(self, wanted: str, every: float, within: float = 60) -> float:
        """Polls until the workflow shows `wanted`; returns the perf_counter() it was seen."""
        deadline = time.perf_counter() + within
        while True:
            status = await self.status()
            seen = time.perf_counter()
            if status == wanted:
                return seen
            if status == "FAILED" or seen > deadline:
                raise BenchError(f"{WORKFLOW} is {status}, waited for {wanted}")
            await asyncio.sleep(every)


class Stats(NamedTuple):
    """The Campaign emulator's counters: API requests (lookups, POSTs, PATCHes) and profiles."""

    requests: int
    profiles: int


@dataclass
class Target:
    """The Campaign emulator, read through its `/_admin/stats` (which counts no request)."""

    http: httpx.AsyncClient

    async def stats(self) -> Stats:
        response = await self.http.get("/_admin/stats")
        response.raise_for_status()
        data = response.json()
        return Stats(int(data["requests"]), sum(int(n) for n in data["counts"].values()))


@dataclass
class TargetWatch:
    """Polls the target's counters and remembers when each last changed (perf_counter)."""

    target: Target
    every: float
    stats: Stats
    request_at: float | None = None
    profile_at: float | None = None

    async def run(self) -> None:
        """Follows the counters from `stats` (read by the caller before anything it times)."""
        while True:
            await asyncio.sleep(self.every)
            stats = await self.target.stats()
            now = time.perf_counter()
            if stats.requests != self.stats.requests:
                self.request_at = now
            if stats.profiles != self.stats.profiles:
                self.profile_at = now
            self.stats = stats


# -- Kafka: the stream, the group, the tool ---------------------------------------------------


async def _stream(bootstrap: str, rate: float, stop: asyncio.Event) -> int:
    """Publishes new contacts at `rate` per second until `stop`; returns how many."""
    sent = 0
    async with EventProducer(bootstrap) as producer:
        started = time.perf_counter()
        while not stop.is_set():
            due = int((time.perf_counter() - started) * rate) - sent
            if due > 0:
                pending = [
                    await producer.send_encoded(topics.CONTACT_CHANGES, *contact(), wait=False)
                    for _ in range(due)
                ]
                await asyncio.gather(*pending)
                sent += due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    return sent


async def _members(bootstrap: str) -> tuple[str, list[str]]:
    """The group's state and member ids (a member that left and came back has a new id)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([GROUP])
    finally:
        await admin.close()
    state, members = "", []
    for response in described:
        for entry in response.groups:
            state = str(entry[2])
            members += [str(member[0]) for member in entry[5]]
    return state, sorted(members)


def _broker_rebalances(log: Path | None) -> tuple[int, int] | None:
    """(rebalances begun, latest stable generation) of the group, from our broker's log."""
    if log is None:
        return None
    begun, generation = 0, 0
    stabilized = re.compile(rf"Stabilized group {re.escape(GROUP)} generation (\d+)")
    for path in sorted(log.parent.glob(log.name + "*"), reverse=True):
        for line in path.read_text(errors="replace").splitlines():
            if f"Preparing to rebalance group {GROUP} " in line:
                begun += 1
            elif match := stabilized.search(line):
                generation = int(match.group(1))
    return begun, generation


def _kafka_lag(bootstrap: str) -> dict[tuple[str, int], str]:
    return group_lag(ROOT / ".cache", bootstrap, GROUP)


# -- the measurements ---------------------------------------------------------------------------


async def _stop_round(api: Api, target: Target, every: float, quiet: float) -> dict[str, float]:
    watch = TargetWatch(target, every, await target.stats())
    watching = asyncio.create_task(watch.run())
    try:
        started = time.perf_counter()
        await api.action("stop")
        posted = time.perf_counter() - started
        stopped_at = await api.until_status("STOPPED", every)
        at_stopped = await target.stats()
        deadline = started + 60
        while True:
            now = time.perf_counter()
            if now - max(watch.request_at or started, stopped_at) >= quiet:
                break
            if now > deadline:
                raise BenchError("requests to Campaign kept coming 60 s after Stop")
            await asyncio.sleep(every)
        final = await target.stats()
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    status_s = stopped_at - started
    last_request_s = max(0.0, (watch.request_at or started) - started)
    return {
        "post_s": posted,
        "status_s": status_s,
        "last_write_s": last_request_s,
        "last_new_profile_s": max(0.0, (watch.profile_at or started) - started),
        "stop_s": max(status_s, last_request_s),
        "requests_after_stopped": final.requests - at_stopped.requests,
        "profiles_after_stopped": final.profiles - at_stopped.profiles,
    }


async def _start_round(api: Api, target: Target, every: float) -> dict[str, float]:
    before = await target.stats()
    started = time.perf_counter()
    await api.action("start")
    posted = time.perf_counter() - started
    seen: dict[str, float] = {}

    async def writing() -> None:
        deadline = started + 60
        while len(seen) < 2:
            stats = await target.stats()
            now = time.perf_counter()
            if stats.requests > before.requests:
                seen.setdefault("request", now)
            if stats.profiles > before.profiles:
                seen.setdefault("profile", now)
            if now > deadline:
                raise BenchError("Campaign saw no new profile within 60 s of Start")
            await asyncio.sleep(every)

    running_at, _ = await asyncio.gather(api.until_status("RUNNING", every), writing())
    running_s, first_write_s = running_at - started, seen["request"] - started
    return {
        "post_s": posted,
        "running_s": running_s,
        "first_write_s": first_write_s,
        "first_new_profile_s": seen["profile"] - started,
        "start_s": max(running_s, first_write_s),
    }


async def _rounds(
    args: argparse.Namespace, api: Api, target: Target, bootstrap: str, broker_log: Path | None
) -> dict[str, Any]:
    every, quiet = args.poll_ms / 1000, args.quiet_ms / 1000
    state_before, members_before = await _members(bootstrap)
    logged_before = await asyncio.to_thread(_broker_rebalances, broker_log)
    stops: list[dict[str, float]] = []
    starts: list[dict[str, float]] = []
    for n in range(1, args.rounds + 1):
        stop = await _stop_round(api, target, every, quiet)
        start = await _start_round(api, target, every)
        stops.append(stop)
        starts.append(start)
        console.print(
            f"round {n}/{args.rounds}: stop {stop['stop_s']:.3f}s (STOPPED "
            f"{stop['status_s']:.3f}s, last request {stop['last_write_s']:.3f}s), start "
            f"{start['start_s']:.3f}s (RUNNING {start['running_s']:.3f}s, first request "
            f"{start['first_write_s']:.3f}s, first new profile {start['first_new_profile_s']:.3f}s)"
        )
        await asyncio.sleep(args.settle)
    state_after, members_after = await _members(bootstrap)
    logged_after = await asyncio.to_thread(_broker_rebalances, broker_log)
    if logged_before is not None and logged_after is not None:
        rebalances = logged_after[0] - logged_before[0]
    else:  # an external cluster: only a member that rejoined shows
        rebalances = int(members_before != members_after)
    return {
        "stop_s": _spread([s["stop_s"] for s in stops]),
        "stop_status_s": _spread([s["status_s"] for s in stops]),
        "stop_last_write_s": _spread([s["last_write_s"] for s in stops]),
        "stop_last_new_profile_s": _spread([s["last_new_profile_s"] for s in stops]),
        "stop_post_s": _spread([s["post_s"] for s in stops]),
        "start_s": _spread([s["start_s"] for s in starts]),
        "start_running_s": _spread([s["running_s"] for s in starts]),
        "start_first_write_s": _spread([s["first_write_s"] for s in starts]),
        "start_first_new_profile_s": _spread([s["first_new_profile_s"] for s in starts]),
        "start_post_s": _spread([s["post_s"] for s in starts]),
        "writes_after_stopped": int(sum(s["requests_after_stopped"] for s in stops)),
        "profiles_after_stopped": int(sum(s["profiles_after_stopped"] for s in stops)),
        "rebalances": rebalances,
        "group": {
            "state_before": state_before,
            "state_after": state_after,
            "members_before": members_before,
            "members_after": members_after,
            "member_ids_unchanged": members_before == members_after,
            "broker_generation_before": logged_before[1] if logged_before else None,
            "broker_generation_after": logged_after[1] if logged_after else None,
        },
        "rounds": [{"stop": s, "start": t} for s, t in zip(stops, starts, strict=True)],
    }


async def _api_latency(api: Api, requests: int) -> dict[str, float]:
    latencies = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("GET /api/v1/workflows", total=requests)
        for _ in range(requests):
            started = time.perf_counter()
            response = await api.http.get("/api/v1/workflows")
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            progress.advance(task)
    return {f"{k}_ms" if k != "n" else k: v for k, v in _spread(latencies).items()}


async def _backlog_point(api: Api, bootstrap: str, published: int) -> dict[str, Any]:
    """Once the backlog holds still, the API's figure next to Kafka's tool's, read together."""
    previous = None
    for _ in range(60):
        backlog = (await api.detail())["backlog"]  # a fresh read of Kafka
        if backlog == previous:
            break
        previous = backlog
        await asyncio.sleep(1)
    else:
        raise BenchError("the backlog kept moving while the workflow was stopped")
    listed = (await api.workflows())[WORKFLOW]["backlog"]
    lags, detail = await asyncio.gather(asyncio.to_thread(_kafka_lag, bootstrap), api.detail())
    listed_after = (await api.workflows())[WORKFLOW]["backlog"]
    kafka_lag = sum(int(lag) for lag in lags.values() if lag != "-")
    differing = []
    for p in detail["partitions"]:
        tool = lags.get((p["topic"], p["partition"]), "-")
        # "-": the group never committed there; the API then counts from the log start
        if (tool == "-" and p["lag"] != 0) or (tool != "-" and int(tool) != p["lag"]):
            differing.append(f"{p['topic']}[{p['partition']}]: API {p['lag']}, Kafka {tool}")
    return {
        "published": published,
        "api_backlog": listed,
        "api_backlog_after": listed_after,
        "api_detail_backlog": detail["backlog"],
        "kafka_lag": kafka_lag,
        "kafka_partitions_without_lag": sorted(
            f"{t}[{p}]" for (t, p), lag in lags.items() if lag == "-"
        ),
        "partitions_differing": differing,
        "equal": listed == listed_after == detail["backlog"] == kafka_lag,
    }


async def _rss_peak(pid: int, peak: list[int], every: float = 0.5) -> None:
    process = psutil.Process(pid)
    while True:
        with contextlib.suppress(psutil.Error):
            peak[0] = max(peak[0], int(process.memory_info().rss))
        await asyncio.sleep(every)


async def _under_load(
    args: argparse.Namespace, api: Api, target: Target, bootstrap: str, broker_log: Path | None
) -> tuple[dict[str, Any], dict[str, float], int]:
    """The stop/start rounds and the GET latency, while contacts stream in."""
    stop_stream = asyncio.Event()
    stream = asyncio.create_task(_stream(bootstrap, args.rate, stop_stream))
    try:
        console.print(f"stream of {args.rate:g} contacts/s; waiting for the first writes")
        first = await target.stats()

        async def written() -> bool:
            if stream.done():
                stream.result()
            return (await target.stats()).profiles > first.profiles

        await until(written, 120, "the first Campaign profile")
        before, started = await target.stats(), time.perf_counter()
        await asyncio.sleep(args.warmup)
        after, elapsed = await target.stats(), time.perf_counter() - started
        write_rate = (after.profiles - before.profiles) / elapsed
        request_rate = (after.requests - before.requests) / elapsed
        console.print(
            f"Campaign: {write_rate:.0f} new profiles/s, {request_rate:.0f} requests/s; "
            f"{args.rounds} stop/start rounds"
        )
        control = await _rounds(args, api, target, bootstrap, broker_log)
        control["campaign_writes_per_s"] = write_rate
        control["campaign_requests_per_s"] = request_rate
        console.print(f"{args.requests} x GET /api/v1/workflows")
        latency = await _api_latency(api, args.requests)
    finally:
        stop_stream.set()
        streamed = await stream
    return control, latency, streamed


async def _measure(
    args: argparse.Namespace, bootstrap: str, broker_log: Path | None, processes: Processes
) -> dict[str, Any]:
    tmp = processes.logs
    await topics.ensure_topics(bootstrap, catalog.topic_specs(args.partitions))
    dport, cport, hport = free_port(), free_port(), free_port()
    token = secrets.token_urlsafe(24)
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CRMSYNC_HOME": str(tmp),
        "CRMSYNC_TOPIC_PARTITIONS": str(args.partitions),
        "CRMSYNC_DYNAMICS_URL": f"http://127.0.0.1:{dport}",
        "CRMSYNC_CAMPAIGN_URL": f"http://127.0.0.1:{cport}",
        "CRMSYNC_HTTP_HOST": "127.0.0.1",
        "CRMSYNC_HTTP_PORT": str(hport),
        "CRMSYNC_ADMIN_TOKEN": token,
    }
    async with (
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{hport}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ) as control_http,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{cport}", timeout=60) as campaign_http,
    ):
        api, target = Api(control_http), Target(campaign_http)

        async def answers(client: httpx.AsyncClient, path: str) -> bool:
            processes.check()
            with contextlib.suppress(httpx.HTTPError):
                return (await client.get(path)).status_code == 200
            return False

        console.print("starting the emulators and the control plane")
        processes.crmsync(
            "emulators",
            [
                "emulators",
                "--dynamics-port",
                str(dport),
                "--campaign-port",
                str(cport),
                "--data-dir",
                str(tmp / "emulators"),
            ],
            env,
        )
        processes.crmsync("control", ["control"], env)
        await until(lambda: answers(campaign_http, "/_admin/stats"), 60, "the emulators")
        await until(lambda: answers(control_http, "/readyz"), 90, "the control plane")
        console.print(f"starting a {WORKFLOW} worker")
        worker = processes.crmsync("worker", ["worker", WORKFLOW], env)

        async def settled() -> bool:
            processes.check()
            return await api.status() in ("RUNNING", "STOPPED")

        await until(settled, 120, f"{WORKFLOW} RUNNING or STOPPED")
        if await api.status() == "STOPPED":  # as an earlier run on this cluster left it
            await api.action("start")
            await api.until_status("RUNNING", 0.2, 120)

        rss_peak = [0]
        sampling = asyncio.create_task(_rss_peak(worker.pid, rss_peak))
        try:
            control, latency, streamed = await _under_load(args, api, target, bootstrap, broker_log)
            console.print(f"stream ended after {streamed} contacts; stopping {WORKFLOW}")
            await api.action("stop")
            await api.until_status("STOPPED", 0.2)
            accuracy = []
            published = 0
            for point in args.backlog_points:
                if point > published:
                    await publish(bootstrap, point - published)
                    published = point
                row = await _backlog_point(api, bootstrap, published)
                console.print(
                    f"published {published}: API backlog {row['api_backlog']}, "
                    f"Kafka LAG {row['kafka_lag']}, equal={str(row['equal']).lower()}"
                )
                accuracy.append(row)
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
    return {
        "config": {
            "rounds": args.rounds,
            "rate_per_s": args.rate,
            "partitions": args.partitions,
            "requests": args.requests,
            "poll_ms": args.poll_ms,
            "quiet_ms": args.quiet_ms,
            "streamed": streamed,
        },
        "control": control,
        "api_latency": latency,
        "backlog": accuracy,
        "worker_rss_peak_bytes": rss_peak[0],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    current = asyncio.current_task()
    assert current is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
    tmp = Path(tempfile.mkdtemp(prefix="crmsync-bench-control-"))
    processes = Processes(tmp)
    try:
        async with kafka(tmp) as (bootstrap, broker_log):
            try:
                result = await _measure(args, bootstrap, broker_log, processes)
            finally:
                await asyncio.to_thread(processes.stop_all)
    except BaseException:
        processes.tails()
        console.print(f"logs kept in {tmp}")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _report(result: dict[str, Any]) -> None:
    control, latency = result["control"], result["api_latency"]
    cfg = result["config"]
    print(
        f"\n{WORKFLOW}: {cfg['rounds']} stop/start rounds under {cfg['rate_per_s']:g} "
        f"contacts/s (Campaign: {control['campaign_writes_per_s']:.0f} new profiles/s, "
        f"{control['campaign_requests_per_s']:.0f} requests/s)\n"
    )
    print("| figure | p50 | p99 | max |")
    print("|---|---:|---:|---:|")
    for key, label in (
        ("stop_s", "Stop → STOPPED and last request to Campaign (s)"),
        ("stop_status_s", "Stop → STOPPED shown (s)"),
        ("stop_last_write_s", "Stop → last request reached Campaign (s)"),
        ("stop_last_new_profile_s", "Stop → last new profile in Campaign (s)"),
        ("start_s", "Start → RUNNING and requests to Campaign again (s)"),
        ("start_running_s", "Start → RUNNING shown (s)"),
        ("start_first_write_s", "Start → first request to Campaign (s)"),
        ("start_first_new_profile_s", "Start → first new profile in Campaign (s)"),
    ):
        row = control[key]
        print(f"| {label} | {row['p50']:.3f} | {row['p99']:.3f} | {row['max']:.3f} |")
    print(
        f"| GET /api/v1/workflows, {latency['n']} calls (ms) | {latency['p50_ms']:.1f} "
        f"| {latency['p99_ms']:.1f} | {latency['max_ms']:.1f} |"
    )
    group = control["group"]
    print(
        f"\nrebalances={control['rebalances']} (member ids unchanged: "
        f"{str(group['member_ids_unchanged']).lower()}, broker generation "
        f"{group['broker_generation_before']} → {group['broker_generation_after']}); "
        f"requests (writes) after STOPPED: {control['writes_after_stopped']}, new profiles "
        f"after STOPPED: {control['profiles_after_stopped']}; worker RSS peak "
        f"{result['worker_rss_peak_bytes'] / 1e6:.0f} MB\n"
    )
    print("| published | API backlog | Kafka LAG (kafka-consumer-groups) | equal |")
    print("|---:|---:|---:|---|")
    for row in result["backlog"]:
        print(
            f"| {row['published']:,} | {row['api_backlog']:,} | {row['kafka_lag']:,} "
            f"| {str(row['equal']).lower()} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200, help="contacts published per second")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--requests", type=int, default=1000, help="GET /api/v1/workflows calls")
    parser.add_argument(
        "--backlog-points",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1000, 5000, 20000],
        help="cumulative records published while stopped, comma-separated",
    )
    parser.add_argument("--poll-ms", type=float, default=20, help="status and write-count polls")
    parser.add_argument("--quiet-ms", type=float, default=300, help="no write for this long = done")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of writes before round 1")
    parser.add_argument("--settle", type=float, default=2, help="seconds running between rounds")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/control.json")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    _report(result)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
