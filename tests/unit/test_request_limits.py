"""No request can exhaust the control plane: bodies stop at their limit (413 naming it), forms
take no files and a bounded number of fields, JSON nests at most 32 deep (else 400, not 500)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from crmsync.control.auth import Authenticator
from crmsync.control.limits import FORM_LIMIT, JSON_LIMIT
from crmsync.control.server import create_app
from crmsync.streams.settings import Settings
from tests.unit.fake_supervisor import FakeSupervisor, factory

ADMIN = "limits-admin-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {ADMIN}"}
PUT = "/api/v1/workflows/opt-in-out/config"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(), Authenticator(ADMIN), factory(FakeSupervisor()))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
            yield http


def _too_large(answer: httpx.Response, limit: int) -> None:
    assert answer.status_code == 413, answer.text
    assert answer.json()["detail"] == {"limit_bytes": limit}
    assert str(limit) in answer.json()["error"]


async def test_an_unauthenticated_login_post_past_the_form_limit_is_refused_unread(
    client: httpx.AsyncClient,
) -> None:
    body = b"token=" + b"a" * (FORM_LIMIT + 1)
    headers = {"content-type": "application/x-www-form-urlencoded"}
    _too_large(await client.post("/login", content=body, headers=headers), FORM_LIMIT)


async def test_a_streamed_body_without_a_length_stops_at_the_limit(
    client: httpx.AsyncClient,
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(10_000):  # 640 MB if it were all read
            sent += 1
            yield b"x" * 65536

    headers = {"content-type": "application/x-www-form-urlencoded"}
    _too_large(await client.post("/login", content=chunks(), headers=headers), FORM_LIMIT)
    assert sent < 10, f"{sent} chunks were read"


async def test_a_multipart_logout_with_a_file_is_refused_before_it_is_spooled(
    client: httpx.AsyncClient,
) -> None:
    small = await client.post("/logout", files={"upload": ("a.bin", b"x" * 100)})
    assert small.status_code == 400, small.text
    big = await client.post("/logout", files={"upload": ("a.bin", b"x" * 10_000_000)})
    _too_large(big, FORM_LIMIT)


async def test_too_many_form_fields_are_a_400(client: httpx.AsyncClient) -> None:
    fields = "&".join(f"f{n}=1" for n in range(600))
    headers = {"content-type": "application/x-www-form-urlencoded"}
    answer = await client.post("/login", content=fields, headers=headers)
    assert answer.status_code == 400, answer.text


async def test_a_config_past_the_json_limit_is_a_413(client: httpx.AsyncClient) -> None:
    body = json.dumps({"padding": "x" * JSON_LIMIT}).encode()
    _too_large(await client.put(PUT, content=body, headers=BEARER), JSON_LIMIT)


@pytest.mark.parametrize("levels", [33, 100_000])
async def test_deeply_nested_json_is_a_400_not_a_500(
    client: httpx.AsyncClient, levels: int
) -> None:
    body = b'{"a":' * levels + b"1" + b"}" * levels
    answer = await client.put(PUT, content=body, headers=BEARER)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"] == {"max_depth": 32}


async def test_a_config_within_the_limits_is_still_taken(client: httpx.AsyncClient) -> None:
    assert (await client.put(PUT, json={}, headers=BEARER)).status_code == 200
