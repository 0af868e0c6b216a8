"""Sink throughput against the local emulators: contact upserts by UpsertMultiple, by `$batch`
size and one by one, and Campaign.

Run: .venv/bin/python bench/sinks.py [--records N] [--json bench/results/sinks.json]
All figures come from one run on one machine, side by side, so their ratios are what matters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from crmsync.deploy.emulators.server import running_emulators
from crmsync.streams.sinks.base import BatchingSink, DiscardingSink, SinkRecord
from crmsync.streams.sinks.campaign import CampaignSink
from crmsync.streams.sinks.dynamics import DynamicsSink
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.settings import CampaignTarget, DynamicsTarget

UNLIMITED = 10**9  # the service-protection windows would otherwise throttle the bench itself


def contacts(count: int, run: str) -> list[SinkRecord]:
    return [
        SinkRecord(
            "contacts",
            str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run}/{n}")),
            fields={"firstname": f"F{n}", "lastname": run, "emailaddress1": f"c{n}@example.org"},
        )
        for n in range(count)
    ]


def profiles(count: int, run: str) -> list[SinkRecord]:
    return [
        SinkRecord(
            "profileAndServicesExt/profile",
            str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run}/{n}")),
            fields={"email": f"p{n}@example.org", "firstName": f"F{n}"},
        )
        for n in range(count)
    ]


async def rate(sink: BatchingSink, records: Sequence[SinkRecord], batch_size: int) -> float:
    """Records per second writing ``records`` in batches of ``batch_size``, one after another."""
    started = time.perf_counter()
    for start in range(0, len(records), batch_size):
        outcomes = await sink.write_batch(records[start : start + batch_size])
        failed = [o for o in outcomes if o is not None]
        if failed:
            raise SystemExit(f"bench write failed: {failed[0]!r}")
    return len(records) / (time.perf_counter() - started)


async def single_requests(client: DynamicsClient, records: Sequence[SinkRecord]) -> float:
    """Records per second with one PATCH per record, as many in flight as the client allows."""
    started = time.perf_counter()
    await asyncio.gather(*(client.upsert(r.target, r.key, r.fields) for r in records))
    return len(records) / (time.perf_counter() - started)


async def main(records: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as data:
        async with running_emulators(
            Path(data),
            dynamics_port=0,
            campaign_port=0,
            dynamics_requests_per_window=UNLIMITED,
            dynamics_execution_ms_per_window=UNLIMITED,
            dynamics_dop_hint=52,
            campaign_requests_per_window=UNLIMITED,
        ) as emu:
            dynamics = DynamicsTarget(
                url=emu.dynamics_url,
                tenant=emu.tenant,
                client_id=emu.client_id,
                client_secret=SecretStr(emu.client_secret),
            )
            campaign = CampaignTarget(
                url=emu.campaign_url,
                org=emu.org,
                client_id=emu.client_id,
                client_secret=SecretStr(emu.client_secret),
            )
            discard = DiscardingSink()
            rows.append(
                {
                    "case": "DiscardingSink (no I/O)",
                    "batch": 1000,
                    "rate": await rate(discard, contacts(records, "d"), 1000),
                }
            )
            bulk = DynamicsSink(DynamicsClient(dynamics))  # UpsertMultiple, $batch fallback
            sink = DynamicsSink(DynamicsClient(dynamics), bulk=False)  # $batch only
            await rate(bulk, contacts(50, "warm-bulk"), 50)  # token, connections, metadata
            await rate(sink, contacts(50, "warm"), 50)
            for size in (100, 1000):
                rows.append(
                    {
                        "case": "Dynamics UpsertMultiple",
                        "batch": size,
                        "rate": await rate(bulk, contacts(records, f"u{size}"), size),
                        "records": records,
                    }
                )
            for size in (1, 100, 1000):
                count = min(records, 500) if size == 1 else records
                rows.append(
                    {
                        "case": "Dynamics $batch upsert",
                        "batch": size,
                        "rate": await rate(sink, contacts(count, f"b{size}"), size),
                        "records": count,
                    }
                )
            rows.append(
                {
                    "case": "Dynamics single PATCH (concurrent)",
                    "batch": "-",
                    "rate": await single_requests(sink.client, contacts(records, "s")),
                    "records": records,
                    "concurrency": sink.client.concurrency,
                }
            )
            await bulk.aclose()
            await sink.aclose()
            csink = CampaignSink(CampaignClient(campaign))
            await rate(csink, profiles(20, "warm"), 20)
            rows.append(
                {
                    "case": "Campaign profile upsert (create: lookup + POST)",
                    "batch": 500,
                    "rate": await rate(csink, profiles(records, "p"), 500),
                    "records": records,
                }
            )
            rows.append(
                {
                    "case": "Campaign profile upsert (update: cached PKey, PATCH)",
                    "batch": 500,
                    "rate": await rate(csink, profiles(records, "p"), 500),
                    "records": records,
                }
            )
            await csink.aclose()

    return rows


def report(rows: list[dict[str, Any]], json_path: Path | None) -> None:
    print("| case | batch size | records/s |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['case']} | {row['batch']} | {row['rate']:,.0f} |")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        data = {"python": platform.python_version(), "machine": platform.machine(), "rows": rows}
        json_path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results/sinks.json")
    args = parser.parse_args()
    report(asyncio.run(main(args.records)), args.json)
