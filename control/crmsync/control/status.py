"""The status a workflow shows, derived from its control record and its workers' reports."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from crmsync.streams.control_protocol import ControlRecord, WorkerStatus

Status = Literal["RUNNING", "STOPPED", "STARTING", "FAILED"]
WAITING_FOR_A_WORKER = "waiting for a worker"


@dataclass(frozen=True)
class Derived:
    status: Status
    error: str | None = None
    #: STOPPED: "operator" (a Stop) or "drift" (the workers stopped themselves: `reason`).
    stopped_by: Literal["operator", "drift"] | None = None
    reason: str | None = None


def live_workers(
    reports: Iterable[WorkerStatus], now_ms: int, liveness_s: float
) -> list[WorkerStatus]:
    """The workers whose last heartbeat is younger than `liveness_s`."""
    oldest = now_ms - liveness_s * 1000
    return [report for report in reports if report.heartbeat_ms >= oldest]


def derive(record: ControlRecord | None, live: list[WorkerStatus]) -> Derived:
    """DESIGN's rules, in order: FAILED, STOPPED, RUNNING, otherwise STARTING.

    A stopped workflow with no live worker is STOPPED: nothing can write to its target.
    """
    if record is None:
        return Derived("STARTING", "no control record yet")
    current = [w for w in live if w.generation == record.generation]
    failed = [w for w in current if w.state == "FAILED"]
    if failed:
        return Derived("FAILED", failed[0].error or f"worker {failed[0].worker_id} failed")
    if record.desired == "stopped":
        if all(w.generation == record.generation and w.state == "STOPPED" for w in live):
            return Derived("STOPPED", stopped_by="operator")
        return Derived("STARTING", "stopping: waiting for every worker to confirm")
    drifted = [w for w in current if w.state == "STOPPED" and w.stopped_by == "drift"]
    if drifted:
        # The targets changed under a running workflow: each worker stopped itself on its own
        # check, and the workflow shows STOPPED once every live one did.
        reason = drifted[0].reason or "the targets changed"
        if all(w.generation == record.generation and w.state == "STOPPED" for w in live):
            return Derived("STOPPED", stopped_by="drift", reason=reason)
        return Derived("STARTING", f"stopping on drift: {reason}")
    if not live:
        return Derived("STARTING", WAITING_FOR_A_WORKER)
    if all(
        w.generation == record.generation
        and w.state == "RUNNING"
        and w.config_version == record.active_version
        for w in live
    ):
        return Derived("RUNNING")
    return Derived("STARTING")
