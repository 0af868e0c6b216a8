"""`crmsync up --detach` / `crmsync down`: the stack serves the contract's ports, then leaves."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from tests.integration.kafka_io import read_all


def _crmsync(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["CRMSYNC_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "crmsync.control.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
        cwd=home,
    )


def test_up_detach_serves_everything_and_down_stops_it(tmp_path: Path, kafka_cache: Path) -> None:
    (tmp_path / ".cache").symlink_to(kafka_cache)  # the jars fetched once for the session
    up = _crmsync(tmp_path, "up", "--detach")
    try:
        assert up.returncode == 0, up.stderr + (tmp_path / ".local/logs/up.log").read_text()
        assert "127.0.0.1:9092" in up.stdout
        for url in ("http://127.0.0.1:8081/_admin/stats", "http://127.0.0.1:8082/_admin/stats"):
            assert httpx.get(url).status_code == 200
        contact = {"contactid": str(uuid.uuid4()), "firstname": "Up"}
        file = tmp_path / "one.jsonl"
        file.write_text(json.dumps(contact))
        published = _crmsync(tmp_path, "publish", "d365-contacts", str(file))
        assert published.returncode == 0, published.stderr
        assert len(asyncio.run(read_all("127.0.0.1:9092", "d365.contact.changes"))) == 1
        _targets_are_set_up_then_a_dropped_key_blocks_start(tmp_path)
    finally:
        down = _crmsync(tmp_path, "down")
    assert down.stdout.strip() == "crmsync stopped"
    for port in (9092, 8081, 8082):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
        except httpx.ConnectError:
            continue
        raise AssertionError(f"something still listens on {port}")
    # state persists: Kafka data and the emulators' databases stay under .local/
    assert (tmp_path / ".local/kafka/node-1/data/meta.properties").exists()
    assert (tmp_path / ".local/emulators/dynamics.sqlite3").exists()
    # A second start runs the setup again and finds the tables it made the first time.
    again = _crmsync(tmp_path, "up", "--detach")
    try:
        assert again.returncode == 0, again.stderr
        log = (tmp_path / ".local/logs/targets-setup.log").read_text()
        assert log.rstrip().endswith(
            "nothing to create: every crmsync table, column and key is there"
        )
        assert _crmsync(tmp_path, "targets", "check").returncode == 0
    finally:
        _crmsync(tmp_path, "down")


KEY = "crmsync_emailsends(crmsync_eventid)"


def _targets_are_set_up_then_a_dropped_key_blocks_start(home: Path) -> None:
    """`crmsync up` ran `crmsync targets setup d365` against the fresh emulator (the path a user
    takes on a real org), so the check finds every requirement; without the alternate key the
    check names it and the control plane refuses to start the workflow that needs it."""
    setup_log = (home / ".local/logs/targets-setup.log").read_text()
    assert "POST EntityDefinitions\n" in setup_log and "created:" in setup_log
    check = _crmsync(home, "targets", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "MISSING" not in check.stdout and "present  campaign-to-d365" in check.stdout
    assert KEY in check.stdout
    dropped = httpx.delete(
        "http://127.0.0.1:8081/_admin/entity-sets/crmsync_emailsends/keys/crmsync_eventid"
    )
    assert dropped.status_code == 200
    check = _crmsync(home, "targets", "check")
    assert check.returncode == 1
    missing = [line for line in check.stdout.splitlines() if line.startswith("MISSING")]
    assert len(missing) == 1 and KEY in missing[0] and "campaign-to-d365" in missing[0]
    token = (home / ".local/admin-token").read_text().strip()
    with httpx.Client(
        base_url="http://127.0.0.1:8080", headers={"Authorization": f"Bearer {token}"}
    ) as control:
        assert control.post("/api/v1/workflows/campaign-to-d365/stop").status_code == 202
        refused = control.post("/api/v1/workflows/campaign-to-d365/start")
        assert refused.status_code == 409, refused.text
        assert [m["name"] for m in refused.json()["detail"]["missing"]] == [KEY]
        repaired = _crmsync(home, "targets", "setup", "d365")
        assert repaired.returncode == 0, repaired.stderr
        assert "Keys" in repaired.stdout  # only the key was missing, only the key is created
        assert control.post("/api/v1/workflows/campaign-to-d365/start").status_code == 202
