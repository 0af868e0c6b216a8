"""The target clients' HTTP transports (aiohttp, httpx) against a real server on loopback.

Both must behave alike under the Session: answers read whole with lower-case headers, transient
statuses retried after Retry-After, timeouts and refused connections Retryable, a cancelled
request leaving nothing behind for the next one.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import get_args

import pytest
from aiohttp import web

from crmsync.targets._http import RetryPolicy, Session, Throttle, TokenCache
from crmsync.targets._transport import HttpClient, Response, Transport, transport
from crmsync.targets.errors import Fatal, Retryable

CLIENTS = get_args(HttpClient)
FAST = RetryPolicy(attempts=4, budget_s=10, backoff_base_s=0.01, backoff_cap_s=0.05)


class Server:
    """An aiohttp server on 127.0.0.1 with the endpoints the tests need."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.paths: list[str] = []
        self.tokens: list[str] = []
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()  # ends every stalled answer (at the end of a test)
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(self.app, handle_signals=False)
        self.url = ""

    def _count(self, name: str) -> int:
        self.hits[name] = self.hits.get(name, 0) + 1
        return self.hits[name]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["tail"].split("/")[0]
        self.paths.append(request.raw_path)
        self.tokens.append(request.headers.get("Authorization", ""))
        hit = self._count(name)
        if name == "ok":
            body = await request.read()
            answer = web.json_response({"echo": body.decode(), "method": request.method})
            answer.headers.add("X-Repeated", "a")
            answer.headers.add("X-Repeated", "b")
            return answer
        if name == "throttled-once":
            if hit == 1:
                return web.json_response({}, status=429, headers={"Retry-After": "0.3"})
            return web.json_response({"n": hit})
        if name == "unavailable":
            return web.json_response({}, status=503, headers={"Retry-After": "7"})
        if name == "refused-token":
            return web.json_response({}, status=401)
        if name == "redirect":
            raise web.HTTPFound("/ok")
        if name == "slow":
            self.slow_started.set()
            await self.release.wait()
            return web.json_response({"slow": True})
        if name == "half":
            # Headers and part of the body, then the server stalls.
            stalled = web.StreamResponse(headers={"Content-Length": "100"})
            await stalled.prepare(request)
            await stalled.write(b'{"partial": ')
            self.slow_started.set()
            await self.release.wait()
            return stalled
        return web.json_response({"error": "no such endpoint"}, status=404)

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.release.set()
        await self.runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    running = Server()
    await running.start()
    yield running
    await running.stop()


def _transient(response: Response) -> Retryable | None:
    if response.status_code in (429, 503):
        return Retryable(f"HTTP {response.status_code}")
    return None


class _Tokens:
    def __init__(self) -> None:
        self.fetched = 0

    async def fetch(self) -> tuple[str, float]:
        self.fetched += 1
        return f"token-{self.fetched}", 3600.0


SessionFactory = Callable[..., Awaitable[tuple[Session, Transport, _Tokens]]]


@pytest.fixture(params=CLIENTS)
async def session(request: pytest.FixtureRequest) -> AsyncIterator[SessionFactory]:
    opened: list[Transport] = []

    async def make(
        timeout_s: float = 10.0, max_connections: int = 4
    ) -> tuple[Session, Transport, _Tokens]:
        sender = transport(
            request.param,
            timeout_s=timeout_s,
            max_connections=max_connections,
            headers={"Accept": "application/json"},
        )
        opened.append(sender)
        tokens = _Tokens()
        throttle = Throttle(max_connections)
        client = Session("test", sender, TokenCache(tokens.fetch), throttle, FAST, _transient)
        return client, sender, tokens

    yield make
    for sender in opened:
        await sender.aclose()


async def test_an_answer_is_read_whole_with_lower_case_headers(
    server: Server, session: SessionFactory
) -> None:
    client, _, _ = await session()
    answer = await client.request("POST", f"{server.url}/ok", body={"a": "é"}, what="echo")
    assert answer.status_code == 200
    assert answer.json() == {"echo": '{"a":"é"}', "method": "POST"}
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["x-repeated"] == "a, b"
    assert server.tokens == ["Bearer token-1"]


async def test_a_429_pauses_for_retry_after_then_the_request_goes_through(
    server: Server, session: SessionFactory
) -> None:
    client, _, _ = await session()
    started = time.monotonic()
    answer = await client.request("GET", f"{server.url}/throttled-once", what="throttled")
    assert answer.json() == {"n": 2}
    assert time.monotonic() - started >= 0.29  # the server's Retry-After, not the short backoff


async def test_a_transient_status_that_stays_is_retryable_with_the_servers_wait(
    server: Server, session: SessionFactory
) -> None:
    client, _, _ = await session()
    with pytest.raises(Retryable) as caught:
        await client.request(
            "GET", f"{server.url}/unavailable", what="down", retry=RetryPolicy(attempts=1)
        )
    assert "down: HTTP 503" in caught.value.reason
    assert server.hits["unavailable"] == 1


async def test_a_refused_token_is_refreshed_once_then_fatal(
    server: Server, session: SessionFactory
) -> None:
    client, _, tokens = await session()
    with pytest.raises(Fatal, match="credentials refused after a token refresh"):
        await client.request("GET", f"{server.url}/refused-token", what="refused")
    assert server.tokens == ["Bearer token-1", "Bearer token-2"]
    assert tokens.fetched == 2


async def test_redirects_are_answers_not_followed(server: Server, session: SessionFactory) -> None:
    client, _, _ = await session()
    answer = await client.request("GET", f"{server.url}/redirect", what="redirect")
    assert answer.status_code == 302
    assert server.hits.get("ok") is None


async def test_the_url_goes_out_as_built(server: Server, session: SessionFactory) -> None:
    """Escapes made by the client (an alternate key's value) are kept; raw spaces are escaped."""
    client, _, _ = await session()
    await client.request("GET", f"{server.url}/ok/contacts(k=%27a%40b%2Fc%27)", what="key")
    await client.request("GET", f"{server.url}/ok/x?$filter=a eq 'b c'", what="query")
    assert server.paths == ["/ok/contacts(k=%27a%40b%2Fc%27)", "/ok/x?$filter=a%20eq%20'b%20c'"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("client_name", CLIENTS)
async def test_a_refused_connection_is_retryable(client_name: HttpClient) -> None:
    sender = transport(client_name, timeout_s=5, max_connections=2, headers={})
    try:
        with pytest.raises(Retryable, match="connect"):
            await sender.send("GET", f"http://127.0.0.1:{_closed_port()}/x", {}, None, "connect")
    finally:
        await sender.aclose()


@pytest.mark.parametrize("client_name", CLIENTS)
async def test_an_unsendable_url_is_fatal(client_name: HttpClient) -> None:
    sender = transport(client_name, timeout_s=5, max_connections=2, headers={})
    try:
        with pytest.raises(Fatal, match="bad url"):
            await sender.send("GET", "ftp://127.0.0.1/x", {}, None, "bad url")
    finally:
        await sender.aclose()


@pytest.mark.parametrize("endpoint", ["slow", "half"])
async def test_a_server_that_stops_answering_times_out_as_retryable(
    server: Server, session: SessionFactory, endpoint: str
) -> None:
    _, sender, _ = await session(timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(Retryable, match="stalled"):
        await sender.send("GET", f"{server.url}/{endpoint}", {}, None, "stalled")
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("endpoint", ["slow", "half"])
async def test_a_cancelled_request_propagates_and_leaves_the_transport_usable(
    server: Server, session: SessionFactory, endpoint: str
) -> None:
    """What a write abandoned by a stop or a revoke fence does: the cancellation reaches the
    caller as CancelledError (not converted into a failure), its connection is not handed to
    the next request with a half-read answer, and no connection slot is lost — more cancelled
    requests than the pool holds, and the pool still serves."""
    client, _, _ = await session(max_connections=2)
    for _ in range(5):
        server.slow_started.clear()
        task = asyncio.create_task(client.request("GET", f"{server.url}/{endpoint}", what="x"))
        await asyncio.wait_for(server.slow_started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    answers = await asyncio.wait_for(
        asyncio.gather(
            *(client.request("POST", f"{server.url}/ok", body=i, what="after") for i in range(4))
        ),
        5,
    )
    assert [a.json()["echo"] for a in answers] == ["0", "1", "2", "3"]


async def test_closing_the_transport_under_a_request_does_not_hang_it(
    server: Server, session: SessionFactory
) -> None:
    _, sender, _ = await session()
    task = asyncio.create_task(sender.send("GET", f"{server.url}/slow", {}, None, "closing"))
    await asyncio.wait_for(server.slow_started.wait(), 5)
    await sender.aclose()
    with pytest.raises((Retryable, asyncio.CancelledError)):
        await asyncio.wait_for(task, 5)
