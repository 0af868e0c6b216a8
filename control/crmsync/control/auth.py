"""Bearer tokens and their roles (viewer < operator < admin), compared in constant time."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from crmsync.control.errors import Forbidden, Unauthenticated
from crmsync.control.secret_files import SecretFileError, read_secret, write_secret
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


#: A token shorter than this is refused at start: guessable, or a value typed by hand.
MIN_TOKEN_LENGTH = 24
#: Values our own files show as "put a token here" (deploy/k8s, docs): never a live token.
PLACEHOLDERS = frozenset(
    {
        "replace-me-with-a-long-random-string",
        "replace-me",
        "change-me",
        "changeme",
        "secret",
        "token",
    }
)


class TokenError(ValueError):
    """A token setting is malformed, empty, too short or a placeholder."""


def check_token(what: str, token: str) -> str:
    """`token` if it may be used; else TokenError naming `what` (never the token itself)."""
    if not token.strip():
        raise TokenError(f"{what} is empty: set it to a long random string")
    if token.strip().lower() in PLACEHOLDERS:
        raise TokenError(f"{what} is the placeholder from the examples: set a random one")
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(
            f"{what} has {len(token)} characters; at least {MIN_TOKEN_LENGTH} are needed "
            "(e.g. `openssl rand -hex 24`)"
        )
    return token


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
        if not admin_token or any(not token for _, _, token in more):
            raise TokenError("an empty token would let anyone in")
        self._key = secrets.token_bytes(32)
        self._tokens = [_Token(Principal("admin", Role.admin), admin_token.encode())]
        self._tokens += [_Token(Principal(n, r), t.encode()) for n, r, t in more]

    @classmethod
    def from_settings(cls, settings: Settings, admin_token: str) -> Authenticator:
        spec = settings.api_tokens.get_secret_value() if settings.api_tokens else ""
        more = parse_tokens(spec)
        check_token("the admin token", admin_token)
        for name, _, token in more:
            check_token(f"CRMSYNC_API_TOKENS entry {name}", token)
        return cls(admin_token, more)

    def fingerprint(self, token: str) -> str:
        """What a server-side session keeps of the token that opened it (a keyed hash)."""
        return hmac.new(self._key, token.encode(), "sha256").hexdigest()

    def by_fingerprint(self, fingerprint: str) -> Principal | None:
        """The principal of the token with that fingerprint, None once no such token is known."""
        found = None
        for known in self._tokens:
            mine = hmac.new(self._key, known.secret, "sha256").hexdigest()
            if hmac.compare_digest(mine, fingerprint) and found is None:
                found = known.principal
        return found

    def identify(self, token: str) -> Principal | None:
        """The token's principal; every known token is compared, so timing tells nothing."""
        given = token.encode()
        if not given:
            return None
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


def token_whereabouts(settings: Settings) -> str:
    """Where the admin token is kept, for banners: the token itself is never printed."""
    kept = admin_token_file(settings)
    if settings.admin_token is not None:
        return f"from CRMSYNC_ADMIN_TOKEN (also kept in {kept}, owner-only)"
    return f"in {kept} (owner-only): TOKEN=$(cat {kept})"


def resolve_admin_token(settings: Settings) -> str:
    """CRMSYNC_ADMIN_TOKEN, else the one kept in .local/admin-token, else a new random one
    (then kept there, 0600 in a 0700 .local/, so the CLI and a restart find it). A token that
    is empty, short or a placeholder is a TokenError: nobody signs in with it."""
    path = admin_token_file(settings)
    if settings.admin_token is not None:
        token = check_token("CRMSYNC_ADMIN_TOKEN", settings.admin_token.get_secret_value())
    else:
        kept = _read_token_file(path)
        if kept:
            return check_token(str(path), kept)
        token = secrets.token_urlsafe(32)
    try:
        write_secret(path, token + "\n", private=settings.local_dir)
    except SecretFileError as error:
        raise TokenError(str(error)) from None
    return token


def stored_admin_token(settings: Settings) -> str | None:
    """What the CLI sends: CRMSYNC_ADMIN_TOKEN, else .local/admin-token."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    return _read_token_file(admin_token_file(settings)) or None


def _read_token_file(path: Path) -> str:
    try:
        return (read_secret(path) or "").strip()
    except SecretFileError as error:
        raise TokenError(str(error)) from None
