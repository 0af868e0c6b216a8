"""What the emulators read of a request's ASGI scope on every call, without building a URL."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSONResponse

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
