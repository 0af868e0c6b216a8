"""The history's ETA and written rate, the source's STALE rule, the dead-letter filter, and the
new routes' refusals and roles (no broker)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from crmsync.control import models
from crmsync.control.auth import Authenticator
from crmsync.control.dead_letters import DeadLetterFilter
from crmsync.control.history import HistoryStore, Sample, WrittenRate, eta
from crmsync.control.server import create_app
from crmsync.control.sources import view
from crmsync.streams.settings import Settings
from crmsync.streams.source import SourceStatus
from tests.unit.fake_supervisor import FakeSupervisor, factory

ADMIN = "an-admin-token-long-enough-for-the-check"
VIEWER = "a-viewer-token-long-enough-for-the-check"
D2C = "/api/v1/workflows/d365-to-campaign"


def test_the_eta_follows_the_last_ten_minutes_of_backlog() -> None:
    draining = [Sample(1000.0 + 10 * i, 1000 - 100 * i, 10.0) for i in range(6)]
    reading = eta(draining)
    assert (reading.trend, reading.eta_s, reading.text) == ("draining", 50.0, "drains in ~50 s")
    growing = [Sample(1000.0 + 10 * i, 100 + 5 * i, 1.0) for i in range(6)]
    assert eta(growing).text == "growing"
    assert eta([*draining, Sample(1070.0, 0, 3.0)]).text == "caught up"
    assert eta([]).trend == "unknown"


def test_a_restarted_workers_counter_is_never_counted_as_negative() -> None:
    rate = WrittenRate()
    assert rate.rate("w", 10.0, {"a": 100}) == 0.0  # nothing to compare with yet
    assert rate.rate("w", 20.0, {"a": 150}) == 5.0
    assert rate.rate("w", 30.0, {"a": 20, "b": 30}) == 5.0  # a restarted, b is new


async def test_the_history_outlives_the_store(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    store = HistoryStore(path)
    await store.open()
    now = time.time()
    await store.add([("w", Sample(now - 8000, 9, 0.0)), ("w", Sample(now, 7, 1.5))])
    await store.close()
    again = HistoryStore(path)
    await again.open()
    assert again.samples("w", now - 60) == [Sample(now, 7, 1.5)]
    assert again.samples("w", 0) == [Sample(now, 7, 1.5)], "older than two hours: dropped"
    await again.close()


def test_a_source_without_heartbeat_is_stale_unless_it_said_stopped() -> None:
    now = int(time.time() * 1000)
    old = now - 20_000
    running = SourceStatus(worker_id="s", state="RUNNING", heartbeat_ms=old, last_poll_ms=old)
    shown = view(running, now, liveness_s=3.5)
    assert shown.status == "STALE" and "no heartbeat for 20 s" in (shown.error or "")
    assert shown.lag_s == 20.0
    stopped = running.model_copy(update={"state": "STOPPED"})
    assert view(stopped, now, 3.5).status == "STOPPED"
    failed = running.model_copy(
        update={"state": "FAILED", "error": "bad secret", "heartbeat_ms": now}
    )
    assert (view(failed, now, 3.5).status, view(failed, now, 3.5).error) == ("FAILED", "bad secret")


def test_the_filter_holds_every_criterion_given() -> None:
    letter = models.DeadLetter(
        topic="crmsync.d365-to-campaign.dlq", partition=1, offset=7,
        timestamp="2026-01-31T12:00:00+00:00", key="k", headers={}, value=None,
        value_base64="", reason="HTTP 400: too long", error_class="RecordRejected",
        failed_at="2026-01-31T12:00:00+00:00",
    )  # fmt: skip
    assert DeadLetterFilter(reason="TOO LONG").matches(letter)
    assert not DeadLetterFilter(reason="missing").matches(letter)
    assert DeadLetterFilter.model_validate({"since": "2026-01-31T11:00:00Z"}).matches(letter)
    assert not DeadLetterFilter.model_validate({"until": "2026-01-31T12:00:00Z"}).matches(letter)
    assert DeadLetterFilter.model_validate({"offsets": [{"partition": 1, "offset": 7}]}).matches(
        letter
    )
    assert not DeadLetterFilter(error_class="MappingError").matches(letter)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(api_tokens=f"watcher:viewer:{VIEWER}")  # type: ignore[arg-type]
    app = create_app(
        settings, Authenticator.from_settings(settings, ADMIN), factory(FakeSupervisor())
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
            yield http


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "names"),
    [
        ("GET", f"{D2C}/history", {"params": {"minutes": "121"}}, 400, "minutes"),
        ("GET", f"{D2C}/history", {"params": {"minutes": "1.5"}}, 400, "minutes"),
        ("GET", f"{D2C}/dead-letters", {"params": {"until": "soon"}}, 400, "until"),
        ("GET", f"{D2C}/dead-letters", {"params": {"reason": "x" * 501}}, 400, "reason"),
        ("POST", f"{D2C}/dead-letters/redrive", {"json": {"since": "noon"}}, 422, "since"),
        ("POST", f"{D2C}/dead-letters/redrive", {"json": [1]}, 422, ""),
        ("POST", f"{D2C}/dead-letters/redrive", {"content": b"{"}, 400, ""),
        ("POST", "/api/v1/workflows/nope/dead-letters/redrive", {"json": {}}, 404, ""),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_field(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    names: str,
) -> None:
    answer = await client.request(method, path, headers=_as(ADMIN), **kwargs)  # type: ignore[arg-type]
    assert answer.status_code == status, answer.text
    assert names in answer.text


async def test_viewers_read_and_only_operators_re_drive(client: httpx.AsyncClient) -> None:
    for path in ("/api/v1/sources", f"{D2C}/history", f"{D2C}/dead-letters?reason=x"):
        assert (await client.get(path, headers=_as(VIEWER))).status_code == 200, path
        assert (await client.get(path)).status_code == 401, path
    redrive = f"{D2C}/dead-letters/redrive"
    assert (await client.post(redrive, json={}, headers=_as(VIEWER))).status_code == 403
    answer = await client.post(redrive, json={"dry_run": True}, headers=_as(ADMIN))
    assert answer.status_code == 200 and answer.json()["redrive_id"] is None
