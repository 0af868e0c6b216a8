"""Retry, throttling and token-caching machinery shared by the Dynamics and Campaign clients."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_before_delay,
)

from crmsync.targets._transport import Response, Transport
from crmsync.targets.errors import Fatal, Halted, Retryable, SinkError
from crmsync.targets.retry import backoff

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Statuses the target API documents as transient (notes/target-apis.md, "Retrying").
TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a client keeps retrying a transient failure before it reports ``Retryable``.

    The bound is deliberate: the workflow runtime must stay able to stop a worker, so a client gives
    up after ``attempts`` tries or once the next wait would pass ``budget_s`` seconds, and hands the
    record back as ``Retryable(retry_after=...)``; the runtime then retries for as long as it runs.
    Between tries it waits what the server asked (``Retry-After``), else a capped exponential
    backoff with jitter (``crmsync.targets.retry.backoff``).
    """

    attempts: int = 6
    budget_s: float = 30.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 10.0

    def backoff(self, attempt: int) -> float:
        """The wait after failed try number ``attempt`` (1-based) when the server named none."""
        return backoff(attempt, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s)

    def wait(self, state: RetryCallState) -> float:
        """tenacity wait strategy: the server's Retry-After when it gave one, else backoff."""
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, Retryable) and error.retry_after is not None:
            return float(error.retry_after)
        return self.backoff(state.attempt_number)


async def with_retries(policy: RetryPolicy, call: Callable[[], Awaitable[T]], what: str) -> T:
    """Run ``call`` until it stops raising ``Retryable`` or the policy's bound is reached.

    ``RecordRejected``, ``Fatal`` and ``Halted`` pass through at once; the last ``Retryable`` is
    re-raised.
    The first try is a plain call: most requests succeed at once, and tenacity's bookkeeping
    (state objects, an async generator) is only set up once one has failed.
    """
    started = time.monotonic()
    try:
        return await call()
    except Retryable as error:
        if policy.attempts <= 1 or isinstance(error, Halted):
            raise
        failed: Retryable | None = error

    async def again() -> T:
        nonlocal failed
        if failed is not None:  # tenacity's first attempt is the one that just failed
            error, failed = failed, None
            raise error
        return await call()

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait_s = state.next_action.sleep if state.next_action else 0.0
        log.info(
            "retrying what=%s attempt=%d wait_s=%.2f reason=%s",
            what,
            state.attempt_number,
            wait_s,
            error,
            extra={"what": what, "attempt": state.attempt_number, "wait_s": wait_s},
        )

    # The budget counts from the first try, which ran before tenacity's clock started.
    budget_s = max(0.0, policy.budget_s - (time.monotonic() - started))
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts) | stop_before_delay(budget_s),
        wait=policy.wait,
        retry=retry_if_exception_type(Retryable) & retry_if_not_exception_type(Halted),
        before_sleep=before_sleep,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await again()
    raise AssertionError("unreachable: tenacity re-raises the last error")


#: The longest wait a ``Retry-After`` may ask for: a server (or a proxy in between) answering
#: ``Retry-After: 1e12`` must not park a workflow for ever; past it the policy's backoff applies.
MAX_RETRY_AFTER_S = 300.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None;
    at most ``MAX_RETRY_AFTER_S``."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


class Throttle:
    """A client-wide gate: a concurrency cap that can be lowered, and a pause after a 429.

    Both APIs throttle per user, so when one request hears 429 every request of the client waits
    until ``Retry-After`` has passed instead of burning the quota with requests sure to fail.
    The cap is a FIFO semaphore (thousands of queued requests wake one at a time); lowering it
    takes permits out of circulation as they come free.
    """

    def __init__(self, max_concurrency: int) -> None:
        self.max_concurrency = max_concurrency
        self._cap = max_concurrency
        self._permits = asyncio.Semaphore(max_concurrency)
        self._debt = 0  # permits still to withdraw after a lowered cap
        self._withdrawn = 0  # permits held back from circulation
        self._paused_until = 0.0  # time.monotonic()
        self._holds = 0  # hold() calls not released yet: held while any

    @property
    def cap(self) -> int:
        return self._cap

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())

    def pause(self, seconds: float) -> None:
        """Hold every request of this client for ``seconds`` (never shortens a longer pause)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def hold(self) -> None:
        """No request starts until as many ``release``s: those waiting for a slot, and new
        ones, raise ``Halted``; requests already sent go on to their answer."""
        self._holds += 1

    def release(self) -> None:
        self._holds = max(0, self._holds - 1)

    async def set_cap(self, cap: int) -> None:
        """Follow the server's parallelism hint, never above the configured maximum."""
        cap = max(1, min(self.max_concurrency, cap))
        delta, self._cap = cap - self._cap, cap
        if delta < 0:
            self._debt -= delta
            while self._debt and not self._permits.locked():  # free permits go at once
                await self._permits.acquire()
                self._debt -= 1
                self._withdrawn += 1
            return
        cancelled = min(delta, self._debt)
        self._debt -= cancelled
        for _ in range(min(delta - cancelled, self._withdrawn)):
            self._withdrawn -= 1
            self._permits.release()

    def _release(self) -> None:
        if self._debt:
            self._debt -= 1
            self._withdrawn += 1
        else:
            self._permits.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot and for any pause to end; hold the slot for one request."""
        if self._holds:
            raise Halted(_HALTED)
        await self._permits.acquire()
        try:
            # A 429 may arrive while we wait, so check again after every sleep.
            while True:
                wait_s = self.paused_for
                if wait_s <= 0:
                    break
                await asyncio.sleep(wait_s)
            if self._holds:
                raise Halted(_HALTED)
            yield
        finally:
            self._release()


_HALTED = "not sent: the workflow is stopping"


class TokenCache:
    """One bearer token shared by all requests of a client, fetched again before it expires.

    ``fetch`` returns ``(token, lifetime_s)``. Concurrent callers share one fetch; after a 401 the
    caller asks for a refresh of the token it used, so a burst of 401s yields a single new token.
    """

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]]) -> None:
        self._fetch = fetch
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        token = self._token
        if token is not None and time.monotonic() < self._refresh_at:
            return token
        async with self._lock:
            if self._token is None or time.monotonic() >= self._refresh_at:
                await self._renew()
            assert self._token is not None
            return self._token

    async def refresh(self, stale: str) -> str:
        """A new token unless someone already replaced ``stale``."""
        async with self._lock:
            if self._token is None or self._token == stale:
                await self._renew()
            assert self._token is not None
            return self._token

    def forget(self) -> None:
        self._token = None

    async def _renew(self) -> None:
        token, lifetime = await self._fetch()
        # Renew ahead of expiry (5 min for hour-long tokens), so no request carries a dying token.
        margin = min(300.0, lifetime / 10)
        self._token = token
        self._refresh_at = time.monotonic() + lifetime - margin


def short(text: str, limit: int = 500) -> str:
    """A server message trimmed for an error reason or a log line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Session:
    """Requests to one API through one transport: bearer token, throttle, bounded retries.

    ``transient`` says which answers are worth another try (each API has its own view of a 500).
    A 401 gets one new token and one more try, then it is ``Fatal``. A 429 pauses the whole
    client for ``Retry-After``; ``x-ms-dop-hint`` (Dataverse) lowers the concurrency cap.
    """

    def __init__(
        self,
        name: str,
        http: Transport,
        tokens: TokenCache,
        throttle: Throttle,
        retry: RetryPolicy,
        transient: Callable[[Response], Retryable | None],
    ) -> None:
        self.name = name
        self.http = http
        self.tokens = tokens
        self.throttle = throttle
        self.retry = retry
        self._transient = transient

    async def send_once(
        self, method: str, url: str, headers: Mapping[str, str], content: bytes | None, what: str
    ) -> Response:
        """One request (plus one more with a new token after a 401); transient answers raise."""
        token = await self.tokens.get()
        for refreshed in (False, True):
            async with self.throttle.slot():
                response = await self.http.send(
                    method, url, {**headers, "Authorization": f"Bearer {token}"}, content, what
                )
            await self._observe(response)
            if response.status_code != 401:
                break
            if refreshed:
                raise Fatal(f"{what}: credentials refused after a token refresh: HTTP 401")
            log.info("token refused, refreshing api=%s what=%s", self.name, what)
            token = await self.tokens.refresh(token)
        transient = self._transient(response)
        if transient is not None:
            raise prefixed(transient, what)  # keeps the subclass (a Campaign server fault)
        return response

    async def _observe(self, response: Response) -> None:
        if response.status_code == 429:
            pause = parse_retry_after(response.headers.get("retry-after"))
            pause = self.retry.backoff_base_s if pause is None else pause
            self.throttle.pause(pause)
            log.warning("throttled api=%s pause_s=%.2f", self.name, pause)
        hint = response.headers.get("x-ms-dop-hint")
        if hint and hint.isdigit() and int(hint) < self.throttle.cap:
            log.info("lowering concurrency api=%s cap=%s", self.name, hint)
            await self.throttle.set_cap(int(hint))

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        what: str,
        retry: RetryPolicy | None = None,
    ) -> Response:
        """A request retried within the policy; non-transient answers are returned as they are."""
        all_headers = dict(headers or {})
        if body is not None:
            content = json_bytes(body)
            all_headers["Content-Type"] = "application/json"
        return await with_retries(
            retry or self.retry,
            lambda: self.send_once(method, url, all_headers, content, what),
            what,
        )


def prefixed(error: SinkError, what: str) -> SinkError:
    """The same failure, its reason prefixed with what was being done."""
    reason = f"{what}: {error.reason}"
    if isinstance(error, Retryable):
        return type(error)(reason, error.retry_after)  # keeps ParentMissing a ParentMissing
    return type(error)(reason)


def json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
