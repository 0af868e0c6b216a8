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
