"""`crmsync publish` against the real broker: what a plain consumer reads back, all or nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT
from crmsync.streams.kafka import topics
from tests.integration.kafka_io import read_all, total_end_offset


def _crmsync(
    bootstrap: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    return subprocess.run(
        [sys.executable, "-m", "crmsync.control.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _contacts(n: int) -> list[dict[str, object]]:
    return [
        {
            "contactid": str(uuid.uuid4()),
            "firstname": f"First{i}",
            "lastname": f"Last{i}",
            "emailaddress1": f"person{i}@example.org",
            "donotbulkemail": i % 7 == 0,
        }
        for i in range(n)
    ]


async def test_published_contacts_are_read_back_by_a_plain_consumer(
    bootstrap: str, tmp_path: Path
) -> None:
    contacts = _contacts(500)
    file = tmp_path / "contacts.jsonl"
    file.write_text("\n".join(json.dumps(c) for c in contacts) + "\n")
    result = _crmsync(bootstrap, "publish", "d365-contacts", str(file))
    assert result.returncode == 0, result.stderr
    assert f"published 500 events to {topics.CONTACT_CHANGES}" in result.stdout

    records = await read_all(bootstrap, topics.CONTACT_CHANGES)
    ours = {c["contactid"]: c for c in contacts}
    decoded = [CHANGE_EVENT.decode(r.value) for r in records]
    mine = [e for e in decoded if e["key"] in ours]
    assert len(mine) == 500
    for record in records:
        event = CHANGE_EVENT.decode(record.value)
        if event["key"] in ours:
            assert record.key.decode() == event["key"]  # keyed by contactid: per-record order
            assert event["after"] == ours[event["key"]]


async def test_one_bad_line_publishes_nothing_and_names_line_and_field(
    bootstrap: str, tmp_path: Path
) -> None:
    lines = [json.dumps(c) for c in _contacts(20)]
    lines[13] = json.dumps({"contactid": str(uuid.uuid4()), "emailaddress1": "x" * 101})
    file = tmp_path / "contacts.jsonl"
    file.write_text("\n".join(lines))
    before = await total_end_offset(bootstrap, "d365.entity.new_visit.changes")

    result = _crmsync(bootstrap, "publish", "d365-entity:new_visit", str(file))
    assert result.returncode == 1
    assert "line 1: new_visitid: missing" in result.stderr  # every line lacks the entity's key
    assert await total_end_offset(bootstrap, "d365.entity.new_visit.changes") == before

    result = _crmsync(bootstrap, "publish", "d365-contacts", str(file))
    assert result.returncode == 1
    assert "line 14: emailaddress1: longer than 100 characters" in result.stderr
    assert "nothing published" in result.stderr


async def test_skip_invalid_publishes_the_valid_lines(bootstrap: str) -> None:
    good = {"event_id": str(uuid.uuid4()), "type": "open", "ts_ms": 1, "contact_id": "c-9"}
    stdin = json.dumps(good) + "\n" + '{"event_id": "x"}\n'
    result = _crmsync(
        bootstrap, "publish", "campaign-email-events", "-", "--skip-invalid", stdin=stdin
    )
    assert result.returncode == 1  # something was refused, and said so
    assert f"published 1 events to {topics.EMAIL_EVENTS}" in result.stdout
    assert "line 2: type: Field required" in result.stderr
    events = [EMAIL_EVENT.decode(r.value) for r in await read_all(bootstrap, topics.EMAIL_EVENTS)]
    assert next(e for e in events if e["event_id"] == good["event_id"])["contact_id"] == "c-9"


def test_unreachable_kafka_exits_3(tmp_path: Path) -> None:
    file = tmp_path / "c.jsonl"
    file.write_text(json.dumps(_contacts(1)[0]))
    result = _crmsync("127.0.0.1:1", "publish", "d365-contacts", str(file))
    assert result.returncode == 3
    assert "cannot reach Kafka" in result.stderr
