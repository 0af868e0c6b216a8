"""Failed sign-ins and bearer tokens counted per client: past a few a minute, 429 for a while."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from crmsync.control.errors import TooManyAttempts

#: Failed attempts one client may make within the window before it is refused.
MAX_FAILURES, WINDOW_S = 10, 60.0
#: Clients remembered at most (the oldest are forgotten first): memory stays bounded.
_MAX_CLIENTS = 10_000


class FailureThrottle:
    """A sliding window of failed attempts per client address."""

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max, self._window, self._clock = max_failures, window_s, clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float]:
        now = self._clock()
        failures = self._failures.get(client, deque())
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        return failures

    def check(self, client: str) -> None:
        """TooManyAttempts while `client` has failed too often within the window."""
        failures = self._recent(client)
        if len(failures) >= self._max:
            wait = max(1, round(failures[0] + self._window - self._clock()))
            raise TooManyAttempts(
                f"too many failed attempts from this client: retry in {wait} s", wait
            )

    def failed(self, client: str) -> None:
        failures = self._recent(client)
        failures.append(self._clock())
        self._failures.pop(client, None)
        self._failures[client] = failures  # the most recent last: forgotten last
        while len(self._failures) > _MAX_CLIENTS:
            del self._failures[next(iter(self._failures))]
