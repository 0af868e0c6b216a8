"""The record trace without a broker: source records and the outcome records a worker publishes,
indexed, then asked for a key as ops ask it — what each workflow did with each event."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from crmsync.control.trace import TraceIndex
from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT
from crmsync.streams import outcomes
from crmsync.streams.catalog import NAMES, default_config
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.events import change_event
from crmsync.streams.mapping import Write
from crmsync.streams.sinks.base import SinkRecord
from tests.unit.test_mapping import email_event

PROFILE = "profileAndServicesExt/profile"
D2C, C2D, OPT = "d365-to-campaign", "campaign-to-d365", "opt-in-out"
CID = "0b7c6a52-6f6b-4d43-9a8b-5d2f4f1e9c01"
T0 = 1_700_000_000_000  # the events' source times
#: When the records were published and handled (a minute ago: within the retention).
NOW = int(time.time() * 1000) - 60_000


def _record(topic: str, offset: int, key: str, value: bytes | None, partition: int = 0) -> Any:
    return ConsumerRecord(
        topic, partition, offset, NOW + offset, 0, key.encode(), value, None, 0, 0, ()
    )


def _contact(
    offset: int, op: Literal["c", "u", "d"], after: dict[str, Any] | None, **kw: Any
) -> Any:
    event = change_event(op, "contact", CID, after=after, system="d365", **kw)
    return _record(topics.CONTACT_CHANGES, offset, CID, CHANGE_EVENT.encode(event))


def _outcome(workflow: str, built: outcomes.OutcomeRecord, offset: int, at_ms: int) -> Any:
    value = built.encode(workflow, "host-1", at_ms=at_ms)
    return _record(topics.outcomes(workflow), offset, "host-1", value)


class _Read:
    """A source record as the worker holds it."""

    def __init__(self, topic: str, offset: int, partition: int = 0) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key: bytes | None = CID.encode()
        self.value: bytes | None = b"x"


def _d2c(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = default_config(D2C).model_dump(mode="json")
    config.update(changes)
    return config


@pytest.fixture
def index(tmp_path: Path) -> TraceIndex:
    found = TraceIndex(KafkaClients("127.0.0.1:9"), tmp_path / "trace.sqlite", NAMES)
    found.open_store()
    # version 1 did not propagate deletes; version 2 (after an edit) does
    found.remember_config(D2C, 1, _d2c(propagate_deletes=False))
    found.remember_config(D2C, 2, _d2c(propagate_deletes=True))
    found.remember_config(C2D, 1, default_config(C2D).model_dump(mode="json"))
    return found


async def _contact_life(index: TraceIndex) -> None:
    """Created, edited, refused, deleted and compacted; then replayed under config version 2."""
    source = TopicPartition(topics.CONTACT_CHANGES, 0)
    await index.index(
        source,
        [
            _contact(0, "c", {"contactid": CID, "firstname": "Ada", "lastname": "L"},
                     source_ts_ms=T0)
            ,
            _contact(1, "u", {"jobtitle": "CEO", "firstname": "Ada"},
                     before={"jobtitle": "CFO", "firstname": "Ada"}, source_ts_ms=T0 + 1000),
            _contact(2, "u", {"firstname": "Bartholomew-Maximilian Alexander"},
                     source_ts_ms=T0 + 2000),
            _contact(3, "d", None, before={"contactid": CID}, source_ts_ms=T0 + 3000),
            _record(topics.CONTACT_CHANGES, 4, CID, None),
            _contact(5, "u", {"firstname": "Not handled yet"}, source_ts_ms=T0 + 5000),
        ],
    )  # fmt: skip
    first = outcomes.OutcomeRecord(config_version=1)
    first.acked(topics.CONTACT_CHANGES, 0, 0, 4)
    first.exception(_Read(topics.CONTACT_CHANGES, 2), "dead-lettered", "firstName is too long")
    replayed = outcomes.OutcomeRecord(config_version=2)
    replayed.acked(topics.CONTACT_CHANGES, 0, 3, 3)
    older_release = json.dumps({"v": 2, "workflow": D2C, "worker": "w", "o": []}).encode()
    await index.index(
        TopicPartition(topics.outcomes(D2C), 0),
        [
            _record(topics.outcomes(D2C), 0, "w", older_release),
            _outcome(D2C, first, 1, NOW + 10_000),
            _outcome(D2C, replayed, 2, NOW + 20_000),
        ],
    )


async def test_a_contacts_life_shows_each_event_and_what_the_workflow_did(
    index: TraceIndex,
) -> None:
    await _contact_life(index)
    answer = await index.find(CID.upper())  # ids are found whatever their case

    # newest first; the tombstone (no source time) by when it was handled; the edit not
    # handled yet shows nowhere
    assert [e.offset for e in answer.events] == [4, 3, 2, 1, 0]
    tombstone, deleted, refused, edited, created = answer.events

    (write,) = created.outcomes[0].writes
    assert (created.op, created.fields, created.fields_changed) == (
        "c",
        ["contactid", "firstname", "lastname"],
        False,
    )
    assert created.time == "2023-11-14T22:13:20.000+00:00"
    assert (created.outcomes[0].workflow, created.outcomes[0].result) == (D2C, "written")
    assert (write.system, write.target, write.op, write.key) == ("campaign", PROFILE, "upsert", CID)
    assert write.fields == ["firstName", "lastName"]
    handled = datetime.fromtimestamp((NOW + 10_000) / 1000, UTC)
    assert created.outcomes[0].at == handled.isoformat(timespec="milliseconds")
    assert created.outcomes[0].worker == "host-1"

    assert (edited.fields, edited.fields_changed) == (["jobtitle"], True)
    assert edited.outcomes[0].result == "written"

    (dead,) = refused.outcomes
    assert (dead.result, dead.reason) == ("dead-lettered", "firstName is too long")

    # handled under version 1 (deletes not propagated), then replayed under version 2
    under_v1, under_v2 = deleted.outcomes
    assert (under_v1.result, under_v1.reason) == (
        "skipped",
        "a delete, and the config does not propagate deletes",
    )
    assert under_v2.result == "written" and under_v2.writes[0].op == "delete"

    (compacted,) = tombstone.outcomes
    assert (tombstone.op, compacted.result) == (None, "skipped")
    assert compacted.reason is not None and "tombstone" in compacted.reason


async def test_a_record_filtered_out_or_carrying_nothing_mapped_says_so(
    index: TraceIndex,
) -> None:
    filters = {"all": [{"field": "statecode", "op": "eq", "value": 0}]}
    index.remember_config(D2C, 3, _d2c(filters=filters))
    await index.index(
        TopicPartition(topics.CONTACT_CHANGES, 1),
        [
            _record(
                topics.CONTACT_CHANGES,
                0,
                CID,
                CHANGE_EVENT.encode(
                    change_event("u", "contact", CID, after={"statecode": 1}, system="d365")
                ),
                partition=1,
            ),
            _record(
                topics.CONTACT_CHANGES,
                1,
                CID,
                CHANGE_EVENT.encode(
                    change_event("u", "contact", CID, after={"statecode": 0}, system="d365")
                ),
                partition=1,
            ),
        ],
    )
    batch = outcomes.OutcomeRecord(config_version=3)
    batch.acked(topics.CONTACT_CHANGES, 1, 0, 1)
    await index.index(TopicPartition(topics.outcomes(D2C), 0), [_outcome(D2C, batch, 0, NOW)])
    reasons = sorted((e.offset, e.outcomes[0].reason) for e in (await index.find(CID)).events)
    assert reasons == [
        (0, "filtered out by the config"),
        (1, "it carries no field the config maps"),
    ]


async def test_an_opt_out_decision_and_a_parked_write_are_shown_as_told(
    index: TraceIndex,
) -> None:
    opted_out = change_event(
        "u",
        "profile",
        CID,
        after={"externalId": CID, "blackListEmail": True},
        before={"blackListEmail": False},
        system="campaign",
    )
    await index.index(
        TopicPartition(topics.PROFILE_CHANGES, 0),
        [_record(topics.PROFILE_CHANGES, 7, CID, CHANGE_EVENT.encode(opted_out))],
    )
    parked = outcomes.OutcomeRecord(config_version=1)
    parked.exception(_Read(topics.PROFILE_CHANGES, 7), "parked", "its parent does not exist yet")
    written = outcomes.OutcomeRecord(config_version=1)
    written.acked(topics.PROFILE_CHANGES, 0, 7, 7)
    contact = SinkRecord("contacts", CID, fields={"donotbulkemail": True}, mode="update")
    written.exception(
        _Read(topics.PROFILE_CHANGES, 7),
        "written",
        "campaign opted out: newer",
        [Write("d365", contact)],
    )
    await index.index(
        TopicPartition(topics.outcomes(OPT), 0),
        [_outcome(OPT, parked, 0, NOW + 1), _outcome(OPT, written, 1, NOW + 2)],
    )
    (event,) = (await index.find(CID)).events
    assert (event.topic, event.fields, event.fields_changed) == (
        topics.PROFILE_CHANGES,
        ["blackListEmail"],
        True,
    )
    first, then = event.outcomes
    assert (first.workflow, first.result, first.reason) == (
        OPT,
        "parked",
        "its parent does not exist yet",
    )
    assert (then.result, then.reason) == ("written", "campaign opted out: newer")
    (write,) = then.writes
    assert (write.system, write.target, write.op, write.fields) == (
        "d365",
        "contacts",
        "upsert (update)",
        ["donotbulkemail"],
    )


async def test_an_email_event_is_found_by_its_event_id_and_its_contact(
    index: TraceIndex,
) -> None:
    opened = email_event("open", event_id="e-9", contact_id=CID)
    await index.index(
        TopicPartition(topics.EMAIL_EVENTS, 0),
        [_record(topics.EMAIL_EVENTS, 3, CID, EMAIL_EVENT.encode(opened))],
    )
    batch = outcomes.OutcomeRecord(config_version=1)
    batch.acked(topics.EMAIL_EVENTS, 0, 3, 3)
    await index.index(TopicPartition(topics.outcomes(C2D), 0), [_outcome(C2D, batch, 0, NOW)])
    by_event, by_contact = await index.find("e-9"), await index.find(CID)
    assert by_event.events == by_contact.events
    (event,) = by_event.events
    assert (event.key, event.op) == ("e-9", "open")
    (outcome,) = event.outcomes
    (write,) = outcome.writes
    assert (outcome.workflow, outcome.result) == (C2D, "written")
    assert (write.system, write.target, write.key) == ("d365", "crmsync_emailopens", "e-9")


async def test_the_store_keeps_its_index_and_configs_across_a_restart(
    index: TraceIndex, tmp_path: Path
) -> None:
    await _contact_life(index)
    before = await index.find(CID)
    await index.close()

    again = TraceIndex(KafkaClients("127.0.0.1:9"), tmp_path / "trace.sqlite", NAMES)
    again.open_store()
    assert await again.find(CID) == before
    # read again from a position already stored: nothing is indexed twice
    await _contact_life(again)
    assert await again.find(CID) == before


async def test_what_is_past_the_retention_is_dropped_when_the_store_opens(
    index: TraceIndex, tmp_path: Path
) -> None:
    await _contact_life(index)
    await index.close()
    shorter = TraceIndex(
        KafkaClients("127.0.0.1:9"), tmp_path / "trace.sqlite", NAMES, retention_h=1 / 120
    )
    shorter.open_store()  # 30 s: the records were read and handled a minute ago
    assert (await shorter.find(CID)).events == []


async def test_a_store_of_an_older_layout_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "trace.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE position (topic TEXT PRIMARY KEY, next_offset INTEGER NOT NULL);"
        "INSERT INTO position VALUES ('crmsync.d365-to-campaign.outcomes', 99);"
    )
    old.commit()
    old.close()
    index = TraceIndex(KafkaClients("127.0.0.1:9"), path, NAMES)
    index.open_store()
    index.remember_config(D2C, 1, _d2c(propagate_deletes=False))
    await _contact_life(index)  # read from the start again, as after a rebuild
    assert len((await index.find(CID)).events) == 5


def test_strings_repeated_across_a_batch_are_sent_once() -> None:
    built = outcomes.OutcomeRecord(config_version=4)
    for partition in range(6):
        built.acked(topics.CONTACT_CHANGES, partition, 100, 599)
    for offset in range(100):
        built.exception(_Read(topics.CONTACT_CHANGES, offset), "skipped", "echo suppressed")
    body = json.loads(built.encode(OPT, "w"))
    assert (body["v"], body["config_version"]) == (outcomes.VERSION, 4)
    assert body["s"] == [topics.CONTACT_CHANGES, "skipped", "echo suppressed"]
    batch = outcomes.decode(built.encode(OPT, "w"))
    assert [(r.partition, r.first, r.last) for r in batch.ranges] == [
        (p, 100, 599) for p in range(6)
    ]
    assert len(batch.exceptions) == 100 and batch.exceptions[5].offset == 5


@pytest.mark.parametrize("version", [2, 4, None])
def test_an_outcome_record_of_another_format_is_refused_by_its_version(
    version: int | None,
) -> None:
    data = json.dumps({"v": version, "workflow": "w", "worker": "x", "o": []}).encode()
    with pytest.raises(outcomes.OtherVersion) as refused:
        outcomes.decode(data)
    assert refused.value.version == version


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[3]",
        b'{"v": 3, "workflow": "w", "worker": "x", "at_ms": 1, "config_version": 1, "s": [], '
        b'"r": [[5, 0, 0, 1]], "x": []}',
        b'{"v": 3, "workflow": "w", "worker": "x", "at_ms": 1, "s": [], "r": [], "x": []}',
    ],
)
def test_a_record_that_is_not_an_outcome_record_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        outcomes.decode(data)
