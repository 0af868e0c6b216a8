"""The local stack restarts a process that dies, with a backoff that grows while it keeps dying."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from crmsync.control import stack
from crmsync.control.stack import Process


def _dying(restart: bool = True) -> Process:
    return Process(
        "worker-x", [sys.executable, "-c", "raise SystemExit(3)"], lambda: True, restart=restart
    )


def _died(process: Process) -> None:
    assert process.popen is not None
    process.popen.wait(30)


def test_a_dead_process_is_restarted_after_a_backoff_that_doubles_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack, "RESTART_BACKOFF_S", 0.2)
    caplog.set_level(logging.WARNING, logger="crmsync.control.stack")
    process = _dying()
    process.start(tmp_path)
    _died(process)
    died_at = time.monotonic()
    process.supervise(tmp_path, died_at)
    assert process.restarts == 0  # waits the backoff first
    process.supervise(tmp_path, died_at + 0.2)
    assert process.restarts == 1
    _died(process)
    second = time.monotonic()
    process.supervise(tmp_path, second)
    process.supervise(tmp_path, second + 0.3)
    assert process.restarts == 1  # dying again at once: the wait doubled (0.4 s)
    process.supervise(tmp_path, second + 0.4)
    assert process.restarts == 2
    assert "event=process_died name=worker-x exit=3" in caplog.text
    assert "event=process_restarted name=worker-x restarts=2" in caplog.text
    process.stop()


def test_a_stopped_or_unsupervised_process_is_left_alone(tmp_path: Path) -> None:
    for process in (_dying(restart=False), _dying()):
        process.start(tmp_path)
        _died(process)
        process.stop()
        process.supervise(tmp_path, time.monotonic() + 100)
        assert process.restarts == 0
