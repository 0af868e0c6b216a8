"""Bearer tokens and their roles (viewer < operator < admin), compared in constant time."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from crmsync.control.errors import Forbidden, Unauthenticated
from crmsync.streams.settings import Settings


class Role(IntEnum):
    """Each role may do what the roles below it may."""

    viewer = 1
    operator = 2
    admin = 3


@dataclass(frozen=True)
class Principal:
    """Who called: the token's name and role (never the token itself)."""

    name: str
    role: Role


@dataclass(frozen=True)
class _Token:
    principal: Principal
    secret: bytes


class TokenError(ValueError):
    """CRMSYNC_API_TOKENS is malformed."""


def parse_tokens(spec: str) -> list[tuple[str, Role, str]]:
    """`name:role:token,...` → [(name, role, token)]; the token may itself contain ':'."""
    tokens = []
    for index, item in enumerate(part.strip() for part in spec.split(",")):
        if not item:
            continue
        fields = item.split(":", 2)
        if len(fields) != 3 or not fields[0] or not fields[2]:
            raise TokenError(f"CRMSYNC_API_TOKENS entry {index + 1}: expected name:role:token")
        name, role, token = fields
        if role not in Role.__members__:
            raise TokenError(
                f"CRMSYNC_API_TOKENS entry {index + 1} ({name}): role must be viewer, operator"
                f" or admin, got {role!r}"
            )
        tokens.append((name, Role[role], token))
    return tokens


class Authenticator:
    """Knows every valid token; checks a request's Authorization header and a role."""

    def __init__(self, admin_token: str, more: Sequence[tuple[str, Role, str]] = ()) -> None:
        self._tokens = [_Token(Principal("admin", Role.admin), admin_token.encode())]
        self._tokens += [_Token(Principal(n, r), t.encode()) for n, r, t in more]

    @classmethod
    def from_settings(cls, settings: Settings, admin_token: str) -> Authenticator:
        spec = settings.api_tokens.get_secret_value() if settings.api_tokens else ""
        return cls(admin_token, parse_tokens(spec))

    def identify(self, token: str) -> Principal | None:
        """The token's principal; every known token is compared, so timing tells nothing."""
        given = token.encode()
        found = None
        for known in self._tokens:
            if hmac.compare_digest(given, known.secret) and found is None:
                found = known.principal
        return found

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of an `Authorization: Bearer <token>` header, or Unauthenticated."""
        if not authorization:
            raise Unauthenticated("a bearer token is required")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("use an Authorization: Bearer <token> header")
        principal = self.identify(token.strip())
        if principal is None:
            raise Unauthenticated("the token is not valid", invalid_token=True)
        return principal


def require(principal: Principal, role: Role) -> None:
    if principal.role < role:
        raise Forbidden(
            f"{principal.name} is a {principal.role.name}; this needs {role.name}",
            {"role": principal.role.name, "needed": role.name},
        )


def admin_token_file(settings: Settings) -> Path:
    return settings.local_dir / "admin-token"


def resolve_admin_token(settings: Settings) -> str:
    """CRMSYNC_ADMIN_TOKEN, else the one kept in .local/admin-token, else a new random one
    (then kept there, readable by the owner only, so the CLI and a restart find it)."""
    path = admin_token_file(settings)
    if settings.admin_token is not None:
        token = settings.admin_token.get_secret_value()
    elif path.exists() and path.read_text().strip():
        return path.read_text().strip()
    else:
        token = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(token + "\n")
    return token


def stored_admin_token(settings: Settings) -> str | None:
    """What the CLI sends: CRMSYNC_ADMIN_TOKEN, else .local/admin-token."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = admin_token_file(settings)
    if path.exists():
        return path.read_text().strip() or None
    return None
