"""Bearer tokens of the emulators: HS256 JWTs signed with a stored key, so they survive restarts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

_CHECKED_TOKENS = 4096


class TokenProblem(StrEnum):
    MISSING = "missing"
    INVALID = "invalid"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Grant:
    """What a valid token says: who holds it."""

    client_id: str
    issued_at: float
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenIssuer:
    """Issues and checks tokens; `revoke_all` invalidates every token issued so far."""

    def __init__(self, key: bytes, issuer: str, audience: str, lifetime_s: float) -> None:
        self._key = key
        self.issuer = issuer
        self.audience = audience
        self.lifetime_s = lifetime_s
        self._revoked_before = 0.0
        #: Tokens whose signature and audience were checked once: a client sends the same one
        #: for an hour. Revocation and expiry are still checked on every use.
        self._checked: dict[str, Grant] = {}

    @staticmethod
    def new_key() -> str:
        return secrets.token_hex(32)

    def issue(self, client_id: str) -> tuple[str, int]:
        """A new token and its lifetime in whole seconds."""
        now = time.time()
        lifetime = int(self.lifetime_s)
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "appid": client_id,
            "iat": now,
            "exp": now + self.lifetime_s,
            "jti": str(uuid.uuid4()),
        }
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{head}.{body}.{self._sign(f'{head}.{body}')}", lifetime

    def revoke_all(self) -> None:
        self._revoked_before = time.time()

    def check(self, authorization: str | None) -> Grant | TokenProblem:
        if not authorization:
            return TokenProblem.MISSING
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return TokenProblem.INVALID
        token = token.strip()
        grant = self._checked.get(token)
        if grant is None:
            checked = self._verify(token)
            if not isinstance(checked, Grant):
                return checked
            if len(self._checked) >= _CHECKED_TOKENS:
                self._checked.clear()
            self._checked[token] = grant = checked
        if grant.issued_at <= self._revoked_before:
            return TokenProblem.REVOKED
        if grant.expires_at <= time.time():
            return TokenProblem.EXPIRED
        return grant

    def _verify(self, token: str) -> Grant | TokenProblem:
        """The grant of a token signed with our key for our audience (expired or not)."""
        parts = token.split(".")
        if len(parts) != 3 or not hmac.compare_digest(
            self._sign(f"{parts[0]}.{parts[1]}"), parts[2]
        ):
            return TokenProblem.INVALID
        try:
            claims = json.loads(_unb64(parts[1]))
            grant = Grant(str(claims["appid"]), float(claims["iat"]), float(claims["exp"]))
        except (ValueError, KeyError, TypeError):
            return TokenProblem.INVALID
        if claims.get("aud") != self.audience:
            return TokenProblem.INVALID
        return grant

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())
