"""Both emulators: admin stats, fault injection, service limits, persistence and input fuzzing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psutil
import pytest

from crmsync.deploy.emulators.server import Emulators, running_emulators, serve_emulators
from tests.conftest import free_port


async def _token(client: httpx.AsyncClient, emu: Emulators) -> str:
    response = await client.post(
        emu.dynamics_token_url,
        data={
            "client_id": emu.client_id,
            "client_secret": emu.client_secret,
            "grant_type": "client_credentials",
            "scope": f"{emu.dynamics_url}/.default",
        },
    )
    return str(response.json()["access_token"])


async def test_stats_count_rows_and_api_requests(
    emulators: Emulators, emulated_dynamics: httpx.AsyncClient, emulated_campaign: httpx.AsyncClient
) -> None:
    await emulated_dynamics.post("contacts", json={"firstname": "A"})
    await emulated_dynamics.post("contacts", json={"firstname": "B"})
    await emulated_campaign.post("profileAndServices/profile", json={"email": "a@b.c"})
    async with httpx.AsyncClient() as admin:
        dynamics = (await admin.get(f"{emulators.dynamics_url}/_admin/stats")).json()
        campaign = (await admin.get(f"{emulators.campaign_url}/_admin/stats")).json()
        await admin.post(f"{emulators.dynamics_url}/_admin/reset", json={})
        after_reset = (await admin.get(f"{emulators.dynamics_url}/_admin/stats")).json()
    assert dynamics["counts"]["contacts"] == 2 and dynamics["counts"]["crmsync_emailsends"] == 0
    assert dynamics["requests"] == 2
    assert campaign == {
        "counts": {"profile": 1, "cusPurchase": 0},
        "requests": 1,
        "in_flight_peak": 1,  # the requests came one after the other
    }
    assert after_reset["counts"]["contacts"] == 0
    assert after_reset["requests"] == 0 and after_reset["in_flight_peak"] == 0


async def test_fail_next_outage_and_clearing(
    emulators: Emulators, emulated_dynamics: httpx.AsyncClient, emulated_campaign: httpx.AsyncClient
) -> None:
    faults = {"fail_next": [{"status": 429, "retry_after_s": 2}, {"status": 503}]}
    async with httpx.AsyncClient() as admin:
        for base in (emulators.dynamics_url, emulators.campaign_url):
            assert (await admin.post(f"{base}/_admin/faults", json=faults)).status_code == 200
        first = await emulated_dynamics.get("contacts")
        second = await emulated_dynamics.get("contacts")
        third = await emulated_dynamics.get("contacts")
        assert (first.status_code, first.headers["Retry-After"]) == (429, "2")
        assert first.json()["error"]["code"] == "0x80072322"
        assert (second.status_code, third.status_code) == (503, 200)
        campaign_first = await emulated_campaign.get("profileAndServices/profile")
        assert campaign_first.status_code == 429 and campaign_first.headers["Retry-After"] == "2"
        assert (await emulated_campaign.get("profileAndServices/profile")).status_code == 503
        await admin.post(f"{emulators.campaign_url}/_admin/faults", json={"outage_s": 30})
        outage = await emulated_campaign.get("profileAndServices/profile")
        assert outage.status_code == 503 and "RST-" not in outage.text
        assert int(outage.headers["Retry-After"]) >= 29
        await admin.delete(f"{emulators.campaign_url}/_admin/faults")
        assert (await emulated_campaign.get("profileAndServices/profile")).status_code == 200


async def test_error_rates_are_reproducible_with_a_seed(
    emulators: Emulators, emulated_dynamics: httpx.AsyncClient
) -> None:
    async def run() -> list[int]:
        async with httpx.AsyncClient() as admin:
            await admin.post(
                f"{emulators.dynamics_url}/_admin/faults",
                json={"error_rates": {"429": 0.3, "500": 0.2}, "seed": 3, "retry_after_s": 1},
            )
        return [(await emulated_dynamics.get("contacts")).status_code for _ in range(40)]

    first, second = await run(), await run()
    assert first == second
    assert {200, 429, 500} <= set(first)


async def test_latency_and_revocation(
    emulators: Emulators, emulated_dynamics: httpx.AsyncClient
) -> None:
    async with httpx.AsyncClient() as admin:
        await admin.post(f"{emulators.dynamics_url}/_admin/faults", json={"latency_ms": 200})
        started = time.monotonic()
        assert (await emulated_dynamics.get("contacts")).status_code == 200
        assert time.monotonic() - started >= 0.2
        await admin.post(f"{emulators.dynamics_url}/_admin/faults", json={"revoke_tokens": True})
        revoked = await emulated_dynamics.get("contacts")
        assert revoked.status_code == 401
        fresh = await _token(admin, emulators)
        again = await emulated_dynamics.get(
            "contacts", headers={"Authorization": f"Bearer {fresh}"}
        )
        assert again.status_code == 200


async def test_latency_counts_from_arrival_with_the_processing_inside_it(
    emulators: Emulators, emulated_dynamics: httpx.AsyncClient, emulated_campaign: httpx.AsyncClient
) -> None:
    """A target that answers in `latency_ms`: the request is carried out when it arrives and
    its answer leaves `latency_ms` after that (not after `latency_ms` plus the processing)."""
    async with httpx.AsyncClient() as admin:
        for url in (emulators.dynamics_url, emulators.campaign_url):
            await admin.post(f"{url}/_admin/faults", json={"latency_ms": 400})
        started = time.monotonic()
        creates = asyncio.gather(
            emulated_dynamics.post("contacts", json={"firstname": "Early"}),
            emulated_campaign.post("profileAndServices/profile", json={"email": "e@b.c"}),
        )
        await asyncio.sleep(0.2)
        dynamics = (await admin.get(f"{emulators.dynamics_url}/_admin/stats")).json()
        campaign = (await admin.get(f"{emulators.campaign_url}/_admin/stats")).json()
        answered = await creates
        elapsed = time.monotonic() - started
    assert dynamics["counts"]["contacts"] == 1 and campaign["counts"]["profile"] == 1
    assert [r.status_code for r in answered] == [204, 201]
    assert elapsed >= 0.4


#: JSON that is valid but not a profile body.
_ODD_JSON: tuple[Any, ...] = ([], 1, "x", None, {"email": {"a": 1}}, {"firstName": []})


async def test_invalid_fault_bodies_are_422(emulators: Emulators) -> None:
    async with httpx.AsyncClient() as admin:
        body: Any
        for body in (
            {"latency_ms": -1},
            {"error_rates": {"429": 2}},
            {"error_rates": {"200": 0.1}},
            {"fail_next": [{"status": 200}]},
            {"surprise": True},
            [],
        ):
            response = await admin.post(f"{emulators.campaign_url}/_admin/faults", json=body)
            assert response.status_code == 422, body
            assert response.json()["errors"][0]["loc"] is not None
        broken = await admin.post(
            f"{emulators.dynamics_url}/_admin/faults",
            content=b"{",
            headers={"Content-Type": "application/json"},
        )
        assert broken.status_code == 422


async def test_request_limit_counts_a_batch_as_one_request(tmp_path: Path) -> None:
    """MicrosoftDocs/powerapps-docs, powerapps-docs/developer/data-platform/api-limits.md:
    "Combine the selected operations into a batch. A batch can contain up to 1000 operations and
    will avoid the number of requests limit. However, you will need to be prepared for the
    execution time limit." So a $batch of 5 counts 1 against the request limit."""
    async with (
        running_emulators(
            tmp_path,
            dynamics_port=0,
            campaign_port=0,
            dynamics_requests_per_window=5,
            dynamics_window_s=2,
            campaign_requests_per_window=3,
            campaign_window_s=60,
        ) as emu,
        httpx.AsyncClient() as client,
    ):
        headers = {"Authorization": f"Bearer {await _token(client, emu)}"}
        boundary = "batch_x"
        part = (
            "Content-Type: application/http\r\n\r\n"
            "DELETE contacts(00000000-0000-0000-0000-000000000001) HTTP/1.1\r\n\r\n"
        )
        body = (f"--{boundary}\r\n{part}" * 5 + f"--{boundary}--\r\n").encode()
        batch = await client.post(
            f"{emu.dynamics_api_url}/$batch",
            content=body,
            headers={
                **headers,
                "Content-Type": f"multipart/mixed; boundary={boundary}",
                "Prefer": "odata.continue-on-error",
            },
        )
        assert batch.status_code == 200 and batch.headers["x-ms-dop-hint"]
        # The batch counted 1 of the 5: four more requests pass, the fifth is throttled.
        for _ in range(4):
            ok = await client.get(f"{emu.dynamics_api_url}/contacts", headers=headers)
            assert ok.status_code == 200
        throttled = await client.get(f"{emu.dynamics_api_url}/contacts", headers=headers)
        assert throttled.status_code == 429
        assert throttled.json()["error"]["code"] == "0x80072322"
        await asyncio.sleep(int(throttled.headers["Retry-After"]))
        assert (await client.get(f"{emu.dynamics_api_url}/contacts", headers=headers)).is_success

        ims = await client.post(
            emu.campaign_token_url,
            data={
                "client_id": emu.client_id,
                "client_secret": emu.client_secret,
                "grant_type": "client_credentials",
                "scope": "openid",
            },
        )
        acs = {"Authorization": f"Bearer {ims.json()['access_token']}", "X-Api-Key": emu.client_id}
        codes = [
            (await client.get(f"{emu.campaign_api_url}/profileAndServices/profile", headers=acs))
            for _ in range(4)
        ]
        assert [r.status_code for r in codes] == [200, 200, 200, 429]
        assert int(codes[-1].headers["Retry-After"]) >= 1


async def test_concurrency_limit(tmp_path: Path) -> None:
    async with (
        running_emulators(
            tmp_path, dynamics_port=0, campaign_port=0, dynamics_max_concurrent=2
        ) as emu,
        httpx.AsyncClient() as client,
    ):
        headers = {"Authorization": f"Bearer {await _token(client, emu)}"}
        await client.post(f"{emu.dynamics_url}/_admin/faults", json={"latency_ms": 300})
        responses = await asyncio.gather(
            *(client.get(f"{emu.dynamics_api_url}/contacts", headers=headers) for _ in range(4))
        )
    # Injected latency holds the concurrency slot, like a slow request on the real service.
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429]
    throttled = next(r for r in responses if r.status_code == 429)
    assert throttled.json()["error"]["code"] == "0x80072326" and throttled.headers["Retry-After"]


async def test_data_and_tokens_survive_a_restart(tmp_path: Path) -> None:
    async with running_emulators(tmp_path, dynamics_port=0, campaign_port=0) as emu:
        async with httpx.AsyncClient() as client:
            token = await _token(client, emu)
            headers = {"Authorization": f"Bearer {token}"}
            created = await client.post(
                f"{emu.dynamics_api_url}/contacts", json={"firstname": "Stay"}, headers=headers
            )
            assert created.status_code == 204
    async with running_emulators(tmp_path, dynamics_port=0, campaign_port=0) as emu:
        async with httpx.AsyncClient() as client:
            rows = await client.get(f"{emu.dynamics_api_url}/contacts", headers=headers)
    assert rows.status_code == 200
    assert [r["firstname"] for r in rows.json()["value"]] == ["Stay"]


def _noise(rng: random.Random) -> str:
    alphabet = string.printable + "'()$@%&=,\u00e9\u4e2d"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))


async def test_fuzzed_urls_and_bodies_never_cause_server_errors(
    emulated_dynamics: httpx.AsyncClient, emulated_campaign: httpx.AsyncClient
) -> None:
    rng = random.Random(11)
    fragments = ["contacts", "new_purchases", "(", ")", "'", "=", ",", "eq", " and ", "$1", "/"]
    for _ in range(150):
        raw = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 6))) + _noise(rng)
        key = quote(raw, safe="()'=,$@ ")
        for response in (
            await emulated_dynamics.get(f"contacts({key})"),
            await emulated_dynamics.get("contacts", params={"$filter": raw}),
            await emulated_dynamics.get("contacts", params={"$select": raw, "$top": _noise(rng)}),
            await emulated_dynamics.patch(
                f"new_purchases({key})",
                content=_noise(rng).encode(),
                headers={"Content-Type": "application/json"},
            ),
        ):
            assert response.status_code < 500, (response.request.url, response.text[:200])
    bodies = [_noise(rng).encode() for _ in range(60)] + [json.dumps(v).encode() for v in _ODD_JSON]
    for body in bodies:
        response = await emulated_campaign.post(
            "profileAndServices/profile", content=body, headers={"Content-Type": "application/json"}
        )
        # Campaign answers validation failures with 500 + RST-360011, as the real API does.
        assert response.status_code < 500 or "RST-360011" in response.text, response.text
        dynamic = await emulated_dynamics.post(
            "contacts", content=body, headers={"Content-Type": "application/json"}
        )
        assert dynamic.status_code < 500, dynamic.text
    for _ in range(60):
        path = "/".join(quote(_noise(rng), safe="@") for _ in range(rng.randint(1, 3)))
        response = await emulated_campaign.get(f"profileAndServices/profile/{path}")
        assert response.status_code < 500, (path, response.text)


async def test_serve_emulators_runs_until_cancelled(tmp_path: Path) -> None:
    task = asyncio.create_task(serve_emulators(tmp_path, dynamics_port=0, campaign_port=0))
    await asyncio.sleep(0.3)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (tmp_path / "dynamics.sqlite3").exists() and (tmp_path / "campaign.sqlite3").exists()


async def test_emulators_refuse_to_listen_beyond_loopback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        async with running_emulators(tmp_path, host="0.0.0.0"):
            pass


def _answering(url: str) -> bool:
    try:
        return httpx.get(f"{url}/_admin/stats", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _until(check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("ending", ["SIGTERM", "SIGKILL"])
def test_crmsync_emulators_runs_each_emulator_in_a_process_of_its_own(
    tmp_path: Path, ending: str
) -> None:
    """Neither emulator takes CPU from the other; SIGTERM stops both, and when the parent is
    killed outright its two children do not live on."""
    dynamics_port, campaign_port = free_port(), free_port()
    parent = subprocess.Popen(
        [
            *(sys.executable, "-m", "crmsync.control.cli", "emulators"),
            *("--dynamics-port", str(dynamics_port), "--campaign-port", str(campaign_port)),
            *("--data-dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    urls = [f"http://127.0.0.1:{port}" for port in (dynamics_port, campaign_port)]
    try:
        _until(lambda: all(_answering(url) for url in urls), 60)
        children = psutil.Process(parent.pid).children()
        listening = {
            child.pid: {c.laddr.port for c in child.net_connections() if c.status == "LISTEN"}
            for child in children
        }
        assert sorted(map(sorted, listening.values())) == sorted([[dynamics_port], [campaign_port]])
        parent.send_signal(getattr(signal, ending))
        parent.wait(30)
        psutil.wait_procs(children, timeout=15)
        assert not any(child.is_running() for child in children)
        assert not any(_answering(url) for url in urls)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(5)
