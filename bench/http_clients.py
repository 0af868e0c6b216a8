"""Client CPU per HTTP request against the Campaign emulator: httpx vs aiohttp, same run.

Run: .venv/bin/python bench/http_clients.py [--requests N] [--concurrency C] [--rounds R].
The emulator runs in a process of its own; this process sends GETs of one profile from C tasks
at once and counts its own CPU (user + sys) per request, the figure that caps a worker's request
rate on a core whatever the target's speed. Variants, interleaved round by round so machine noise
falls on all of them alike (the median round is reported):
  - httpx, bare: an `httpx.AsyncClient()` with its default pool (100 connections);
  - httpx, pool sized: max and keep-alive connections = C, what the clients configured before;
  - aiohttp, bare: a `ClientSession` whose connector is limited to C;
  - crmsync client over httpx / over aiohttp: `CampaignClient`'s request path (token cache,
    throttle, retries, classification) on each transport — what a sink pays per request.
The emulator's own CPU per request is reported beside it (it is not what the target is about).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
from common import Processes, free_port, until
from rich.console import Console

from crmsync.targets._http import RetryPolicy
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.settings import CampaignTarget

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True)
PROFILE = "profileAndServicesExt/profile"

Get = Callable[[], Awaitable[int]]


async def _token(base: str) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{base}/ims/token/v3",
            data={
                "client_id": "crmsync-local",
                "client_secret": "crmsync-local",
                "grant_type": "client_credentials",
                "scope": "openid",
            },
        )
        answer.raise_for_status()
        return str(answer.json()["access_token"])


async def _drive(get: Get, requests: int, concurrency: int) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) for `requests` GETs from `concurrency` tasks."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status = await get()
            if status != 200:
                raise RuntimeError(f"HTTP {status}")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - wall, time.process_time() - cpu


class _Variant(abc.ABC):
    """One way of sending the GET, opened and closed around its round."""

    name: str

    @abc.abstractmethod
    async def open(self) -> Get:
        """The GET of this variant, its client opened."""

    async def close(self) -> None:
        return None


class _Httpx(_Variant):
    def __init__(self, url: str, headers: dict[str, str], pool: int | None) -> None:
        self.name = "httpx, bare" if pool is None else f"httpx, pool sized to {pool}"
        self.url, self.headers, self.pool = url, headers, pool
        self.client: httpx.AsyncClient | None = None

    async def open(self) -> Get:
        limits = (
            httpx.Limits(max_connections=self.pool, max_keepalive_connections=self.pool)
            if self.pool is not None
            else httpx.Limits()
        )
        client = self.client = httpx.AsyncClient(headers=self.headers, limits=limits, timeout=30)

        async def get() -> int:
            answer = await client.get(self.url)
            return answer.status_code

        return get

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


class _Aiohttp(_Variant):
    def __init__(self, url: str, headers: dict[str, str], limit: int) -> None:
        self.name = "aiohttp, bare"
        self.url, self.headers, self.limit = url, headers, limit
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> Get:
        session = self.session = aiohttp.ClientSession(
            headers=self.headers, connector=aiohttp.TCPConnector(limit=self.limit)
        )

        async def get() -> int:
            async with session.get(self.url) as answer:
                await answer.read()
                return answer.status

        return get

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class _Crmsync(_Variant):
    def __init__(self, target: CampaignTarget, url: str) -> None:
        self.name = f"crmsync CampaignClient over {target.http_client}"
        self.target, self.url = target, url
        self.client: CampaignClient | None = None

    async def open(self) -> Get:
        client = self.client = CampaignClient(self.target, retry=RetryPolicy(attempts=1))
        session = client._session

        async def get() -> int:
            answer = await session.request("GET", self.url, what="bench GET")
            return answer.status_code

        await get()  # the token, fetched once per client
        return get

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    total = times.user + times.system
    for child in process.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += child_times.user + child_times.system
    return float(total)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="crmsync-bench-http-"))
    processes = Processes(tmp)
    port = free_port()
    emulator = processes.crmsync(
        "emulators",
        [
            "emulators",
            "--dynamics-port",
            str(free_port()),
            "--campaign-port",
            str(port),
            "--data-dir",
            str(tmp / "emulators"),
        ],
    )
    base = f"http://127.0.0.1:{port}"
    try:

        async def up() -> bool:
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    return (await client.get(f"{base}/_admin/stats")).status_code == 200
            except httpx.HTTPError:
                return False

        await until(up, 60, "the Campaign emulator")
        target = CampaignTarget(url=base, max_concurrency=args.concurrency)
        async with CampaignClient(target) as client:
            pkey = await client.upsert(PROFILE, "bench-1", {"lastName": "Bench"})
            url = client.url(PROFILE, pkey)
        headers = {
            "Authorization": f"Bearer {await _token(base)}",
            "Accept": "application/json",
            "X-Api-Key": "crmsync-local",
        }
        variants: list[_Variant] = [
            _Httpx(url, headers, None),
            _Httpx(url, headers, args.concurrency),
            _Aiohttp(url, headers, args.concurrency),
            _Crmsync(target.model_copy(update={"http_client": "httpx"}), url),
            _Crmsync(target.model_copy(update={"http_client": "aiohttp"}), url),
        ]
        server = psutil.Process(emulator.pid)
        rounds: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
        for number in range(args.rounds):
            console.print(f"round {number + 1}/{args.rounds}")
            for variant in variants:
                get = await variant.open()
                try:
                    await _drive(get, args.concurrency * 5, args.concurrency)  # warm connections
                    server_cpu = _cpu(server)
                    seconds, cpu = await _drive(get, args.requests, args.concurrency)
                    server_cpu = _cpu(server) - server_cpu
                finally:
                    await variant.close()
                rounds[variant.name].append(
                    {
                        "requests_per_s": args.requests / seconds,
                        "client_cpu_us_per_request": cpu / args.requests * 1e6,
                        "emulator_cpu_us_per_request": server_cpu / args.requests * 1e6,
                    }
                )
        results: dict[str, Any] = {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "variants": {},
        }
        for name, measured in rounds.items():
            median = {
                key: statistics.median(r[key] for r in measured) for key in measured[0] if measured
            }
            results["variants"][name] = {**median, "rounds": measured}
        return results
    finally:
        processes.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/http_clients.json")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    variants = results["variants"]
    base = variants["httpx, bare"]["client_cpu_us_per_request"]
    print(
        f"\nGET of one Campaign profile, {args.requests} requests from {args.concurrency} tasks, "
        f"median of {args.rounds} interleaved rounds\n"
    )
    print("| client | requests/s | client CPU µs/req | vs httpx bare | emulator CPU µs/req |")
    print("|---|---:|---:|---:|---:|")
    for name, row in variants.items():
        print(
            f"| {name} | {row['requests_per_s']:,.0f} | {row['client_cpu_us_per_request']:,.0f} "
            f"| {row['client_cpu_us_per_request'] / base:.2f} "
            f"| {row['emulator_cpu_us_per_request']:,.0f} |"
        )
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
