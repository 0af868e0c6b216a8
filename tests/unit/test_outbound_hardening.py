"""What crmsync sends out and to whom: paging links followed only to the host we called (they
would carry our bearer token), Retry-After capped, /readyz telling only ready or not, and the
emulators' admin endpoints refusing cross-site form posts."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from crmsync.control.auth import Authenticator
from crmsync.control.errors import Unavailable
from crmsync.control.server import create_app
from crmsync.deploy.emulators.admin import admin_routes
from crmsync.deploy.emulators.faults import Faults
from crmsync.deploy.emulators.limits import InFlight
from crmsync.streams.settings import Settings
from crmsync.targets._http import MAX_RETRY_AFTER_S, parse_retry_after
from crmsync.targets._transport import Response
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.errors import Fatal
from crmsync.targets.settings import CampaignTarget, DynamicsTarget
from tests.unit.fake_supervisor import FakeSupervisor, factory


def _json(body: Any) -> Response:
    return Response(200, {"content-type": "application/json"}, json.dumps(body).encode())


class _PagedDynamics(DynamicsClient):
    """Answers the first page itself, with a nextLink to `elsewhere`; records the URLs asked."""

    def __init__(self, elsewhere: str) -> None:
        super().__init__(DynamicsTarget(url="https://org.crm.dynamics.com"))
        self.asked: list[str] = []
        self.elsewhere = elsewhere

    async def _request(self, method: str, url: str, **kwargs: Any) -> Response:
        self.asked.append(url)
        page = {"value": [{"n": len(self.asked)}], "@odata.nextLink": self.elsewhere}
        return _json(page if len(self.asked) == 1 else {"value": []})


async def test_dynamics_follows_a_paging_link_to_another_host_never() -> None:
    client = _PagedDynamics("https://attacker.example/api/data/v9.2/contacts?$skiptoken=2")
    with pytest.raises(Fatal, match="another host"):
        async for _ in client.query("contacts"):
            pass
    assert len(client.asked) == 1
    await client.aclose()


async def test_dynamics_follows_its_own_paging_links() -> None:
    client = _PagedDynamics("https://org.crm.dynamics.com/api/data/v9.2/contacts?$skiptoken=2")
    assert [r async for r in client.query("contacts")] == [{"n": 1}]
    assert client.asked[1].endswith("/api/data/v9.2/contacts?$skiptoken=2")
    await client.aclose()


class _PagedCampaign(CampaignClient):
    def __init__(self, elsewhere: str) -> None:
        super().__init__(CampaignTarget(url="https://mc.example.com"))
        self.asked: list[str] = []
        self.elsewhere = elsewhere

    async def _call(self, method: str, url: str, **kwargs: Any) -> Response | None:
        self.asked.append(url)
        page = {"content": [{"n": 1}], "next": {"href": self.elsewhere}}
        return _json(page if len(self.asked) == 1 else {"content": []})


@pytest.mark.parametrize(
    "elsewhere", ["https://attacker.example/local/campaign/profile?page=2", "//attacker.example/x"]
)
async def test_campaign_follows_a_paging_link_to_another_host_never(elsewhere: str) -> None:
    client = _PagedCampaign(elsewhere)
    with pytest.raises(Fatal, match="another host"):
        async for _ in client.list("profileAndServicesExt/profile"):
            pass
    assert len(client.asked) == 1
    await client.aclose()


@pytest.mark.parametrize("header", ["1e12", "inf", "99999999", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_retry_after_is_capped(header: str) -> None:
    assert parse_retry_after(header, now=1_700_000_000.0) == MAX_RETRY_AFTER_S


def test_retry_after_nan_is_ignored() -> None:
    assert parse_retry_after("nan") is None
    assert not math.isnan(parse_retry_after("2") or math.nan)


async def test_readyz_says_only_ready_or_not() -> None:
    fake = FakeSupervisor()
    app = create_app(Settings(), Authenticator("x" * 32), factory(fake))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
            fake.refuse = Unavailable("KafkaConnectionError: connect to 10.20.30.40:9092 failed")
            answer = await client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"status": "unavailable", "detail": None}


class _Emulator:
    def __init__(self) -> None:
        self.faults = Faults()
        self.requests = 0
        self.in_flight = InFlight()
        self.resets = 0

    async def counts(self) -> dict[str, int]:
        return {}

    async def reset(self) -> None:
        self.resets += 1

    def revoke_tokens(self) -> None:
        return None

    def set_token_lifetime(self, seconds: float | None) -> None:
        return None


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
async def test_emulator_admin_posts_must_be_json(content_type: str | None) -> None:
    """A page on any site can make the browser post a text/plain form whose body reads as JSON."""
    emulator = _Emulator()
    transport = httpx.ASGITransport(app=Starlette(routes=admin_routes(emulator)))
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as client:
        headers = {"Content-Type": content_type} if content_type else {}
        forged = await client.post("/_admin/faults", content=b'{"outage_s": 30}', headers=headers)
        reset = await client.post("/_admin/reset", content=b"{}", headers=headers)
        assert (forged.status_code, reset.status_code) == (415, 415)
        assert emulator.faults.describe() == Faults().describe() and emulator.resets == 0
        assert (await client.post("/_admin/faults", json={"outage_s": 30})).status_code == 200
        assert (await client.post("/_admin/reset", json={})).status_code == 200
