"""Service protection limits: sliding-window budgets per client and a concurrency cap."""

from __future__ import annotations

import time
from collections import deque


class SlidingWindow:
    """How much each client spent in the last `window_s` seconds, in one-second buckets."""

    def __init__(self, limit: float, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._buckets: dict[str, deque[list[float]]] = {}
        self._totals: dict[str, float] = {}

    def _expire(self, client: str, now: float) -> deque[list[float]]:
        buckets = self._buckets.setdefault(client, deque())
        while buckets and buckets[0][0] <= now - self.window_s:
            self._totals[client] -= buckets.popleft()[1]
        return buckets

    def retry_after(self, client: str, now: float | None = None) -> float | None:
        """None while under the limit, else seconds until enough of the window has slid by."""
        now = time.monotonic() if now is None else now
        buckets = self._expire(client, now)
        total = self._totals.get(client, 0.0)
        if total < self.limit:
            return None
        for start, amount in buckets:
            total -= amount
            if total < self.limit:
                return start + self.window_s - now
        return self.window_s

    def spent(self, client: str) -> float:
        """What the client used in the current window (as of its last request)."""
        return self._totals.get(client, 0.0)

    def add(self, client: str, amount: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        buckets = self._expire(client, now)
        second = float(int(now))
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += amount
        else:
            buckets.append([second, amount])
        self._totals[client] = self._totals.get(client, 0.0) + amount

    def reset(self) -> None:
        self._buckets.clear()
        self._totals.clear()


class InFlight:
    """API requests being served right now, and the most there have been at once (reported by
    ``/_admin/stats``: how many requests a client really keeps in flight)."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def __enter__(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def __exit__(self, *_: object) -> None:
        self.now -= 1

    def reset(self) -> None:
        self.peak = self.now


class Concurrency:
    """Requests in flight per client, refused above `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: dict[str, int] = {}

    def try_enter(self, client: str) -> bool:
        current = self._in_flight.get(client, 0)
        if current >= self.limit:
            return False
        self._in_flight[client] = current + 1
        return True

    def leave(self, client: str) -> None:
        self._in_flight[client] = max(0, self._in_flight.get(client, 0) - 1)
