"""The dry run of a config edit: the worker's own planning on the same records, both configs side
by side, filters that now drop or keep a record, and nothing that can tell a topic apart."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT
from crmsync.streams import catalog
from crmsync.streams.config import WorkflowConfig
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.events import change_event
from crmsync.streams.preview import Row, dry_run

D2C, C2D = "d365-to-campaign", "campaign-to-d365"
#: Never contacted: a stateless workflow's dry run opens no Kafka client.
NO_KAFKA = KafkaClients("127.0.0.1:1")


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def _config(name: str, **changes: Any) -> WorkflowConfig:
    data = catalog.default_config(name).model_dump(mode="json")
    return catalog.parse_config(name, {**data, **changes})


def _contact(offset: int, **after: Any) -> Record:
    key = str(uuid.uuid4())
    event = change_event("u", "contact", key, after={"contactid": key, **after}, system="d365")
    return Record(topics.CONTACT_CHANGES, 0, offset, key.encode(), CHANGE_EVENT.encode(event))


async def _run(
    name: str, active: WorkflowConfig, pending: WorkflowConfig, *records: Record
) -> list[Row]:
    return await dry_run(name, active, pending, list(records), NO_KAFKA)


async def test_a_shortened_mapping_shows_both_values_and_marks_the_field() -> None:
    active = _config(D2C)
    mappings = active.model_dump(mode="json")["mappings"]
    mappings[1]["max_length"] = 3  # firstname → firstName
    pending = _config(D2C, mappings=mappings)
    (row,) = await _run(D2C, active, pending, _contact(7, firstname="Adelheid", lastname="Ng"))
    (was,), (now,) = row.active.writes, row.pending.writes
    assert (row.active.outcome, row.pending.outcome) == ("writes", "writes")
    assert (was.system, was.target, was.operation) == (
        "campaign", "profileAndServicesExt/profile", "upsert",
    )  # fmt: skip
    assert was.fields == {"firstName": "Adelheid", "lastName": "Ng"}
    assert now.fields == {"firstName": "Ade", "lastName": "Ng"}
    assert row.differences == ["firstName"]
    assert (row.topic, row.offset, row.filter_change) == (topics.CONTACT_CHANGES, 7, None)


async def test_a_new_filter_drops_records_the_active_config_writes_and_keeps_the_rest() -> None:
    active = _config(D2C)
    pending = _config(D2C, filters={"all": [{"field": "lastname", "op": "ne", "value": "Out"}]})
    kept, dropped = _contact(1, lastname="In"), _contact(2, lastname="Out")
    rows = await _run(D2C, active, pending, kept, dropped)
    assert [r.filter_change for r in rows] == [None, "dropped"]
    assert rows[1].pending.outcome == "filtered" and rows[1].pending.writes == []
    assert rows[1].differences == ["outcome", "writes"]
    reverse = await _run(D2C, pending, active, dropped)
    assert reverse[0].filter_change == "kept"


async def test_undecodable_tombstones_and_unread_topics_are_said_as_such() -> None:
    config = _config(D2C)
    other = Record("d365.entity.new_other.changes", 0, 0, b"k", b"\x00")
    garbage = Record(topics.CONTACT_CHANGES, 0, 1, b"k", b"not avro")
    tombstone = Record(topics.CONTACT_CHANGES, 0, 2, b"k", None)
    rows = await _run(D2C, config, config, other, garbage, tombstone)
    assert [r.active.outcome for r in rows] == ["not_read", "dead_letter", "nothing"]
    assert rows[1].active.reason is not None and rows[1].active.reason.startswith("undecodable")
    assert not any(r.differences for r in rows)


async def test_an_email_event_type_turned_off_is_left_out() -> None:
    active = _config(C2D)
    events = active.model_dump(mode="json")["events"]
    events["open"]["enabled"] = False
    pending = _config(C2D, events=events)
    contact = str(uuid.uuid4())
    event = {
        "event_id": str(uuid.uuid4()), "type": "open", "contact_id": contact,
        "email": "a@example.org", "campaign_name": "Spring", "delivery_name": "D1",
        "ts_ms": 1_700_000_000_000, "url": None, "bounce_type": None, "bounce_reason": None,
        "mirror_page_url": None,
    }  # fmt: skip
    record = Record(topics.EMAIL_EVENTS, 3, 9, contact.encode(), EMAIL_EVENT.encode(event))
    (row,) = await _run(C2D, active, pending, record)
    (write,) = row.active.writes
    assert (write.system, write.target, write.key) == (
        "d365",
        "crmsync_emailopens",
        event["event_id"],
    )
    assert write.fields["crmsync_campaignname"] == "Spring"
    assert row.pending.outcome == "filtered" and row.filter_change == "dropped"
