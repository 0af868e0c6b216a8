"""Chaos tier: real brokers, real worker processes, emulators with faults; outcomes counted.

`CRMSYNC_CHAOS=short` (the default, part of `make test`) runs every scenario at small volumes;
`medium` and `full` (`make chaos`) run them bigger and longer and rewrite docs/reliability.md.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import pytest

from tests.chaos import report
from tests.chaos.ledger import Outcome
from tests.conftest import free_port
from tests.integration.harness import Cluster, EmulatorProcess, recreate_topics, start_emulators

TIER = os.environ.get("CRMSYNC_CHAOS", "short")
if TIER not in ("short", "medium", "full"):
    raise pytest.UsageError(f"CRMSYNC_CHAOS={TIER!r}: short, medium or full")

_OUTCOMES: list[Outcome] = []
_IN_XDIST_WORKER = False


def pick(short: Any, full: Any, medium: Any = None) -> Any:
    """The value of this tier (medium defaults to the geometric middle of two numbers)."""
    if TIER == "full":
        return full
    if TIER == "medium":
        if medium is not None:
            return medium
        middle = (short * full) ** 0.5
        return type(short)(middle)
    return short


def record(outcome: Outcome) -> None:
    """Prints the scenario's line, keeps it for the table, then asserts it."""
    print(outcome.line())
    _OUTCOMES.append(outcome)
    outcome.check()


def pytest_configure(config: pytest.Config) -> None:
    global _IN_XDIST_WORKER
    _IN_XDIST_WORKER = hasattr(config, "workerinput")
    config.addinivalue_line("markers", "chaos: the chaos tier (real processes, faults, counts)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.integration)


_outcome = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keeps the call's report for the teardown's worker logs. Under pytest-xdist a scenario runs
    in a worker process: its outcome travels on the report to the controller, which prints and
    writes the table."""
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[_outcome] = report
        if _IN_XDIST_WORKER:
            report.user_properties.extend(("chaos-outcome", asdict(o)) for o in _OUTCOMES)
            _OUTCOMES.clear()
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _IN_XDIST_WORKER:
        return
    for name, value in report.user_properties:
        if name == "chaos-outcome":
            _OUTCOMES.append(Outcome(**cast(dict[str, Any], value)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _OUTCOMES:
        return
    terminalreporter.section(f"chaos outcomes (tier {TIER})")
    for outcome in _OUTCOMES:
        terminalreporter.write_line(outcome.line() + ("" if outcome.passed else "  FAILED"))
    path = report.write(_OUTCOMES, TIER)
    terminalreporter.write_line(f"table written to {path.relative_to(report.ROOT)}")


@pytest.fixture(scope="session")
def chaos_emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    emulators = start_emulators(
        tmp_path_factory.mktemp("chaos-emulators"), free_port(), free_port()
    )
    yield emulators
    emulators.stop()


@pytest.fixture
async def cluster(
    bootstrap: str,
    chaos_emulators: EmulatorProcess,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Cluster]:
    """The session broker with fresh topics, empty emulators, no workers yet."""
    await recreate_topics(bootstrap)
    chaos_emulators.reset()
    cluster = Cluster(bootstrap, chaos_emulators, tmp_path)
    yield cluster
    await _teardown(cluster, request)


async def _teardown(cluster: Cluster, request: pytest.FixtureRequest) -> None:
    cluster.stop_all()
    cluster.emulators.clear_faults()
    report_ = request.node.stash.get(_outcome, None)
    if report_ is not None and report_.failed:
        for worker in cluster.workers:
            print(f"--- {worker.log} ---\n{worker.output()[-4000:]}")


def own_cluster(bootstrap: str, emulators: EmulatorProcess, home: Path, **env: str) -> Cluster:
    """A Cluster on a broker of the scenario's own (the session broker stays untouched)."""
    emulators.reset()
    return Cluster(bootstrap, emulators, home, env=dict(env))
