"""Bearer tokens and roles: 401 without a valid token, 403 below the needed role."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.control.auth import (
    Authenticator,
    Role,
    TokenError,
    parse_tokens,
    require,
    resolve_admin_token,
    stored_admin_token,
)
from crmsync.control.errors import Forbidden, Unauthenticated
from crmsync.control.server import banner, create_app
from crmsync.streams.settings import Settings
from tests.unit.fake_supervisor import FakeSupervisor, factory

ADMIN = "the-admin"
TOKENS = "ada:viewer:view-token,ops:operator:op:with:colons, root:admin:root-token"


def test_tokens_parse_with_roles_and_colons_in_the_token() -> None:
    assert parse_tokens(TOKENS) == [
        ("ada", Role.viewer, "view-token"),
        ("ops", Role.operator, "op:with:colons"),
        ("root", Role.admin, "root-token"),
    ]
    assert parse_tokens("") == []


@pytest.mark.parametrize("spec", ["ada:viewer", "ada:boss:x", ":viewer:x", "ada:viewer:"])
def test_malformed_token_lists_are_refused(spec: str) -> None:
    with pytest.raises(TokenError):
        parse_tokens(spec)


def test_authentication_and_roles() -> None:
    auth = Authenticator(ADMIN, parse_tokens(TOKENS))
    assert auth.authenticate(f"Bearer {ADMIN}").role is Role.admin
    assert auth.authenticate("bearer view-token").name == "ada"
    for header in (None, "", "Bearer", "Basic dmlldy10b2tlbg==", "Bearer nope", "view-token"):
        with pytest.raises(Unauthenticated):
            auth.authenticate(header)
    ops = auth.authenticate("Bearer op:with:colons")
    require(ops, Role.viewer)
    require(ops, Role.operator)
    with pytest.raises(Forbidden):
        require(ops, Role.admin)


def test_the_admin_token_is_kept_for_the_cli_and_the_next_start(tmp_path: Any) -> None:
    settings = Settings(home=tmp_path)
    first = resolve_admin_token(settings)
    assert len(first) >= 24
    assert resolve_admin_token(settings) == first
    assert (tmp_path / ".local/admin-token").stat().st_mode & 0o077 == 0
    chosen = Settings(home=tmp_path, admin_token=CHOSEN)  # type: ignore[arg-type]
    assert resolve_admin_token(chosen) == CHOSEN
    assert (tmp_path / ".local/admin-token").read_text().strip() == CHOSEN


CHOSEN = "a-chosen-admin-token-of-32-chars"


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("replace-me-with-a-long-random-string", "placeholder"),
        ("short-token", "at least 24"),
    ],
)
def test_an_empty_short_or_placeholder_admin_token_is_refused_at_start(
    tmp_path: Path, token: str, says: str
) -> None:
    settings = Settings(home=tmp_path, admin_token=token)  # type: ignore[arg-type]
    with pytest.raises(TokenError, match=says) as refused:
        resolve_admin_token(settings)
    assert token.strip() == "" or token not in str(refused.value)
    with pytest.raises(TokenError, match=says):
        Authenticator.from_settings(settings, token)


def test_short_or_placeholder_api_tokens_are_refused_at_start() -> None:
    for spec in ("ada:viewer:short", "ada:viewer:replace-me-with-a-long-random-string"):
        settings = Settings(api_tokens=spec)  # type: ignore[arg-type]
        with pytest.raises(TokenError, match="entry ada"):
            Authenticator.from_settings(settings, CHOSEN)


def test_an_empty_token_never_signs_anyone_in() -> None:
    """The page's login compared b"" with an empty admin token and let anyone in as admin."""
    with pytest.raises(TokenError):
        Authenticator("")
    assert Authenticator(CHOSEN).identify("") is None


def test_the_token_file_is_made_0600_in_a_0700_local_even_when_it_existed_0644(
    tmp_path: Path,
) -> None:
    local = tmp_path / ".local"
    local.mkdir(mode=0o755)
    (local / "admin-token").write_text("x" * 30)
    (local / "admin-token").chmod(0o644)
    settings = Settings(home=tmp_path, admin_token=CHOSEN)  # type: ignore[arg-type]
    resolve_admin_token(settings)
    assert stat.S_IMODE((local / "admin-token").stat().st_mode) == 0o600
    assert stat.S_IMODE(local.stat().st_mode) == 0o700


def test_a_token_file_open_to_others_is_not_read(tmp_path: Path) -> None:
    local = tmp_path / ".local"
    local.mkdir(mode=0o700)
    (local / "admin-token").write_text("y" * 30)
    (local / "admin-token").chmod(0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        resolve_admin_token(Settings(home=tmp_path))
    with pytest.raises(TokenError, match="chmod 600"):
        stored_admin_token(Settings(home=tmp_path))


def test_a_token_file_that_is_a_symlink_is_neither_followed_nor_written(tmp_path: Path) -> None:
    local = tmp_path / ".local"
    local.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("kept\n")
    (local / "admin-token").symlink_to(elsewhere)
    with pytest.raises(TokenError, match="link"):
        resolve_admin_token(Settings(home=tmp_path, admin_token=CHOSEN))  # type: ignore[arg-type]
    with pytest.raises(TokenError, match="link"):
        resolve_admin_token(Settings(home=tmp_path))
    assert elsewhere.read_text() == "kept\n"


@pytest.mark.parametrize("chosen", [True, False])
def test_the_banner_says_where_the_token_is_never_the_token(tmp_path: Path, chosen: bool) -> None:
    settings = Settings(home=tmp_path, admin_token=CHOSEN if chosen else None)  # type: ignore[arg-type]
    token = resolve_admin_token(settings)
    text = banner(settings)
    assert token not in text
    assert str(tmp_path / ".local/admin-token") in text


@pytest.fixture
async def api() -> AsyncIterator[tuple[httpx.AsyncClient, FakeSupervisor]]:
    fake = FakeSupervisor()
    auth = Authenticator(ADMIN, parse_tokens(TOKENS))
    app = create_app(Settings(), auth, factory(fake))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
            yield client, fake


async def test_the_api_answers_401_403_and_lets_the_right_role_act(
    api: tuple[httpx.AsyncClient, FakeSupervisor],
) -> None:
    client, fake = api
    missing = await client.get("/api/v1/workflows")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert set(missing.json()) == {"error", "detail"}
    wrong = await client.get("/api/v1/workflows", headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    stop = "/api/v1/workflows/opt-in-out/stop"
    put = "/api/v1/workflows/opt-in-out/config"
    viewer = {"Authorization": "Bearer view-token"}
    assert (await client.get("/api/v1/workflows", headers=viewer)).status_code == 200
    refused = await client.post(stop, headers=viewer)
    assert refused.status_code == 403
    assert refused.json()["error"] == "ada is a viewer; this needs operator"
    operator = {"Authorization": "Bearer op:with:colons"}
    assert (await client.post(stop, headers=operator)).status_code == 202
    assert (await client.put(put, headers=operator, json={})).status_code == 403
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert (await client.put(put, headers=admin, json={})).status_code == 200
    assert fake.actions == [("stop", "opt-in-out", "ops"), ("edit", "opt-in-out", "admin")]


async def test_open_routes_need_no_token(api: tuple[httpx.AsyncClient, FakeSupervisor]) -> None:
    client, _ = api
    assert (await client.get("/healthz")).json() == {"status": "ok", "detail": None}
    assert (await client.get("/openapi.json")).json()["openapi"].startswith("3.")
    assert (await client.get("/metrics")).status_code == 200


async def test_malformed_requests_are_4xx_in_the_error_shape(
    api: tuple[httpx.AsyncClient, FakeSupervisor],
) -> None:
    client, _ = api
    admin = {"Authorization": f"Bearer {ADMIN}"}
    put = "/api/v1/workflows/opt-in-out/config"
    assert (await client.put(put, headers=admin, content=b"{not json")).status_code == 400
    assert (await client.put(put, headers=admin, content=b"\xff\xfe")).status_code == 400
    listed = await client.put(put, headers=admin, json=[1, 2])
    assert listed.status_code == 422
    assert listed.json()["errors"] == [{"loc": [], "msg": "a config is a JSON object"}]
    for limit in ("x", "0", "100000", "-1"):
        answer = await client.get(f"/api/v1/audit?limit={limit}", headers=admin)
        assert answer.status_code == 400, limit
        assert "limit" in answer.json()["error"]
    assert (await client.delete("/api/v1/workflows", headers=admin)).status_code == 405
    assert (await client.get("/api/v1/nothing", headers=admin)).status_code == 404


def test_the_stack_description_and_up_json_hold_no_token_and_are_owner_only(
    tmp_path: Path,
) -> None:
    from crmsync.control.stack import LocalStack, pid_file, write_pid_file

    settings = Settings(home=tmp_path)
    local = LocalStack(settings)
    local.admin_token = resolve_admin_token(settings)
    write_pid_file(settings, local)
    kept = pid_file(settings)
    assert local.admin_token not in kept.read_text()
    assert local.admin_token not in str(local.describe())
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
