"""Outcome records: what the worker publishes per batch is what the trace reads back."""

from __future__ import annotations

import json

import pytest

from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams import outcomes
from crmsync.streams.kafka.events import change_event
from crmsync.streams.mapping import Write
from crmsync.streams.sinks.base import SinkRecord

PROFILE = "profileAndServicesExt/profile"


def _decoded(event: dict[str, object]) -> dict[str, object]:
    """As the worker sees it: through the Avro codec."""
    return CHANGE_EVENT.decode(CHANGE_EVENT.encode(event))


def test_a_batch_reads_back_with_every_outcome_in_order() -> None:
    created = _decoded(
        change_event("c", "contact", "c-1", after={"firstname": "Ada", "jobtitle": None},
                     system="d365", source_ts_ms=1_700_000_000_000)
    )  # fmt: skip
    opted_out = _decoded(
        change_event("u", "profile", "c-1", after={"externalId": "c-1", "blackListEmail": True},
                     before={"blackListEmail": False}, system="campaign")
    )  # fmt: skip
    profile = SinkRecord(PROFILE, "c-1", fields={"firstName": "Ada"}, create_fields={"email": "x"})
    contact = SinkRecord("contacts", "c-1", fields={"donotbulkemail": True}, mode="update")
    trace = outcomes.Trace()
    trace.add(
        outcomes.event_view("d365.contact.changes", 2, 40, b"c-1", created),
        "written",
        None,
        [Write("campaign", profile)],
    )
    trace.add(
        outcomes.event_view("campaign.profile.changes", 0, 7, b"c-1", opted_out),
        "written",
        "campaign opted out: newer",
        [Write("d365", contact)],
    )
    trace.add(
        outcomes.event_view("d365.contact.changes", 2, 41, b"c-1", None), "skipped", "a tombstone"
    )
    trace.add(
        outcomes.event_view("d365.contact.changes", 2, 42, b"c-2", None),
        "dead-lettered",
        "too long",
    )

    batch = outcomes.decode(trace.encode("d365-to-campaign", "host-1", at_ms=5))
    assert (batch.workflow, batch.worker, len(batch.outcomes)) == ("d365-to-campaign", "host-1", 4)
    first, second, tombstone, refused = batch.outcomes
    assert (first.event.topic, first.event.partition, first.event.offset) == (
        "d365.contact.changes",
        2,
        40,
    )
    assert (first.event.op, first.event.ts_ms, first.event.key) == ("c", 1_700_000_000_000, "c-1")
    assert first.event.fields == ["firstname", "jobtitle"] and not first.event.changed
    (write,) = first.writes
    assert (write.system, write.target, write.op, write.key) == (
        "campaign",
        PROFILE,
        "upsert",
        "c-1",
    )
    assert write.fields == ["firstName", "email"]
    assert second.event.fields == ["blackListEmail"] and second.event.changed  # a before-image
    assert second.reason == "campaign opted out: newer"
    assert second.writes[0].op == "upsert (update)"
    assert (tombstone.result, tombstone.event.op, tombstone.event.fields) == ("skipped", None, [])
    assert (refused.result, refused.reason, refused.event.key) == (
        "dead-lettered",
        "too long",
        "c-2",
    )
    assert all(o.at_ms == 5 for o in batch.outcomes)


def test_an_email_event_is_found_by_its_contact_too() -> None:
    event = {"event_id": "e-9", "type": "open", "ts_ms": 12, "contact_id": "c-1", "url": None}
    trace = outcomes.Trace()
    trace.add(outcomes.event_view("campaign.email.events", 0, 3, b"e-9", event), "written")
    (outcome,) = outcomes.decode(trace.encode("campaign-to-d365", "w")).outcomes
    assert (outcome.event.key, outcome.event.op, outcome.event.also) == ("e-9", "open", ["c-1"])
    assert outcome.event.fields == ["event_id", "type", "ts_ms", "contact_id"]


def test_strings_repeated_across_records_are_sent_once() -> None:
    event = _decoded(change_event("u", "contact", "k", after={"a": 1, "b": 2}, system="d365"))
    trace = outcomes.Trace()
    for offset in range(100):
        trace.add(
            outcomes.event_view("d365.contact.changes", 0, offset, b"k", event),
            "skipped",
            "filtered",
        )
    body = json.loads(trace.encode("d365-to-campaign", "w"))
    assert body["s"].count("d365.contact.changes") == 1 and len(body["s"]) == 5


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b'{"v": 1, "workflow": "w", "worker": "x", "outcomes": []}',
        b'{"v": 2, "workflow": "w", "worker": "x", "at_ms": 1, "s": [], '
        b'"o": [[5, 0, 0, "k", -1, null, -1, 0, 0, -1, "", []]]}',
    ],
)
def test_a_record_that_is_not_an_outcome_batch_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        outcomes.decode(data)
