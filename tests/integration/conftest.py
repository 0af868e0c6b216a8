"""Every test here runs against the real broker; data-plane tests also get emulators and workers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.harness import (
    Cluster,
    EmulatorProcess,
    recreate_topics,
    set_up_d365,
    start_emulators,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def emulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    emulators = start_emulators(tmp_path_factory.mktemp("emulators"), free_port(), free_port())
    yield emulators
    emulators.stop()


@pytest.fixture
async def cluster(
    bootstrap: str,
    emulator_process: EmulatorProcess,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Cluster]:
    """Fresh topics (and so no committed offsets), empty emulators, no workers yet."""
    await recreate_topics(bootstrap)
    emulator_process.reset()
    # The set-up a user runs on a real org; idempotent, so it also undoes a test's drift.
    await set_up_d365(emulator_process.dynamics_url)
    cluster = Cluster(bootstrap, emulator_process, tmp_path)
    yield cluster
    cluster.stop_all()
    emulator_process.clear_faults()
    report = request.node.stash.get(_outcome, None)
    if report is not None and report.failed:
        for worker in cluster.workers:
            print(f"--- {worker.log.name} ---\n{worker.output()[-6000:]}")


_outcome = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[_outcome] = report
    return report
