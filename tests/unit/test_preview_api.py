"""POST /api/v1/workflows/{name}/preview refuses bad requests with 4xx and the field, never 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from crmsync.control import openapi
from crmsync.control.auth import Authenticator, Role
from crmsync.control.server import create_app
from crmsync.streams.settings import Settings
from tests.unit.fake_supervisor import FakeSupervisor, factory

ADMIN = "an-admin-token-long-enough-for-the-check"
VIEWER = "a-viewer-token-long-enough-for-the-check"
PATH = "/api/v1/workflows/d365-to-campaign/preview"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    authenticator = Authenticator(ADMIN, [("watcher", Role.viewer, VIEWER)])
    app = create_app(Settings(), authenticator, factory(FakeSupervisor()))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://control",
            headers={"Authorization": f"Bearer {VIEWER}"},
        ) as client:
            yield client


async def _errors(client: httpx.AsyncClient, status: int, **kwargs: Any) -> Any:
    answer = await client.post(PATH, **kwargs)
    assert answer.status_code == status, answer.text
    return answer.json()


async def test_a_viewer_may_preview_with_or_without_a_body(client: httpx.AsyncClient) -> None:
    assert (await client.post(PATH)).status_code == 200
    assert (await client.post(PATH, json={"limit": 500})).status_code == 200


@pytest.mark.parametrize("limit", [0, 501, -3, "many", 2.5])
async def test_a_limit_out_of_range_is_422_naming_it(client: httpx.AsyncClient, limit: Any) -> None:
    body = await _errors(client, 422, json={"limit": limit})
    assert [e["loc"] for e in body["errors"]] == [["limit"]]


async def test_an_invalid_config_is_422_naming_its_field(client: httpx.AsyncClient) -> None:
    body = await _errors(client, 422, json={"config": {"mappings": "firstname"}})
    assert body["errors"][0]["loc"][:2] == ["config", "mappings"]
    body = await _errors(client, 422, json={"config": "not an object"})
    assert body["errors"][0]["loc"] == ["config"]


async def test_malformed_and_unknown_requests(client: httpx.AsyncClient) -> None:
    assert (await _errors(client, 400, content=b"{not json"))["error"]
    body = await _errors(client, 422, json={"limit": 5, "colour": "red"})
    assert [e["loc"] for e in body["errors"]] == [["colour"]]
    assert [e["loc"] for e in (await _errors(client, 422, json=[1]))["errors"]] == [[]]
    answer = await client.post("/api/v1/workflows/nope/preview", json={})
    assert answer.status_code == 404
    anonymous = await client.post(PATH, headers={"Authorization": ""})
    assert anonymous.status_code == 401


def test_the_openapi_document_describes_the_preview() -> None:
    operation = openapi.document()["paths"]["/api/v1/workflows/{name}/preview"]["post"]
    assert operation["x-role"] == "viewer"
    assert set(operation["responses"]) >= {"200", "400", "404", "422"}
