"""A workflow's backlog trend over a sliding window (the backlog itself: kafka.offsets)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from crmsync.streams.kafka.offsets import Backlog

Trend = Literal["caught_up", "draining", "growing", "stalled", "steady"]


@dataclass(frozen=True)
class TrendReading:
    trend: Trend
    eta_s: float | None = None  # draining only: at the current drain rate


@dataclass
class TrendWindow:
    """Backlog samples over a sliding window, judged in the manner of Burrow.

    caught_up: no backlog. stalled: a backlog and the group committed nothing over the window.
    draining: the backlog shrinks (ETA at the window's rate). growing: it rises although the
    group commits. steady: the group commits as fast as records arrive.
    """

    window_s: float
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, backlog: Backlog) -> None:
        self.samples.append((backlog.at, backlog.total, backlog.consumed))
        while len(self.samples) > 2 and self.samples[1][0] <= backlog.at - self.window_s:
            self.samples.popleft()

    def reset(self) -> None:
        """Forgets the history: offsets moved by a replay are no progress."""
        self.samples.clear()

    def reading(self) -> TrendReading:
        if not self.samples:
            return TrendReading("steady")
        first_at, first_total, first_consumed = self.samples[0]
        last_at, last_total, last_consumed = self.samples[-1]
        if last_total == 0:
            return TrendReading("caught_up")
        if len(self.samples) < 2 or last_at <= first_at:
            return TrendReading("steady")
        if last_consumed <= first_consumed:
            return TrendReading("stalled")
        rate = (first_total - last_total) / (last_at - first_at)
        if rate > 0:
            return TrendReading("draining", round(last_total / rate, 1))
        if last_total > first_total:
            return TrendReading("growing")
        return TrendReading("steady")
