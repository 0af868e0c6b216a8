"""The emulators' per-request HTTP plumbing, kept lean: the API route first, the origin read
from the scope without building a URL, JSON by orjson."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(request: Request) -> str:
    """``scheme://host[:port]`` as the client addressed the server: Starlette's
    ``request.url.scheme`` and ``.netloc``, without parsing a URL built for the purpose."""
    scope = request.scope
    scheme = str(scope.get("scheme", "http"))
    for name, value in scope["headers"]:
        if name == b"host":
            return f"{scheme}://{value.decode('latin-1')}"
    server = scope.get("server")
    if server is None:
        return f"{scheme}://"
    host, port = server
    if port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def query_string(request: Request) -> str:
    """The raw query string (``request.url.query``)."""
    raw: bytes = request.scope.get("query_string", b"")
    return raw.decode("latin-1")


class JSONResponse(_StarletteJSONResponse):
    """Starlette's JSONResponse (compact, UTF-8) rendered by orjson, several times faster."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiFirst:
    """An emulator's app with its API route tried first: a request it matches goes straight to
    its endpoint, past Starlette's middleware and route scan (a good share of the CPU of a
    simple request); everything else (token, admin, drift endpoints) through ``app``.
    Starlette's router would pick the same endpoint for the same request: `Route.matches`
    decides here too."""

    def __init__(self, app: ASGIApp, route: Route) -> None:
        self.app = app
        self.route = route
        assert route.endpoint is not None
        self._endpoint: Callable[[Request], Awaitable[Response]] = route.endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match, child_scope = self.route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                response = await self._endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
