"""Each workflow's backlog and records written per second over time, kept in SQLite under
`.local/` so the chart outlives a control plane restart."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

#: How long samples are kept (the API answers at most this far back).
KEEP_S = 2 * 3600.0
#: The span the page's chart and the API's default cover.
CHART_S = 3600.0
#: The trend's ETA is judged over this much of the newest history.
ETA_SPAN_S = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    workflow TEXT NOT NULL,
    at REAL NOT NULL,
    backlog INTEGER NOT NULL,
    written_per_s REAL NOT NULL,
    PRIMARY KEY (workflow, at)
) WITHOUT ROWID
"""


@dataclass(frozen=True)
class Sample:
    at: float  # epoch seconds
    backlog: int
    written_per_s: float


class HistorySample(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: float = Field(description="epoch seconds")
    backlog: int
    written_per_s: float = Field(
        description="records written to the target per second since the previous sample"
    )


class HistoryEta(BaseModel):
    model_config = ConfigDict(frozen=True)

    trend: str = Field(description="caught_up, draining, growing, steady or unknown")
    eta_s: float | None = Field(description="draining: seconds until caught up at this pace")
    text: str


class HistoryAnswer(BaseModel):
    model_config = ConfigDict(frozen=True)

    workflow: str
    since: float
    sample_interval_s: float
    eta: HistoryEta
    samples: list[HistorySample]


class HistoryStore:
    """One SQLite file; every write goes through a worker thread, off the event loop. The newest
    `KEEP_S` of samples are also held in memory, which is what reads answer from."""

    def __init__(self, path: Path, keep_s: float = KEEP_S) -> None:
        self.path = path
        self._keep_s = keep_s
        self._db: sqlite3.Connection | None = None
        self._recent: dict[str, deque[Sample]] = {}
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._db = await asyncio.to_thread(self._connect)
        since = time.time() - self._keep_s
        rows = await asyncio.to_thread(self._read, since)
        for workflow, at, backlog, rate in rows:
            self._recent.setdefault(workflow, deque()).append(Sample(at, backlog, rate))

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
        return db

    def _read(self, since: float) -> list[tuple[str, float, int, float]]:
        assert self._db is not None
        cursor = self._db.execute(
            "SELECT workflow, at, backlog, written_per_s FROM samples WHERE at >= ? "
            "ORDER BY workflow, at",
            (since,),
        )
        return list(cursor.fetchall())

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    async def add(self, samples: Iterable[tuple[str, Sample]]) -> None:
        batch = list(samples)
        if not batch:
            return
        oldest = batch[-1][1].at - self._keep_s
        for workflow, sample in batch:
            recent = self._recent.setdefault(workflow, deque())
            recent.append(sample)
            while recent and recent[0].at < oldest:
                recent.popleft()
        if self._db is not None:
            async with self._lock:
                await asyncio.to_thread(self._write, batch, oldest)

    def _write(self, batch: list[tuple[str, Sample]], oldest: float) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?)",
                [(w, s.at, s.backlog, s.written_per_s) for w, s in batch],
            )
            self._db.execute("DELETE FROM samples WHERE at < ?", (oldest,))

    def samples(self, workflow: str, since: float) -> list[Sample]:
        return [s for s in self._recent.get(workflow, ()) if s.at >= since]


def eta(samples: list[Sample], span_s: float = ETA_SPAN_S) -> HistoryEta:
    """The trend of the newest `span_s`: a least-squares line through the backlog samples."""
    if not samples:
        return HistoryEta(trend="unknown", eta_s=None, text="no samples yet")
    last = samples[-1]
    if last.backlog == 0:
        return HistoryEta(trend="caught_up", eta_s=None, text="caught up")
    window = [s for s in samples if s.at >= last.at - span_s]
    if len(window) < 2 or window[-1].at <= window[0].at:
        return HistoryEta(trend="unknown", eta_s=None, text="too few samples for a trend")
    slope = _slope([(s.at, float(s.backlog)) for s in window])
    if slope < -1e-9:
        seconds = last.backlog / -slope
        return HistoryEta(
            trend="draining", eta_s=round(seconds, 1), text=f"drains in ~{_span(seconds)}"
        )
    if slope > 1e-9:
        return HistoryEta(trend="growing", eta_s=None, text="growing")
    return HistoryEta(trend="steady", eta_s=None, text="steady")


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{max(round(seconds), 1)} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class WrittenRate:
    """Records written per second from the workers' counters (each counts since its own start,
    so a restarted worker's counter starting over is counted from zero, never as negative)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, dict[str, int]]] = {}

    def rate(self, workflow: str, at: float, counters: dict[str, int]) -> float:
        previous = self._last.get(workflow)
        self._last[workflow] = (at, dict(counters))
        if previous is None or at <= previous[0]:
            return 0.0
        then, before = previous
        written = 0
        for worker, count in counters.items():
            was = before.get(worker)
            written += count if was is None or count < was else count - was
        return round(written / (at - then), 2)
