"""Dynamics source: change-tracking rows and deletions become the ChangeEvents users consume."""

from __future__ import annotations

from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams.catalog import default_config
from crmsync.streams.control_protocol import WorkerStatus
from crmsync.streams.source import (
    EntityStatus,
    SourceStatus,
    TrackedEntity,
    configured_entity_sets,
    epoch_ms,
    events_of,
    plural,
    tracked_entities,
)

CONTACT = TrackedEntity("contact", "d365.contact.changes", "contacts")
ID = "0F8FAD5B-D9CB-469F-A165-70867728950E"
USER = "9f3a2b1c-0000-4000-8000-0000000000aa"


def row(created: str, modified: str, **fields: object) -> dict[str, object]:
    return {
        "@odata.etag": 'W/"42"',
        "contactid": ID,
        "firstname": "Ada",
        "donotbulkemail": False,
        "createdon": created,
        "modifiedon": modified,
        "_modifiedby_value": USER,
        "_parentcustomerid_value@OData.Community.Display.V1.FormattedValue": "Contoso",
        **fields,
    }


def test_rows_of_an_initial_load_are_reads_with_the_source_time_and_user() -> None:
    ((key, event),) = events_of(
        CONTACT, [row("2024-05-01T10:00:00Z", "2024-05-02T11:00:00Z")], initial=True
    )
    assert event is not None
    assert key == ID.lower() == event["key"]
    assert event["op"] == "r"
    assert event["entity"] == "contact"
    assert event["source"] == {
        "system": "d365",
        "ts_ms": epoch_ms("2024-05-02T11:00:00Z"),
        "user": USER,
        "txid": "42",
    }
    assert event["after"]["firstname"] == "Ada"
    assert not any("@" in name for name in event["after"])
    CHANGE_EVENT.encode(event)  # fits the schema


def test_a_row_created_and_last_modified_together_is_a_create_else_an_update() -> None:
    same = row("2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z")
    later = row("2024-05-01T10:00:00Z", "2024-05-01T10:00:05Z")
    ops = [event["op"] for _, event in events_of(CONTACT, [same, later], initial=False) if event]
    assert ops == ["c", "u"]


def test_a_deletion_is_a_delete_event_then_a_tombstone() -> None:
    deleted = {
        "@odata.context": "http://x/api/data/v9.2/$metadata#contacts/$deletedEntity",
        "id": ID,
        "reason": "deleted",
    }
    (key, event), (tomb_key, tombstone) = events_of(CONTACT, [deleted], initial=False)
    assert event is not None and event["op"] == "d" and event["after"] is None
    assert key == tomb_key == ID.lower()
    assert tombstone is None
    CHANGE_EVENT.encode(event)


def test_nested_values_are_flattened_to_text() -> None:
    ((_, event),) = events_of(
        CONTACT, [row("2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z", tags=["a"])], initial=False
    )
    assert event is not None and event["after"]["tags"] == '["a"]'
    CHANGE_EVENT.encode(event)


def test_followed_entities_come_from_the_d365_to_campaign_config() -> None:
    config = default_config("d365-to-campaign")
    entities = tracked_entities(config)  # type: ignore[arg-type]
    assert [(e.logical_name, e.topic, e.primary_id) for e in entities] == [
        ("contact", "d365.contact.changes", "contactid"),
        ("new_purchase", "d365.entity.new_purchase.changes", "new_purchaseid"),
    ]


def test_entity_set_names() -> None:
    assert [plural(n) for n in ("new_purchase", "new_address", "new_city", "new_day")] == [
        "new_purchases",
        "new_addresses",
        "new_cities",
        "new_days",
    ]
    assert configured_entity_sets("new_purchase=new_purchaseset, x = ys ,") == {
        "new_purchase": "new_purchaseset",
        "x": "ys",
    }


def test_the_status_record_reads_as_a_worker_status_too() -> None:
    status = SourceStatus(
        worker_id="host-1",
        state="RUNNING",
        changes_published=3,
        entities=[
            EntityStatus(
                entity="contact",
                entity_set="contacts",
                topic="d365.contact.changes",
                phase="incremental",
                last_poll_ms=1,
                lag_s=0.5,
                changes_published=3,
                full_loads=1,
            )
        ],
    )
    assert status.key == "source/d365"
    plain = WorkerStatus.decode(status.encode())
    assert (plain.workflow, plain.state) == ("source-d365", "RUNNING")
    assert SourceStatus.decode(status.encode()) == status
