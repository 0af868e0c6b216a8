"""The status a workflow shows, from its control record and its workers' reports; the trend."""

from __future__ import annotations

import time
from typing import Any

from crmsync.control.backlog import TrendWindow
from crmsync.control.status import WAITING_FOR_A_WORKER, derive, live_workers
from crmsync.streams.control_protocol import ControlRecord, WorkerStatus
from crmsync.streams.kafka.offsets import Backlog, PartitionLag

NOW_MS = 1_000_000_000


def _record(desired: str = "running", generation: int = 4, version: int = 2) -> ControlRecord:
    return ControlRecord(
        workflow="d365-to-campaign",
        desired=desired,  # type: ignore[arg-type]
        generation=generation,
        active_config={},
        active_version=version,
    )


def _worker(state: str, generation: int = 4, version: int = 2, **more: Any) -> WorkerStatus:
    return WorkerStatus(
        workflow="d365-to-campaign",
        worker_id=more.pop("worker_id", f"w{state}{generation}"),
        state=state,  # type: ignore[arg-type]
        generation=generation,
        config_version=version,
        heartbeat_ms=more.pop("heartbeat_ms", NOW_MS),
        **more,
    )


def test_running_needs_every_live_worker_on_the_generation_and_active_version() -> None:
    assert derive(_record(), [_worker("RUNNING"), _worker("RUNNING", worker_id="b")]).status == (
        "RUNNING"
    )
    assert derive(_record(), [_worker("RUNNING"), _worker("RUNNING", 3)]).status == "STARTING"
    assert derive(_record(), [_worker("RUNNING", version=1)]).status == "STARTING"
    assert derive(_record(), [_worker("STARTING")]).status == "STARTING"


def test_no_live_worker_is_starting_while_running_is_desired_and_stopped_when_not() -> None:
    assert derive(_record(), []).status == "STARTING"
    assert derive(_record(), []).error == WAITING_FOR_A_WORKER
    assert derive(_record("stopped"), []).status == "STOPPED"


def test_stopped_needs_every_live_worker_to_confirm_the_generation() -> None:
    assert derive(_record("stopped"), [_worker("STOPPED")]).status == "STOPPED"
    waiting = derive(_record("stopped"), [_worker("STOPPED"), _worker("RUNNING", 3)])
    assert waiting.status == "STARTING"
    assert derive(_record("stopped"), [_worker("STOPPED", 3)]).status == "STARTING"


def test_failed_for_the_current_generation_wins_and_carries_the_reason() -> None:
    failed = derive(_record(), [_worker("RUNNING"), _worker("FAILED", error="403 from Campaign")])
    assert (failed.status, failed.error) == ("FAILED", "403 from Campaign")
    # a failure of an older generation is what the new start is about to replace
    assert derive(_record(), [_worker("FAILED", 3, error="old")]).status == "STARTING"


def test_workers_without_a_recent_heartbeat_do_not_count() -> None:
    old = _worker("RUNNING", 3, heartbeat_ms=NOW_MS - 9_000)
    fresh = _worker("STOPPED", worker_id="fresh", heartbeat_ms=NOW_MS - 1_000)
    assert live_workers([old, fresh], NOW_MS, liveness_s=8) == [fresh]
    assert derive(_record("stopped"), live_workers([old, fresh], NOW_MS, 8)).status == "STOPPED"


def test_no_control_record_is_starting() -> None:
    assert derive(None, [_worker("RUNNING")]).status == "STARTING"


def _backlog(lag: int, committed: int, at: float) -> Backlog:
    return Backlog([PartitionLag("t", 0, committed + lag, committed, 0)], at=at)


def test_trend_follows_the_window() -> None:
    start = time.time()

    def trend(*samples: tuple[int, int]) -> tuple[str, float | None]:
        window = TrendWindow(window_s=60)
        for i, (lag, committed) in enumerate(samples):
            window.add(_backlog(lag, committed, start + 5 * i))
        reading = window.reading()
        return reading.trend, reading.eta_s

    assert trend((0, 10)) == ("caught_up", None)
    assert trend((700, 0), (700, 0), (700, 0)) == ("stalled", None)
    assert trend((700, 0), (500, 200), (300, 400)) == ("draining", 7.5)
    assert trend((100, 0), (200, 50), (300, 100)) == ("growing", None)
    assert trend((100, 0), (100, 50)) == ("steady", None)


def test_old_samples_leave_the_window_and_a_reset_forgets_them() -> None:
    window = TrendWindow(window_s=10)
    for i in range(10):
        window.add(_backlog(100, 0, 1000.0 + 5 * i))
    assert len(window.samples) <= 4
    window.reset()
    window.add(_backlog(100, 0, 2000.0))
    assert window.reading().trend == "steady"


def test_backlog_counts_a_partition_without_commit_from_its_log_start() -> None:
    backlog = Backlog([PartitionLag("t", 0, 50, None, 20), PartitionLag("t", 1, 30, 25, 0)], at=0.0)
    assert [p.lag for p in backlog.partitions] == [30, 5]
    assert backlog.total == 35
