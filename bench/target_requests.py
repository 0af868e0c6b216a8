"""(g) Requests per record the targets see: opt-in-out on a realistic mix, and profile creates.

Run: .venv/bin/python bench/target_requests.py [--contacts N] [--changes N] [--load N]
[--json-out FILE].
Counted by the emulators (`/_admin/stats` requests), against workers running in this process on a
broker of their own, with the periodic drift check off (its metadata reads are not per record):

- opt-in-out: contacts exist on both sides, a tenth opted out; one change per contact is read
  first (the kept state learns each flag), then `--changes` contact changes of which 1 % flip the
  opt-out flag and the rest edit other fields (whole rows, as the Dynamics source publishes
  them). Requests per record of that mix, to both targets (target ≤ 0.02).
- profile load: d365-to-campaign creates `--load` new profiles twice, side by side: once with the
  PKey cache never warmed (a lookup before every create: the previous behaviour), once as it
  runs by default (the cache warmed by paging the profiles, 1,000 a page). Requests per created
  profile of each (target ≈ 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from common import (
    ROOT,
    BenchError,
    Processes,
    console,
    emulator_requests,
    free_port,
    kafka,
    until,
    workflow_lag,
)

from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams import catalog
from crmsync.streams.app import run_worker
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import EventProducer, Scalar, change_event
from crmsync.streams.settings import Settings
from crmsync.streams.sinks.base import BatchingSink, SinkRecord
from crmsync.streams.sinks.campaign import CampaignSink
from crmsync.targets.campaign import PROFILE, CampaignClient
from crmsync.targets.dynamics import DynamicsClient

PARTITIONS = 6
NEVER = 10**12  # warm_min_misses that is never reached: the cache is never warmed


async def _lag(bootstrap: str, workflow: str, topic_names: list[str]) -> int:
    return await workflow_lag(bootstrap, workflow, topic_names, PARTITIONS)


class _Worker:
    """One workflow's worker in this process, until `stop`."""

    def __init__(
        self, workflow: str, settings: Settings, sinks: Mapping[str, BatchingSink] | None = None
    ) -> None:
        self.workflow, self.settings = workflow, settings
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(run_worker(workflow, settings, sinks, stop=self._stop))

    async def drained(self, topic_names: list[str], within: float = 600) -> None:
        bootstrap = str(self.settings.kafka_bootstrap_servers)

        async def done() -> bool:
            if self._task.done():
                self._task.result()
            return await _lag(bootstrap, self.workflow, topic_names) == 0

        await until(done, within, f"{self.workflow} to drain", every=0.25)

    async def stop(self) -> None:
        self._stop.set()
        await self._task


async def _send(bootstrap: str, topic: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    async with EventProducer(bootstrap) as producer:
        pending = [
            await producer.send_encoded(
                topic, key, CHANGE_EVENT.encode(event, validate=False), wait=False
            )
            for key, event in events
        ]
        await asyncio.gather(*pending)


def _row(key: str, n: int, opted_out: bool) -> dict[str, Scalar]:
    return {
        "contactid": key,
        "firstname": f"F{key[:6]}",
        "lastname": f"L{n}",
        "emailaddress1": f"{key}@example.org",
        "donotbulkemail": opted_out,
    }


async def _opt_in_out(bootstrap: str, settings: Settings, args: argparse.Namespace) -> Any:
    rng = random.Random(7)
    keys = [str(uuid.uuid4()) for _ in range(args.contacts)]
    flags = {k: rng.random() < 0.1 for k in keys}
    async with DynamicsClient(settings.dynamics) as dynamics:
        items = [(k, {"lastname": "L0", "donotbulkemail": flags[k]}) for k in keys]
        for at in range(0, len(items), 500):
            await dynamics.upsert_multiple("contacts", items[at : at + 500])
    sink = CampaignSink(CampaignClient(settings.campaign))
    profiles = [
        SinkRecord(PROFILE, k, fields={"email": f"{k}@example.org", "blackListEmail": flags[k]})
        for k in keys
    ]
    for at in range(0, len(profiles), 500):
        if any(await sink.write_batch(profiles[at : at + 500])):
            raise BenchError("could not create the profiles")
    await sink.aclose()

    ts = int(time.time() * 1000) - 3_600_000
    first = [
        (
            k,
            change_event(
                "u", "contact", k, after=_row(k, 0, flags[k]), system="d365", source_ts_ms=ts
            ),
        )
        for k in keys
    ]
    worker = _Worker("opt-in-out", settings)
    names = [topics.CONTACT_CHANGES, topics.PROFILE_CHANGES]
    try:
        await _send(bootstrap, topics.CONTACT_CHANGES, first)
        await worker.drained(names)
        urls = [settings.dynamics_url, settings.campaign_url]
        before = [await emulator_requests(u) for u in urls]
        changes, flips = [], 0
        for n in range(args.changes):
            key = rng.choice(keys)
            if rng.random() < 0.01:
                flags[key] = not flags[key]
                flips += 1
            after = _row(key, n + 1, flags[key])
            event = change_event(
                "u", "contact", key, after=after, system="d365", source_ts_ms=ts + 1000 + n
            )
            changes.append((key, event))
        started = time.perf_counter()
        await _send(bootstrap, topics.CONTACT_CHANGES, changes)
        await worker.drained(names)
        seconds = time.perf_counter() - started
        after_counts = [await emulator_requests(u) for u in urls]
    finally:
        await worker.stop()
    d365, campaign = (a - b for a, b in zip(after_counts, before, strict=True))
    async with CampaignClient(settings.campaign) as reader:
        held = {r["externalId"]: bool(r["blackListEmail"]) async for r in reader.list(PROFILE)}
    wrong = sum(1 for k in keys if held.get(k) != flags[k])
    return {
        "records": args.changes,
        "opt_out_changes": flips,
        "requests_d365": d365,
        "requests_campaign": campaign,
        "requests_per_record": (d365 + campaign) / args.changes,
        "seconds": seconds,
        "campaign_flags_wrong": wrong,
    }


async def _load(
    bootstrap: str, settings: Settings, count: int, sink: BatchingSink | None
) -> dict[str, float]:
    keys = [str(uuid.uuid4()) for _ in range(count)]
    events = [
        (k, change_event("u", "contact", k, after=_row(k, 0, False), system="d365")) for k in keys
    ]
    before = await emulator_requests(settings.campaign_url)
    await _send(bootstrap, topics.CONTACT_CHANGES, events)
    worker = _Worker("d365-to-campaign", settings, {"campaign": sink} if sink else None)
    try:
        await worker.drained([topics.CONTACT_CHANGES])
    finally:
        await worker.stop()
    sent = await emulator_requests(settings.campaign_url) - before
    return {"profiles": count, "requests": sent, "requests_per_profile": sent / count}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="crmsync-bench-requests-"))
    processes = Processes(tmp)
    async with kafka(tmp) as (bootstrap, _):
        await topics.ensure_topics(bootstrap, catalog.topic_specs(PARTITIONS))
        dport, cport = free_port(), free_port()
        processes.crmsync(
            "emulators",
            [
                "emulators",
                *("--dynamics-port", str(dport), "--campaign-port", str(cport)),
                *("--data-dir", str(tmp / "emulators")),
            ],
        )
        settings = Settings(
            kafka_bootstrap_servers=bootstrap,
            home=tmp,
            topic_partitions=PARTITIONS,
            campaign_url=f"http://127.0.0.1:{cport}",
            dynamics_url=f"http://127.0.0.1:{dport}",
            drift_check_s=0,
        )
        try:

            async def up() -> bool:
                processes.check()
                try:
                    await emulator_requests(settings.campaign_url)
                    await emulator_requests(settings.dynamics_url)
                except httpx.HTTPError:
                    return False
                return True

            await until(up, 60, "the emulators")
            results: dict[str, Any] = {"machine": platform.machine()}
            console.print(f"(g) profile load of {args.load:,}: lookups first, then warmed")
            cold = CampaignSink(CampaignClient(settings.campaign, warm_min_misses=NEVER))
            results["load_lookup_each"] = await _load(bootstrap, settings, args.load, cold)
            results["load_warmed"] = await _load(bootstrap, settings, args.load, None)
            console.print(f"(g) opt-in-out: {args.changes:,} changes, 1 % opt-out flips")
            results["opt_in_out"] = await _opt_in_out(bootstrap, settings, args)
            return results
        except BaseException:
            processes.tails()
            raise
        finally:
            processes.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=10000)
    parser.add_argument("--load", type=int, default=5000)
    parser.add_argument(
        "--json-out", type=Path, default=ROOT / "bench/results/target_requests.json"
    )
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    opt = results["opt_in_out"]
    console.print(
        f"opt-in-out: {opt['requests_per_record']:.4f} requests/record over {opt['records']:,} "
        f"changes ({opt['opt_out_changes']} opt-out flips; d365 {opt['requests_d365']}, "
        f"campaign {opt['requests_campaign']})"
    )
    for name in ("load_lookup_each", "load_warmed"):
        load = results[name]
        console.print(
            f"{name}: {load['requests_per_profile']:.3f} requests per created profile "
            f"({load['requests']:,} for {load['profiles']:,})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
