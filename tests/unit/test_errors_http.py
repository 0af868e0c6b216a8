"""Every refusal answers the same HTTP status from the API and from the page: one mapping."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from crmsync.control.auth import Authenticator
from crmsync.control.errors import (
    BadRequest,
    Conflict,
    ControlError,
    Forbidden,
    Invalid,
    TooManyAttempts,
    Unauthenticated,
    Unavailable,
    UnknownWorkflow,
)
from crmsync.control.server import create_app
from crmsync.streams.settings import Settings
from tests.unit.fake_supervisor import FakeSupervisor, factory

ADMIN = "an-admin-token-long-enough-for-the-check"
BEARER = {"Authorization": f"Bearer {ADMIN}"}
REFUSALS: list[tuple[ControlError, int]] = [
    (BadRequest("malformed"), 400),
    (Unauthenticated("who are you"), 401),
    (Forbidden("not you"), 403),
    (UnknownWorkflow("no such workflow"), 404),
    (Conflict("already running"), 409),
    (Invalid("invalid", [{"loc": ["x"], "msg": "bad"}]), 422),
    (TooManyAttempts("slow down", 30), 429),
    (Unavailable("Kafka is away"), 503),
]


@pytest.fixture
async def signed_in() -> AsyncIterator[tuple[httpx.AsyncClient, FakeSupervisor]]:
    """A client holding both the bearer token and a signed-in page session."""
    fake = FakeSupervisor()
    app = create_app(Settings(), Authenticator(ADMIN), factory(fake))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
            form = (await client.get("/login")).text
            found = re.search(r'name="csrf" value="([^"]+)"', form)
            assert found is not None
            login = await client.post("/login", data={"csrf": found[1], "token": ADMIN})
            assert login.status_code == 303, login.text
            yield client, fake


async def _page_csrf(client: httpx.AsyncClient) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', (await client.get("/")).text)
    assert found is not None
    return found[1]


@pytest.mark.parametrize(("error", "status"), REFUSALS, ids=lambda v: type(v).__name__)
async def test_the_api_and_the_page_answer_the_same_status_for_the_same_refusal(
    signed_in: tuple[httpx.AsyncClient, FakeSupervisor], error: ControlError, status: int
) -> None:
    client, fake = signed_in
    csrf = await _page_csrf(client)
    fake.refuse = error
    api_list = await client.get("/api/v1/workflows", headers=BEARER)
    page_list = await client.get("/workflows.json")
    api_stop = await client.post("/api/v1/workflows/opt-in-out/stop", headers=BEARER)
    page_stop = await client.post(
        "/workflows/opt-in-out/stop", data={"csrf": csrf}, headers={"Accept": "application/json"}
    )
    page_edit = await client.get("/workflows/opt-in-out/edit")
    answers = [api_list, page_list, api_stop, page_stop, page_edit]
    assert [a.status_code for a in answers] == [status] * len(answers)
    for answer in answers[:4]:
        assert answer.json()["error"] == error.message
    assert error.message in page_edit.text
