"""Request limits, in one ASGI middleware: no body is read past its limit, declared or streamed.

Forms (sign-in, sign-out, Start/Stop, the edit form) may carry `FORM_LIMIT` bytes, anything
else (`PUT .../config`, replay) `JSON_LIMIT`; a larger body is answered 413 with the limit before
the route reads it, and a body that turns out larger while it streams in stops being read there.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Bytes a form body may carry: the edit form of a large config is well under this.
FORM_LIMIT = 64 * 1024
#: Bytes any other body may carry (a config is a few KiB).
JSON_LIMIT = 1024 * 1024
#: Fields a form may carry, and files (none: no form of ours uploads one).
FORM_MAX_FIELDS, FORM_MAX_FILES = 500, 0
#: How deep a JSON body may nest (a config nests 6 deep).
JSON_MAX_DEPTH = 32
_FORMS = (b"application/x-www-form-urlencoded", b"multipart/form-data")


class BodyTooLarge(HTTPException):
    """A body past its limit; the answer names the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")
        self.limit = limit


def too_large_body(limit: int) -> dict[str, Any]:
    """The 413 answer's body, in the API's error shape."""
    return {
        "error": f"the request body is larger than the limit of {limit} bytes",
        "detail": {"limit_bytes": limit},
    }


def body_limit(scope: Scope) -> int:
    content_type = dict(scope.get("headers", ())).get(b"content-type", b"").lower()
    return FORM_LIMIT if content_type.startswith(_FORMS) else JSON_LIMIT


class RequestLimits:
    """Refuses a declared Content-Length over the limit at once, and stops a streamed body at
    the limit (the route sees `BodyTooLarge`, which the app answers 413)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _answer(
                    send, 400, {"error": "Content-Length is not a number", "detail": None}
                )
                return
            if length > limit:
                await _answer(send, 413, too_large_body(limit))
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


async def _answer(send: Send, status: int, body: dict[str, Any]) -> None:
    content = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def depth(value: Any) -> int:
    """How deep a parsed JSON value nests (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            stack += [
                (child, level) for child in (item.values() if isinstance(item, dict) else item)
            ]
    return deepest
