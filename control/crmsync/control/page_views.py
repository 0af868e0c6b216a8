"""What the Workflows page draws besides the table's figures: each workflow's history chart
(inline SVG geometry) and the source row."""

from __future__ import annotations

from typing import Any

from crmsync.control.history import HistoryAnswer
from crmsync.control.sources import SourceList

#: The chart's drawing box (the SVG viewBox), in its own units.
WIDTH, HEIGHT = 240.0, 40.0


def _points(pairs: list[tuple[float, float]], since: float, span: float, top: float) -> str:
    if not pairs:
        return ""
    scale = (HEIGHT - 2) / top if top > 0 else 0.0
    return " ".join(
        f"{max(0.0, min(WIDTH, (at - since) / span * WIDTH)):.1f},{HEIGHT - 1 - value * scale:.1f}"
        for at, value in pairs
    )


def chart(history: HistoryAnswer, now: float) -> dict[str, Any]:
    """The polylines (backlog; records written per second) over the span and their captions."""
    samples = history.samples
    # A control plane younger than the span draws what it has over the whole width.
    since = max(history.since, samples[0].at) if samples else history.since
    span = max(now - since, 1.0)
    peak = max((s.backlog for s in samples), default=0)
    peak_rate = max((s.written_per_s for s in samples), default=0.0)
    latest_rate = samples[-1].written_per_s if samples else 0.0
    eta = history.eta.text
    return {
        "backlog_points": _points([(s.at, s.backlog) for s in samples], since, span, peak),
        "rate_points": _points([(s.at, s.written_per_s) for s in samples], since, span, peak_rate),
        "eta_text": eta,
        "eta_trend": history.eta.trend,
        "peak_text": f"{peak:,}",
        "rate_text": f"{latest_rate:,.1f}/s",
        "samples": len(samples),
        "label": (
            f"Last hour: backlog peaked at {peak:,}, now {samples[-1].backlog:,} "
            f"({eta}); written {latest_rate:,.1f} records/s"
            if samples
            else "Last hour: no samples yet"
        ),
    }


_STATUS_TEXT = {"STALE": "NO HEARTBEAT"}


def source_rows(sources: SourceList) -> list[dict[str, Any]]:
    rows = []
    for source in sources.sources:
        rows.append(
            {
                **source.model_dump(mode="json"),
                "status_text": _STATUS_TEXT.get(source.status, source.status),
                "lag_text": "never polled" if source.lag_s is None else f"{source.lag_s:,.1f} s",
                "published_text": f"{source.changes_published:,}",
                "entities_text": ", ".join(
                    f"{e.entity} ({e.phase}, {e.changes_published:,})" for e in source.entities
                ),
            }
        )
    return rows
