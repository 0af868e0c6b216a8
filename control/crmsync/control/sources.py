"""What the page and `GET /api/v1/sources` show of a change source (the Dynamics source's
status record `source/d365` in `crmsync.status`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from crmsync.streams.source import EntityStatus, SourceStatus

SourceState = Literal["RUNNING", "STARTING", "STOPPED", "FAILED", "STALE"]


class SourceEntityView(BaseModel):
    model_config = ConfigDict(frozen=True)

    entity: str
    entity_set: str | None
    topic: str
    phase: str
    last_poll_at: str | None
    lag_s: float | None
    changes_published: int
    full_loads: int
    error: str | None


class SourceView(BaseModel):
    """One source as the API answers it."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description='"d365"')
    title: str
    status: SourceState = Field(
        description="the state the source reported; STALE: no heartbeat within the liveness "
        "window, so what it last reported may no longer hold"
    )
    reported_state: str = Field(description="the state in its last status record")
    error: str | None = Field(description="why FAILED, or since when STALE")
    last_poll_at: str | None
    lag_s: float | None = Field(description="seconds since the last successful poll")
    changes_published: int
    poll_interval_s: float
    heartbeat_at: str
    heartbeat_age_s: float
    worker_id: str
    host: str
    entities: list[SourceEntityView]


class SourceList(BaseModel):
    model_config = ConfigDict(frozen=True)

    sources: list[SourceView]


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _entity(status: EntityStatus, now_ms: int) -> SourceEntityView:
    return SourceEntityView(
        entity=status.entity,
        entity_set=status.entity_set,
        topic=status.topic,
        phase=status.phase,
        last_poll_at=_iso(status.last_poll_ms),
        lag_s=_lag(status.last_poll_ms, now_ms),
        changes_published=status.changes_published,
        full_loads=status.full_loads,
        error=status.error,
    )


def _lag(last_poll_ms: int | None, now_ms: int) -> float | None:
    """Seconds since the last successful poll, now (the record's own lag is as old as it)."""
    return None if last_poll_ms is None else round(max(now_ms - last_poll_ms, 0) / 1000, 1)


def view(status: SourceStatus, now_ms: int, liveness_s: float) -> SourceView:
    """The rule: a source that last reported STOPPED is STOPPED (it said goodbye); otherwise a
    heartbeat older than `liveness_s` (the workers' rule, 3 x heartbeat + 2 s) is STALE."""
    age_s = max(now_ms - status.heartbeat_ms, 0) / 1000
    state: SourceState = status.state
    error = status.error if status.state == "FAILED" else None
    if status.state != "STOPPED" and age_s > liveness_s:
        state = "STALE"
        error = (
            f"no heartbeat for {age_s:.0f} s (last reported {status.state}"
            + (f": {status.error}" if status.error else "")
            + "); is `crmsync source d365` running?"
        )
    return SourceView(
        name=status.system,
        title="Dynamics 365 change tracking" if status.system == "d365" else status.system,
        status=state,
        reported_state=status.state,
        error=error,
        last_poll_at=_iso(status.last_poll_ms),
        lag_s=_lag(status.last_poll_ms, now_ms),
        changes_published=status.changes_published,
        poll_interval_s=status.poll_interval_s,
        heartbeat_at=_iso(status.heartbeat_ms) or "",
        heartbeat_age_s=round(age_s, 1),
        worker_id=status.worker_id,
        host=status.host,
        entities=[_entity(e, now_ms) for e in status.entities],
    )
