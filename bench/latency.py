"""(e) End to end against targets with a realistic latency: how close a worker gets to the limit.

Run: .venv/bin/python bench/latency.py [--records N] [--latency-ms 50] [--json-out FILE]
Both emulators answer every request after `--latency-ms` (their `latency_ms` fault, held while the
request occupies its concurrency slot). A target that answers in L seconds and lets a client have
C requests in flight (`CRMSYNC_CAMPAIGN_MAX_CONCURRENCY`, `CRMSYNC_DYNAMICS_MAX_CONCURRENCY`)
serves at most C ÷ L requests/s: that is the limit, and each workflow's figure is the requests/s it
kept up while draining a backlog, as a share of it (goal ≥ 0.8). Requests are counted by the
emulator (`/_admin/stats`), and per-key order is checked on what the targets hold at the end:
d365-to-campaign gets two versions of every contact, and each profile must hold the second.
campaign-to-d365 drains twice, side by side: each batch in one request (UpsertMultiple), the
baseline, then each batch split over the client's concurrency (the sink's default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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

from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT
from crmsync.streams import catalog, preflight
from crmsync.streams.app import run_worker
from crmsync.streams.catalog import NAMES, default_config
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import EventProducer, Scalar, change_event
from crmsync.streams.settings import Settings
from crmsync.streams.sinks.base import BatchingSink
from crmsync.streams.sinks.dynamics import MIN_CHUNK_RECORDS, DynamicsSink
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.settings import CampaignTarget, DynamicsTarget

PROFILE = "profileAndServicesExt/profile"
PARTITIONS = 6


async def _lag(bootstrap: str, workflow: str, topic: str) -> int:
    return await workflow_lag(bootstrap, workflow, [topic], PARTITIONS)


async def _latency(urls: list[str], latency_ms: int) -> None:
    async with httpx.AsyncClient() as http:
        for url in urls:
            answer = await http.post(f"{url}/_admin/faults", json={"latency_ms": latency_ms})
            answer.raise_for_status()


async def _drain(
    workflow: str,
    settings: Settings,
    topic: str,
    target_url: str,
    total: int,
    sinks: Mapping[str, BatchingSink] | None = None,
) -> dict[str, float]:
    """Runs one worker until `topic` is drained; times the drain from its first commit.
    `total` is the lag before the worker starts (what was published for it)."""
    stop = asyncio.Event()
    bootstrap = str(settings.kafka_bootstrap_servers)
    total = await _lag(bootstrap, workflow, topic)
    worker = asyncio.create_task(run_worker(workflow, settings, sinks, stop=stop))
    try:
        start_lag = total
        while start_lag == total:  # start-up, the group join and the first batch excluded
            if worker.done():
                worker.result()
            await asyncio.sleep(0.05)
            start_lag = await _lag(bootstrap, workflow, topic)
        requests_before = await emulator_requests(target_url)
        wall = time.perf_counter()
        while await _lag(bootstrap, workflow, topic) > 0:
            if worker.done():
                worker.result()
            await asyncio.sleep(0.1)
        seconds = time.perf_counter() - wall
        sent = await emulator_requests(target_url) - requests_before
    finally:
        stop.set()
        await worker
    if seconds < 1 or start_lag < 100:
        raise BenchError(f"{workflow}: the drain was too short to time; run with more records")
    return {"records": start_lag, "seconds": seconds, "requests": sent}


def _judged(figures: dict[str, float], concurrency: int, latency_ms: int) -> dict[str, float]:
    limit = concurrency / (latency_ms / 1000)
    per_s = figures["requests"] / figures["seconds"]
    return {
        **figures,
        "records_per_s": figures["records"] / figures["seconds"],
        "requests_per_s": per_s,
        "requests_per_record": figures["requests"] / figures["records"],
        "concurrency": concurrency,
        "latency_ms": latency_ms,
        "limit_requests_per_s": limit,
        "ratio_of_limit": per_s / limit,
    }


async def _d365_to_campaign(bootstrap: str, settings: Settings, args: argparse.Namespace) -> Any:
    keys = [str(uuid.uuid4()) for _ in range(args.records // 2)]
    async with EventProducer(bootstrap) as producer:
        pending = []
        for version in ("one", "two"):
            for key in keys:
                after: dict[str, Scalar] = {
                    "contactid": key,
                    "firstname": f"F{version}{key[:6]}",
                    "lastname": f"Last{key[6:12]}",
                    "emailaddress1": f"{key}@example.org",
                    "donotbulkemail": False,
                }
                event = change_event("u", "contact", key, after=after, system="d365")
                value = CHANGE_EVENT.encode(event, validate=False)
                pending.append(
                    await producer.send_encoded(topics.CONTACT_CHANGES, key, value, wait=False)
                )
        await asyncio.gather(*pending)
    figures = await _drain(
        "d365-to-campaign", settings, topics.CONTACT_CHANGES, settings.campaign_url, len(keys) * 2
    )
    await _latency([settings.campaign_url], 0)
    async with CampaignClient(_campaign(settings)) as client:
        names = {row["externalId"]: row["firstName"] async for row in client.list(PROFILE)}
    out_of_order = sum(1 for key in keys if names.get(key) != f"Ftwo{key[:6]}")
    concurrency = _campaign(settings).max_concurrency
    return {**_judged(figures, concurrency, args.latency_ms), "out_of_order": out_of_order}


async def _campaign_to_d365(
    bootstrap: str,
    settings: Settings,
    args: argparse.Namespace,
    contacts: list[str],
    *,
    chunked: bool,
) -> Any:
    """One drain of `--email-records` email events; each batch in one request (the previous
    sink) or, `chunked`, split over the client's concurrency (chunks side by side)."""
    await _latency([settings.dynamics_url], args.latency_ms)
    events = []
    async with EventProducer(bootstrap) as producer:
        pending = []
        for n in range(args.email_records):
            contact = contacts[n % len(contacts)]
            event = {
                "event_id": f"evt-{uuid.uuid4()}",
                "type": "open",
                "ts_ms": 1_714_564_800_000 + n,
                "contact_id": contact,
                "email": f"{contact[:8]}@example.org",
                "campaign_id": "CMP0001",
                "campaign_name": "Spring sale",
                "delivery_id": "DLV0001",
                "delivery_name": "Spring newsletter",
                "mirror_page_url": None,
                "url": None,
                "bounce_type": None,
                "bounce_reason": None,
            }
            events.append(event["event_id"])
            value = EMAIL_EVENT.encode(event, validate=False)
            pending.append(
                await producer.send_encoded(topics.EMAIL_EVENTS, contact, value, wait=False)
            )
        await asyncio.gather(*pending)
    least = MIN_CHUNK_RECORDS if chunked else 10**9
    sink = DynamicsSink.for_target(_dynamics(settings), min_chunk_records=least)
    figures = await _drain(
        "campaign-to-d365",
        settings,
        topics.EMAIL_EVENTS,
        settings.dynamics_url,
        len(events),
        sinks={"d365": sink},
    )
    await _latency([settings.dynamics_url], 0)
    async with DynamicsClient(_dynamics(settings)) as client:
        written = [row["crmsync_eventid"] async for row in client.query("crmsync_emailopens")]
    missing = len(set(events) - set(written))
    # The client follows the server's x-ms-dop-hint (the emulator says 8, as Dataverse may):
    # the concurrency it really had is the limit's, not the configured maximum.
    concurrency = sink.client.concurrency
    return {
        **_judged(figures, concurrency, args.latency_ms),
        "configured_concurrency": _dynamics(settings).max_concurrency,
        "missing": missing,
        "duplicated": len(written) - len(set(written)),
    }


async def _contacts(settings: Settings, count: int) -> list[str]:
    contacts = [str(uuid.uuid4()) for _ in range(count)]
    async with DynamicsClient(_dynamics(settings)) as client:
        items = [(c, {"lastname": f"Last{c[:6]}"}) for c in contacts]
        for at in range(0, len(items), 500):
            await client.upsert_multiple("contacts", items[at : at + 500])
    return contacts


def _campaign(settings: Settings) -> CampaignTarget:
    return settings.campaign


def _dynamics(settings: Settings) -> DynamicsTarget:
    return settings.dynamics


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="crmsync-bench-latency-"))
    processes = Processes(tmp)
    async with kafka(tmp) as (bootstrap, _):
        await topics.ensure_topics(
            bootstrap, catalog.topic_specs(PARTITIONS, custom_entities=["new_purchase"])
        )
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
            async with DynamicsClient(_dynamics(settings)) as client:
                await preflight.setup_dynamics({n: default_config(n) for n in NAMES}, client)
            results: dict[str, Any] = {"machine": platform.machine(), "cores": _cores()}
            console.print(f"(e) d365-to-campaign → Campaign at {args.latency_ms} ms")
            await _latency([settings.campaign_url], args.latency_ms)
            results["d365_to_campaign"] = await _d365_to_campaign(bootstrap, settings, args)
            contacts = await _contacts(settings, max(1, args.email_records // 20))
            console.print(
                f"(e) campaign-to-d365 → Dynamics at {args.latency_ms} ms, one request per batch"
            )
            results["campaign_to_d365_one_request"] = await _campaign_to_d365(
                bootstrap, settings, args, contacts, chunked=False
            )
            console.print(f"(e) campaign-to-d365 → Dynamics at {args.latency_ms} ms, chunked")
            results["campaign_to_d365"] = await _campaign_to_d365(
                bootstrap, settings, args, contacts, chunked=True
            )
            return results
        except BaseException:
            processes.tails()
            raise
        finally:
            processes.stop_all()


def _cores() -> int:
    return os.cpu_count() or 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument(
        "--email-records",
        type=int,
        default=100_000,
        help="email events per campaign-to-d365 drain (two drains: one request per batch, then "
        "the batch split over the concurrency)",
    )
    parser.add_argument("--latency-ms", type=int, default=50)
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/latency.json")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    for name in ("d365_to_campaign", "campaign_to_d365_one_request", "campaign_to_d365"):
        figures = results[name]
        console.print(
            f"{name}: {figures['records_per_s']:,.0f} records/s, "
            f"{figures['requests_per_s']:,.0f} requests/s = {figures['ratio_of_limit']:.0%} of "
            f"{figures['limit_requests_per_s']:,.0f} (C {figures['concurrency']} ÷ "
            f"{figures['latency_ms']} ms), {figures['requests_per_record']:.2f} requests/record"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
