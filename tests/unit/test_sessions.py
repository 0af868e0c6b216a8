"""Page sessions live on the server: signing out revokes a captured cookie, a removed token ends
its sessions; the cookie is __Host- and Secure off loopback; guessing tokens is throttled."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

from crmsync.control.auth import Authenticator, Role
from crmsync.control.server import create_app
from crmsync.streams.settings import Settings
from tests.unit.fake_supervisor import FakeSupervisor, factory

ADMIN = "sessions-admin-token-0123456789ab"
OPS = "sessions-operator-token-012345678"


@asynccontextmanager
async def control(
    authenticator: Authenticator | None = None, **settings: str
) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """Clients of one app, each from the address given."""
    auth = authenticator or Authenticator(ADMIN, [("ops", Role.operator, OPS)])
    app = create_app(Settings(**settings), auth, factory(FakeSupervisor()))  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):

        def client(address: str = "127.0.0.1", scheme: str = "http") -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=app, client=(address, 40000))
            return httpx.AsyncClient(transport=transport, base_url=f"{scheme}://control")

        yield client


async def _csrf(client: httpx.AsyncClient, path: str = "/login") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', (await client.get(path)).text)
    assert found is not None
    return found[1]


async def _sign_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/login", data={"csrf": await _csrf(client), "token": token})


async def test_a_cookie_captured_before_sign_out_signs_nobody_in_after_it() -> None:
    async with control() as make:
        async with make() as browser:
            assert (await _sign_in(browser, ADMIN)).status_code == 303
            captured = dict(browser.cookies)
            assert (await browser.get("/workflows.json")).status_code == 200
            signed_out = await browser.post("/logout", data={"csrf": await _csrf(browser, "/")})
            assert signed_out.status_code == 303
        async with make() as thief:
            thief.cookies.update(captured)
            assert (await thief.get("/workflows.json")).status_code == 401
            assert (await thief.get("/")).headers["location"] == "/login"


async def test_a_session_ends_when_the_token_that_opened_it_is_removed() -> None:
    auth = Authenticator(ADMIN, [("ops", Role.operator, OPS)])
    async with control(auth) as make, make() as ops, make() as admin:
        await _sign_in(ops, OPS)
        await _sign_in(admin, ADMIN)
        assert (await ops.get("/workflows.json")).status_code == 200
        auth._tokens = [t for t in auth._tokens if t.principal.name != "ops"]  # rotated out
        assert (await ops.get("/workflows.json")).status_code == 401
        assert (await admin.get("/workflows.json")).status_code == 200


async def test_the_cookie_is_host_only_and_secure_off_loopback_or_behind_https() -> None:
    async with control() as make:
        async with make("127.0.0.1") as local:
            cookie = (await local.get("/login")).headers["set-cookie"]
            assert cookie.startswith("crmsync_session=") and "secure" not in cookie.lower()
        async with make("203.0.113.7") as remote:  # plain HTTP as uvicorn sees it behind an ingress
            cookie = (await remote.get("/login")).headers["set-cookie"]
            assert cookie.startswith("__Host-crmsync_session=") and "secure" in cookie.lower()
            assert "domain=" not in cookie.lower() and "path=/" in cookie.lower()
        async with make("203.0.113.7", "https") as remote:  # the browser's side: HTTPS
            assert (await _sign_in(remote, ADMIN)).status_code == 303
            assert (await remote.get("/workflows.json")).status_code == 200
    async with control(public_url="https://crmsync.example.org") as make, make() as local:
        cookie = (await local.get("/login")).headers["set-cookie"]
        assert cookie.startswith("__Host-crmsync_session=") and "secure" in cookie.lower()


async def test_guessing_bearer_tokens_is_throttled_per_client() -> None:
    async with control() as make, make("198.51.100.1") as guesser, make("198.51.100.2") as other:
        for n in range(10):
            wrong = {"Authorization": f"Bearer guess-{n:030d}"}
            assert (await guesser.get("/api/v1/workflows", headers=wrong)).status_code == 401
        right = {"Authorization": f"Bearer {ADMIN}"}
        refused = await guesser.get("/api/v1/workflows", headers=right)
        assert refused.status_code == 429, refused.text
        assert 0 < int(refused.headers["retry-after"]) <= 60
        assert set(refused.json()) >= {"error", "detail"}
        assert (await other.get("/api/v1/workflows", headers=right)).status_code == 200


async def test_failed_sign_ins_are_throttled_per_client() -> None:
    async with control() as make, make("198.51.100.3", "https") as guesser:
        for _ in range(10):
            assert (await _sign_in(guesser, "not-the-token-" + "x" * 20)).status_code == 401
        assert (await _sign_in(guesser, ADMIN)).status_code == 429
