"""Scenario 6: poison mixed into good traffic. Every good record is written; every bad one is in
the DLQ, byte for byte, with a reason a person can act on."""

from __future__ import annotations

import os
import random
import uuid
from typing import Any

import pytest

from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import change_event
from tests.chaos.conftest import pick, record
from tests.chaos.ledger import Outcome, Stopwatch
from tests.chaos.traffic import D2C, ContactTraffic, Record, publish
from tests.chaos.workers import wait_drained, wait_worker
from tests.integration.harness import Cluster
from tests.integration.workflow_helpers import dead_letters

pytestmark = pytest.mark.timeout(pick(180, 900, 400))

#: The broker's message.max.bytes (Kafka's default, 1 MiB + 12): a record batch may not exceed it.
BROKER_MAX = 1_048_588


def _event(key: str, after: dict[str, Any] | None, *, event_key: str | None = None) -> bytes:
    event = change_event(
        "u", "contact", event_key if event_key is not None else key, after=after, system="d365"
    )
    return CHANGE_EVENT.encode(event, validate=False)


def _contact(key: str, **fields: Any) -> dict[str, Any]:
    return {
        "contactid": key,
        "firstname": "Poison",
        "lastname": "Case",
        "emailaddress1": f"{key[:8]}@example.org",
        **fields,
    }


def _poison() -> dict[str, tuple[bytes, str]]:
    """Kafka key → (value, what the DLQ reason must say)."""
    valid = _event(str(uuid.uuid4()), _contact(str(uuid.uuid4())))
    bad: dict[str, tuple[bytes, str]] = {}

    def add(value: bytes, reason: str, key: str | None = None) -> None:
        bad[key or str(uuid.uuid4())] = (value, reason)

    for _ in range(3):
        add(os.urandom(random.randint(1, 200)), "undecodable")
    add(b"", "undecodable")
    for _ in range(2):
        add(valid[:2] + os.urandom(8) + valid[10:], "unknown writer schema fingerprint")
    add(valid[:12] + b"\xff\xff\xff\xff\xff", "undecodable")  # known schema, body cut
    for _ in range(2):
        key = str(uuid.uuid4())
        add(_event(key, _contact(key, lastname="L" * 60)), "maximum allowed length", key)
    add(_event(str(uuid.uuid4()), _contact(str(uuid.uuid4())), event_key=""), "no record key")
    key = str(uuid.uuid4())
    add(_event(key, _contact(key, emailaddress1=12345)), "email", key)
    key = str(uuid.uuid4())
    add(_event(key, _contact(key, lastname=True)), "lastName", key)
    # Near the broker's limit: a batch of one record, its key and headers-free value.
    huge = BROKER_MAX - 1_000
    add(os.urandom(huge), "undecodable")
    key = str(uuid.uuid4())
    body = _event(key, _contact(key, lastname="H" * (huge - 200)))
    add(body, "maximum allowed length", key)
    return bad


async def test_poison_mixed_into_good_traffic(cluster: Cluster) -> None:
    clock = Stopwatch()
    traffic = ContactTraffic()
    good: list[Record] = traffic.versions(pick(500, 10_000), 2)
    # A huge record that is fine: an unmapped field of almost 1 MB is simply not synced.
    big = str(uuid.uuid4())
    good.append((big, _event(big, _contact(big, description="D" * (BROKER_MAX - 2_000)))))
    traffic.expected.set(
        big, {"firstName": "Poison", "lastName": "Case", "email": f"{big[:8]}@example.org"}
    )
    traffic.sent += 1
    bad = _poison()
    records = list(good)
    for key, (value, _) in bad.items():
        records.insert(random.randrange(len(records)), (key, value))
    await cluster.control(D2C, "running")
    worker = cluster.start_worker(D2C)
    await wait_worker(cluster, worker, "RUNNING")

    await publish(cluster, topics.CONTACT_CHANGES, records, max_request_size=2 * BROKER_MAX)

    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES], within=120 + len(records) / 20)
    found = await traffic.compare(cluster)
    letters = await dead_letters(cluster, D2C)
    problems = []
    seen = {r.key.decode(): (r, headers) for r, headers in letters}
    for key, (value, reason) in bad.items():
        if key not in seen:
            problems.append(f"{key} ({reason}, {len(value)} bytes): not in the DLQ")
            continue
        letter, headers = seen[key]
        message = headers.get("crmsync.error.message", "")
        if letter.value != value:
            problems.append(f"{key}: the DLQ holds other bytes")
        if reason not in message:
            problems.append(f"{key}: reason {message[:160]!r} does not say {reason!r}")
    record(
        Outcome(
            "6a. poison mixed into good traffic",
            sent=traffic.sent + len(bad),
            written=found.written,
            lost=found.lost + len([p for p in problems if "not in the DLQ" in p]),
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=len(letters),
            expected_dlq=len(bad),
            seconds=clock.seconds,
            samples=[*problems, *found.samples],
        )
    )
    assert problems == []


async def test_a_record_at_the_brokers_size_limit_is_dead_lettered(cluster: Cluster) -> None:
    """The broker takes a record up to message.max.bytes; its DLQ copy carries ~400 bytes of
    context headers more. It must still reach the DLQ, and the workflow go on."""
    clock = Stopwatch()
    traffic = ContactTraffic()
    good = traffic.versions(pick(200, 2000), 1)
    at_limit = (str(uuid.uuid4()), os.urandom(BROKER_MAX - 200))
    records = [*good[: len(good) // 2], at_limit, *good[len(good) // 2 :]]
    await cluster.control(D2C, "running")
    worker = cluster.start_worker(D2C)
    await wait_worker(cluster, worker, "RUNNING")

    await publish(cluster, topics.CONTACT_CHANGES, records, max_request_size=2 * BROKER_MAX)

    try:
        await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES], within=120)
    finally:
        found = await traffic.compare(cluster)
        letters = await dead_letters(cluster, D2C)
        in_dlq = [r for r, _ in letters if r.key.decode() == at_limit[0]]
        record(
            Outcome(
                "6b. poison at the broker's message size limit",
                sent=traffic.sent + 1,
                written=found.written,
                lost=found.lost + (0 if in_dlq else 1),
                duplicated=found.duplicated,
                unexpected=found.unexpected,
                dlq=len(letters),
                expected_dlq=1,
                seconds=clock.seconds,
                samples=found.samples,
            )
        )
