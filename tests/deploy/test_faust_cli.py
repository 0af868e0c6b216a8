"""Faust's own command line on crmsync's worker module, as a Faust user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crmsync.streams import catalog


def _faust(tmp_path: Path, workflow: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRMSYNC_WORKFLOW": workflow, "CRMSYNC_HOME": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "faust", "-A", "crmsync.streams.worker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("workflow", catalog.NAMES)
def test_faust_agents_lists_the_workflow_agent_with_what_it_reads(
    tmp_path: Path, workflow: str
) -> None:
    listed = _faust(tmp_path, workflow, "agents")
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if f"@crmsync.{workflow} " in line]
    for topic in catalog.spec(workflow).default_config().source_topics():
        assert topic in row


def test_an_unknown_workflow_is_refused_with_the_choices(tmp_path: Path) -> None:
    refused = _faust(tmp_path, "d365-to-nowhere", "agents")
    assert refused.returncode != 0
    assert "CRMSYNC_WORKFLOW='d365-to-nowhere'" in refused.stderr
    assert ", ".join(catalog.NAMES) in refused.stderr
