"""(f) The emulators' own speed: requests/s per endpoint over real HTTP, and the emulator
process's CPU per request, next to a trivial Starlette endpoint served the same way (the ceiling).

Run: .venv/bin/python bench/emulators.py [--seconds S] [--concurrency C] [--generators G]
[--json-out bench/results/emulators.json]

Each emulator runs alone in a process of its own (as `crmsync emulators` runs it, with its
service-protection windows opened wide so the bench measures the server, not the throttle); the
load comes from G other processes (aiohttp, C connections in all) that count the answers
completed within a window of S seconds and check each status. The emulator's CPU time over that
window divided by the requests it answered is its CPU per request: 1e6 / that is what one core
of this machine serves, whatever else shares the machine. A bulk endpoint (UpsertMultiple of
100 activities, new or existing) is reported per record too: its CPU per request ÷ 100.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
UNLIMITED = 10**9
TARGET_RPS = 3000
CLIENT = "crmsync-local"
PROFILES = "profileAndServicesExt/profile"


@dataclass(frozen=True)
class Call:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


#: In a call's body, replaced by a text no other request of the run has (new records each time).
UNIQUE = b"@unique@"
BULK_RECORDS = 100


@dataclass(frozen=True)
class Endpoint:
    name: str
    emulator: str  # dynamics, campaign or baseline
    calls: list[Call]  # cycled through
    ok: tuple[int, ...] = (200,)
    records: int = 1  # records written or read per request


@dataclass
class Measured:
    endpoint: str
    emulator: str
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    emulator_cpu_us_per_request: float
    one_core_requests_per_s: float
    emulator_cpu_share: float  # of one core, over the window
    generator_cpu_share: float  # of one core, the generators added up
    records_per_request: int = 1
    emulator_cpu_us_per_record: float = float("nan")


# --- the served side (child processes) -----------------------------------------------------


def _baseline_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def fixed(request: Request) -> Response:
        return JSONResponse({"PKey": "@fixed", "firstName": "Fixed", "email": "f@example.org"})

    return Starlette(routes=[Route("/fixed", fixed, methods=["GET"])])


def serve(kind: str, port: int, data_dir: Path) -> None:
    """One served process: an emulator (`crmsync emulators --only <kind>`'s code) or the
    baseline, with the same server settings and event loop."""
    from crmsync.deploy.emulators import server

    if kind == "baseline":
        server.run(server.serve_app(_baseline_app(), port=port))
        return
    server.run(
        server.serve_emulators(
            data_dir,
            only=(kind,),
            dynamics_port=port,
            campaign_port=port,
            dynamics_requests_per_window=UNLIMITED,
            dynamics_execution_ms_per_window=UNLIMITED,
            dynamics_max_concurrent=UNLIMITED,
            campaign_requests_per_window=UNLIMITED,
        )
    )


# --- the load side (generator processes) ---------------------------------------------------


def _generate(
    calls: list[Call], ok: tuple[int, ...], connections: int, start_at: float, end_at: float
) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        done = errors = 0
        statuses: dict[int, int] = {}
        next_call = 0
        connector = aiohttp.TCPConnector(limit=connections, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def loop() -> None:
                nonlocal done, errors, next_call
                while time.time() < end_at:
                    call = calls[next_call % len(calls)]
                    next_call += 1
                    body = call.body
                    if body is not None and UNIQUE in body:
                        body = body.replace(UNIQUE, f"{os.getpid()}-{next_call}".encode())
                    async with session.request(
                        call.method, call.url, headers=call.headers, data=body
                    ) as response:
                        await response.read()
                        status = response.status
                    if start_at <= time.time() < end_at:
                        done += 1
                        if status not in ok:
                            errors += 1
                            statuses[status] = statuses.get(status, 0) + 1

            await asyncio.sleep(max(0.0, start_at - time.time() - 0.5))  # connect and warm up
            cpu_started: float | None = None

            async def mark() -> None:
                nonlocal cpu_started
                await asyncio.sleep(max(0.0, start_at - time.time()))
                cpu_started = time.process_time()

            marker = asyncio.create_task(mark())
            await asyncio.gather(*(loop() for _ in range(connections)))
            await marker
            cpu = time.process_time() - (cpu_started or 0.0)
        return {"done": done, "errors": errors, "statuses": statuses, "cpu_s": cpu}

    return asyncio.run(main())


def _generator_entry(args: tuple[Any, ...]) -> dict[str, Any]:
    return _generate(*args)


# --- the driver ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """A served child process on a free port."""

    def __init__(self, kind: str, data_dir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = (data_dir / f"{kind}.log").open("ab")
        self.popen = subprocess.Popen(
            [
                *(sys.executable, __file__, "--serve", kind),
                *("--port", str(self.port), "--data-dir", str(data_dir)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.process = psutil.Process(self.popen.pid)

    async def ready(self, session: aiohttp.ClientSession) -> None:
        probe = "/fixed" if self.kind == "baseline" else "/_admin/stats"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.popen.returncode}")
            try:
                async with session.get(self.url + probe) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not start")

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


async def _token(session: aiohttp.ClientSession, url: str, form: dict[str, str]) -> str:
    async with session.post(url, data=form) as response:
        response.raise_for_status()
        return str((await response.json())["access_token"])


async def campaign_endpoints(session: aiohttp.ClientSession, url: str, n: int) -> list[Endpoint]:
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "client_secret": CLIENT,
        "scope": "openid,AdobeID,read_organizations,additional_info.projectedProductContext",
    }
    token_url = f"{url}/ims/token/v3"
    token = await _token(session, token_url, form)
    headers = {"Authorization": f"Bearer {token}", "X-Api-Key": CLIENT}
    api = f"{url}/local/campaign/{PROFILES}"
    run = uuid.uuid4().hex[:8]
    pkeys, external_ids = [], []
    for i in range(n):
        external_id = f"{run}-{i}"
        body = {"email": f"p{i}@example.org", "firstName": f"F{i}", "externalId": external_id}
        async with session.post(api, json=body, headers=headers) as response:
            response.raise_for_status()
            pkeys.append(str((await response.json())["PKey"]))
        external_ids.append(external_id)
    json_headers = {**headers, "Content-Type": "application/json"}
    return [
        _token_endpoint("Campaign token (POST /ims/token/v3)", "campaign", token_url, form),
        Endpoint(
            "Campaign profile GET by PKey",
            "campaign",
            [Call("GET", f"{api}/{pkey}", headers) for pkey in pkeys],
        ),
        Endpoint(
            "Campaign profile PATCH",
            "campaign",
            [
                Call("PATCH", f"{api}/{pkey}", json_headers, b'{"lastName": "L%d"}' % i)
                for i, pkey in enumerate(pkeys)
            ],
        ),
        Endpoint(
            "Campaign profile lookup by externalId",
            "campaign",
            [
                Call("GET", f"{api}/byExternalId?externalId_parameter={external_id}", headers)
                for external_id in external_ids
            ],
        ),
    ]


def _token_endpoint(name: str, emulator: str, token_url: str, form: dict[str, str]) -> Endpoint:
    """The emulator's token endpoint, posted the client-credentials form."""
    body = urlencode(form).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return Endpoint(name, emulator, [Call("POST", token_url, headers, body)])


def _activities(contacts: list[str], event_ids: list[str]) -> bytes:
    """An UpsertMultiple body of email-open activities as the worker's Dynamics sink sends them:
    keyed by event id, linked to a contact."""
    targets = [
        {
            "@odata.type": "Microsoft.Dynamics.CRM.crmsync_emailopen",
            "subject": "Email opened: Spring newsletter",
            "crmsync_campaignname": "Spring sale",
            "crmsync_deliveryname": "Spring newsletter",
            "crmsync_eventtime": f"2024-05-01T12:00:{i % 60:02d}.250Z",
            "regardingobjectid_contact_crmsync_emailopen@odata.bind": (
                f"/contacts({contacts[i % len(contacts)]})"
            ),
            "crmsync_eventid": event_id,
        }
        for i, event_id in enumerate(event_ids)
    ]
    return json.dumps({"Targets": targets}).encode()


async def _activity_tables(url: str) -> None:
    """crmsync's activity tables, created as `crmsync targets setup d365` creates them."""
    from crmsync.streams import preflight
    from crmsync.streams.catalog import NAMES, default_config
    from crmsync.targets.dynamics import DynamicsClient
    from crmsync.targets.settings import DynamicsTarget

    async with DynamicsClient(DynamicsTarget(url=url)) as client:
        await preflight.setup_dynamics({n: default_config(n) for n in NAMES}, client)


async def dynamics_endpoints(session: aiohttp.ClientSession, url: str, n: int) -> list[Endpoint]:
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "client_secret": CLIENT,
        "scope": f"{url}/.default",
    }
    token_url = f"{url}/local/oauth2/v2.0/token"
    token = await _token(session, token_url, form)
    headers = {
        "Authorization": f"Bearer {token}",
        "OData-Version": "4.0",
        "OData-MaxVersion": "4.0",
        "Accept": "application/json",
    }
    api = f"{url}/api/data/v9.2"
    ids = [str(uuid.uuid4()) for _ in range(n)]
    json_headers = {**headers, "Content-Type": "application/json"}
    for i, id_ in enumerate(ids):
        body = {"firstname": f"F{i}", "lastname": "Seed", "emailaddress1": f"c{i}@example.org"}
        async with session.patch(f"{api}/contacts({id_})", json=body, headers=headers) as response:
            response.raise_for_status()
    await _activity_tables(url)
    bulk_url = f"{api}/crmsync_emailopens/Microsoft.Dynamics.CRM.UpsertMultiple"
    run = uuid.uuid4().hex[:8]
    existing = [
        _activities(ids, [f"evt-{run}-{c}-{i}" for i in range(BULK_RECORDS)])
        for c in range(max(1, n // BULK_RECORDS))
    ]
    for payload in existing:
        async with session.post(bulk_url, data=payload, headers=json_headers) as response:
            response.raise_for_status()
    fresh = _activities(ids, [f"evt-{UNIQUE.decode()}-{i}" for i in range(BULK_RECORDS)])
    return [
        _token_endpoint("Dynamics token (POST /oauth2/v2.0/token)", "dynamics", token_url, form),
        Endpoint(
            "Dynamics token validation (GET WhoAmI)",
            "dynamics",
            [Call("GET", f"{api}/WhoAmI", headers)],
        ),
        Endpoint(
            "Dynamics contact GET",
            "dynamics",
            [Call("GET", f"{api}/contacts({id_})", headers) for id_ in ids],
        ),
        Endpoint(
            "Dynamics contact PATCH (upsert)",
            "dynamics",
            [
                Call(
                    "PATCH",
                    f"{api}/contacts({id_})",
                    json_headers,
                    json.dumps({"lastname": f"L{i}", "jobtitle": "Bench"}).encode(),
                )
                for i, id_ in enumerate(ids)
            ],
            ok=(204,),
        ),
        Endpoint(
            f"Dynamics UpsertMultiple of {BULK_RECORDS} new activities",
            "dynamics",
            [Call("POST", bulk_url, json_headers, fresh)],
            records=BULK_RECORDS,
        ),
        Endpoint(
            f"Dynamics UpsertMultiple of {BULK_RECORDS} existing activities",
            "dynamics",
            [Call("POST", bulk_url, json_headers, payload) for payload in existing],
            records=BULK_RECORDS,
        ),
    ]


def measure(
    pool: Any,
    endpoint: Endpoint,
    served: Served,
    seconds: float,
    connections: int,
    generators: int,
) -> Measured:
    start_at = time.time() + 1.0
    end_at = start_at + seconds
    per = max(1, connections // generators)
    pending = pool.map_async(
        _generator_entry, [(endpoint.calls, endpoint.ok, per, start_at, end_at)] * generators
    )
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = served.cpu_s()
    time.sleep(max(0.0, end_at - time.time()))
    cpu_after = served.cpu_s()
    results = pending.get(timeout=seconds + 60)
    done = sum(r["done"] for r in results)
    errors = sum(r["errors"] for r in results)
    if errors:
        statuses: dict[int, int] = {}
        for r in results:
            for status, count in r["statuses"].items():
                statuses[status] = statuses.get(status, 0) + count
        raise RuntimeError(f"{endpoint.name}: {errors} unexpected answers {statuses}")
    cpu = cpu_after - cpu_before
    per_request = cpu / done * 1e6 if done else float("nan")
    return Measured(
        endpoint=endpoint.name,
        emulator=endpoint.emulator,
        requests=done,
        errors=errors,
        seconds=seconds,
        requests_per_s=done / seconds,
        emulator_cpu_us_per_request=per_request,
        one_core_requests_per_s=1e6 / per_request if done and per_request > 0 else float("nan"),
        emulator_cpu_share=cpu / seconds,
        generator_cpu_share=sum(r["cpu_s"] for r in results) / seconds,
        records_per_request=endpoint.records,
        emulator_cpu_us_per_record=per_request / endpoint.records,
    )


async def _endpoints(served: dict[str, Served], seeds: int) -> dict[str, list[Endpoint]]:
    async with aiohttp.ClientSession() as session:
        for s in served.values():
            await s.ready(session)
        return {
            "baseline": [
                Endpoint(
                    "baseline: fixed JSON (Starlette + uvicorn)",
                    "baseline",
                    [Call("GET", f"{served['baseline'].url}/fixed")],
                )
            ],
            "campaign": await campaign_endpoints(session, served["campaign"].url, seeds),
            "dynamics": await dynamics_endpoints(session, served["dynamics"].url, seeds),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32, help="connections in all")
    parser.add_argument("--generators", type=int, default=1, help="load-generator processes")
    parser.add_argument("--seeds", type=int, default=1000, help="records made before measuring")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/emulators.json")
    parser.add_argument(
        "--serve", choices=("baseline", "dynamics", "campaign"), help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.data_dir)
        return 0
    with tempfile.TemporaryDirectory(prefix="crmsync-bench-emulators-") as tmp:
        served = {kind: Served(kind, Path(tmp)) for kind in ("baseline", "campaign", "dynamics")}
        pool = multiprocessing.get_context("spawn").Pool(args.generators)
        try:
            pool.map(time.sleep, [0] * args.generators)  # the generators started and imported
            endpoints = asyncio.run(_endpoints(served, args.seeds))
            rows = []
            for kind in ("baseline", "campaign", "dynamics"):
                for endpoint in endpoints[kind]:
                    row = measure(
                        pool,
                        endpoint,
                        served[kind],
                        args.seconds,
                        args.concurrency,
                        args.generators,
                    )
                    per_record = (
                        f" = {row.emulator_cpu_us_per_record:,.1f} µs/record"
                        if row.records_per_request > 1
                        else ""
                    )
                    print(
                        f"{row.endpoint}: {row.requests_per_s:,.0f} req/s, "
                        f"{row.emulator_cpu_us_per_request:,.0f} µs CPU/request{per_record} "
                        f"(one core: {row.one_core_requests_per_s:,.0f} req/s; emulator "
                        f"{row.emulator_cpu_share:.0%}, generators {row.generator_cpu_share:.0%} "
                        "of a core)",
                        file=sys.stderr,
                        flush=True,
                    )
                    rows.append(row)
        finally:
            pool.terminate()
            for s in served.values():
                s.stop()
    baseline = rows[0]
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "generators": args.generators,
            "seeds": args.seeds,
        },
        "target_requests_per_s": TARGET_RPS,
        "baseline": asdict(baseline),
        "endpoints": [asdict(r) for r in rows[1:]],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    print("| endpoint | requests/s | emulator CPU/request | CPU/record | one core | of baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.endpoint} | {row.requests_per_s:,.0f} | "
            f"{row.emulator_cpu_us_per_request:,.0f} µs | "
            f"{row.emulator_cpu_us_per_record:,.1f} µs | {row.one_core_requests_per_s:,.0f} | "
            f"{row.one_core_requests_per_s / baseline.one_core_requests_per_s:.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
