"""The HTTP transports the target clients send through: aiohttp (the default) or httpx.

A transport sends one request and reads its answer whole into a ``Response``; a network failure
or a timeout comes out as ``Retryable``, a request that can never be sent (a malformed URL) as
``Fatal``. Everything above it — tokens, throttling, retries, classification — is the same for
both (``crmsync.targets._http.Session``).

aiohttp is the default because of what a request costs the worker: httpx's connection pool
(httpcore) scans every connection for every request, several times the CPU of the request itself
(``bench/http_clients.py`` measures both against the emulator).
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import quote
from urllib.request import getproxies, proxy_bypass

import aiohttp
import httpx
import yarl

from crmsync.targets.errors import Fatal, Retryable

HttpClient = Literal["aiohttp", "httpx"]

#: Idle connections are closed by the client before the server would: uvicorn (the emulators)
#: closes them after 5 s, and a request sent on a connection the server is closing fails.
KEEPALIVE_S = 4.0


@dataclass(frozen=True, slots=True)
class Response:
    """A target's answer, read whole. ``headers`` have lower-case names (repeated headers joined
    with ", "), as the classifiers and the ``$batch`` parser expect."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(_charset(self.headers.get("content-type")), errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


_CHARSET = re.compile(r"charset=\"?([\w.:-]+)", re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def _charset(content_type: str | None) -> str:
    found = _CHARSET.search(content_type or "")
    if found is None:
        return "utf-8"
    try:
        return codecs.lookup(found.group(1)).name
    except LookupError:
        return "utf-8"


class Transport(Protocol):
    """Sends one request; raises ``Retryable`` (network, timeout) or ``Fatal`` (unsendable)."""

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None,
        what: str,
    ) -> Response: ...

    async def aclose(self) -> None: ...


def transport(
    client: HttpClient,
    *,
    timeout_s: float,
    max_connections: int,
    headers: Mapping[str, str],
) -> Transport:
    """The transport a target's settings name, with its default headers and connection cap."""
    if client == "httpx":
        return HttpxTransport(timeout_s=timeout_s, max_connections=max_connections, headers=headers)
    return AiohttpTransport(timeout_s=timeout_s, max_connections=max_connections, headers=headers)


def tls_context() -> ssl.SSLContext:
    """One TLS context for every client of the process (building one loads the CA bundle, some
    milliseconds): httpx's defaults — certifi's CAs, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when
    set — so both transports verify servers alike. Kept per value of those two variables, so a
    bundle named after the first client was made is still honoured."""
    return _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return httpx.create_ssl_context()


def transport_error(error: httpx.HTTPError, what: str) -> Retryable | Fatal:
    """httpx: network errors and timeouts are transient; a malformed URL or protocol misuse is
    not."""
    reason = f"{what}: {type(error).__name__}: {error}"
    if isinstance(error, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return Fatal(reason)
    if isinstance(error, httpx.TransportError):
        return Retryable(reason)
    return Fatal(reason)


def aiohttp_error(error: aiohttp.ClientError | OSError, what: str) -> Retryable | Fatal:
    """aiohttp: the same split as httpx's. A timeout, a refused or dropped connection, a TLS
    handshake that failed, a malformed answer: transient. A URL that cannot be sent: fatal."""
    reason = f"{what}: {type(error).__name__}: {error}"
    if isinstance(error, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return Fatal(reason)
    if isinstance(
        error,
        TimeoutError
        | OSError
        | aiohttp.ClientConnectionError
        | aiohttp.ClientPayloadError
        | aiohttp.ClientResponseError,
    ):
        return Retryable(reason)
    return Fatal(reason)


#: Characters a URL may carry as they are; anything else (a space, non-ASCII) is percent-encoded,
#: as httpx does. Existing escapes are kept: they are the caller's (an alternate key's value).
_URL_AS_IS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*\Z")
_URL_SAFE = "-._~:/?#[]@!$&'()*+,;=%"


def _wire_url(url: str) -> yarl.URL:
    if _URL_AS_IS.match(url) is None:
        url = quote(url, safe=_URL_SAFE)
    return yarl.URL(url, encoded=True)


class AiohttpTransport:
    """One aiohttp session per client, made on the loop of its first request.

    Redirects are not followed (httpx's default, and a target's redirect is not an answer);
    proxies follow the environment (``HTTPS_PROXY``, ``NO_PROXY``...) like httpx's
    ``trust_env``, read once per host: aiohttp's own ``trust_env`` reads them, and ``.netrc``,
    in a worker thread on every request, two thread hops that cost more CPU than the request
    itself. A request
    cancelled mid-flight (a write abandoned by a stop or a revoke fence) closes its connection,
    so no half-read answer is ever handed to the next request; the cancellation propagates.
    """

    def __init__(
        self, *, timeout_s: float, max_connections: int, headers: Mapping[str, str]
    ) -> None:
        # httpx's timeout=N means N for connect, for each read and for a free connection; so
        # here, and no cap on the whole exchange (a large `$batch` may take longer).
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
        )
        self._max_connections = max_connections
        self._headers = dict(headers)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._proxies: dict[tuple[str, str], str | None] = {}

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the client was closed")  # as httpx's
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_S,
            ssl=tls_context(),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers=self._headers,
            auto_decompress=True,
        )
        return self._session

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None,
        what: str,
    ) -> Response:
        session = self._session or self._open()
        try:
            wire = _wire_url(url)
            async with session.request(
                method,
                wire,
                headers=headers,
                data=content,
                allow_redirects=False,
                proxy=self._proxy(wire),
            ) as answer:
                body = await answer.read()
                return Response(answer.status, _lower(answer.headers), body)
        except (aiohttp.ClientError, OSError) as error:  # TimeoutError is an OSError
            raise aiohttp_error(error, what) from error
        except ValueError as error:  # yarl/aiohttp refusing a URL or a header value
            raise Fatal(f"{what}: {type(error).__name__}: {error}") from error

    def _proxy(self, url: yarl.URL) -> str | None:
        place = (url.scheme, url.host or "")
        if place not in self._proxies:
            proxy = getproxies().get(url.scheme)
            self._proxies[place] = None if proxy is None or proxy_bypass(place[1]) else proxy
        return self._proxies[place]

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        lowered[key] = f"{lowered[key]}, {value}" if key in lowered else value
    return lowered


class HttpxTransport:
    """httpx's pooled client (HTTP/1.1), kept as an option (``http_client="httpx"``)."""

    def __init__(
        self, *, timeout_s: float, max_connections: int, headers: Mapping[str, str]
    ) -> None:
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_S,
        )
        self._client = httpx.AsyncClient(
            timeout=timeout_s, limits=limits, headers=dict(headers), verify=tls_context()
        )

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None,
        what: str,
    ) -> Response:
        try:
            answer = await self._client.request(method, url, content=content, headers=headers)
        except httpx.HTTPError as error:
            raise transport_error(error, what) from error
        return Response(answer.status_code, dict(answer.headers), answer.content)

    async def aclose(self) -> None:
        await self._client.aclose()
