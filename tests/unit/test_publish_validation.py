"""`crmsync publish` validation: every bad line is named with its field, good lines are encoded."""

from __future__ import annotations

import json
import uuid

import pytest

from crmsync.control.publish import UnknownStream, prepare, stream
from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT

GUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def _errors(stream_name: str, *lines: object) -> list[str]:
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    return [str(error) for error in prepare(stream(stream_name), text)[1]]


def test_a_plain_contact_is_an_upsert_keyed_by_contactid() -> None:
    line = {
        "contactid": GUID,
        "firstname": "Ada",
        "donotbulkemail": True,
        "modifiedon": "2026-01-02T03:04:05Z",
    }
    events, errors = prepare(stream("d365-contacts"), [json.dumps(line)])
    assert errors == []
    assert events[0].key == GUID
    event = CHANGE_EVENT.decode(events[0].value)
    assert event["op"] == "u" and event["entity"] == "contact" and event["key"] == GUID
    assert event["after"] == line
    assert event["source"]["system"] == "d365"
    assert event["source"]["ts_ms"] == 1767323045000  # taken from modifiedon


def test_an_envelope_keeps_op_key_before_and_source_time() -> None:
    line = {
        "op": "d",
        "key": GUID,
        "before": {"firstname": "Ada"},
        "source_ts_ms": 42,
        "source_user": "u1",
    }
    events, errors = prepare(stream("d365-contacts"), [json.dumps(line)])
    assert errors == []
    event = CHANGE_EVENT.decode(events[0].value)
    assert (event["op"], event["after"], event["before"]) == ("d", None, {"firstname": "Ada"})
    assert event["source"]["ts_ms"] == 42 and event["source"]["user"] == "u1"


def test_errors_name_line_numbers_and_fields() -> None:
    errors = _errors(
        "d365-contacts",
        {"contactid": GUID},
        {"contactid": "not-a-guid", "firstname": "x" * 51},
        "",
        "{not json",
        {"firstname": "Ada"},
        {"contactid": GUID, "address": {"city": "Paris"}},
        {"contactid": GUID, "donotbulkemail": "yes"},
        [1, 2],
        {"op": "x", "key": GUID, "after": {}},
        {"contactid": GUID, "big": 2**64},
    )
    assert errors == [
        "line 2: contactid: must be a GUID",
        "line 2: firstname: longer than 50 characters",
        "line 4: not valid JSON: Expecting property name enclosed in double quotes at column 2",
        "line 5: contactid: missing: the record's key field is required",
        "line 6: address: nested values are not supported: use a scalar",
        "line 7: donotbulkemail: must be true or false",
        "line 8: a line must be a JSON object",
        'line 9: op: must be "c", "u" or "d"',
        "line 10: big: whole number out of the 64-bit range",
    ]


def test_campaign_profiles_are_keyed_by_external_id() -> None:
    events, errors = prepare(
        stream("campaign-profiles"), ['{"externalId": "c-1", "blackListEmail": true}']
    )
    assert errors == [] and events[0].key == "c-1"
    assert CHANGE_EVENT.decode(events[0].value)["source"]["system"] == "campaign"
    assert _errors("campaign-profiles", {"externalId": "c-1", "firstName": "x" * 31}) == [
        "line 1: firstName: longer than 30 characters"
    ]


def test_custom_entity_stream_uses_the_logical_names_id_field() -> None:
    spec = stream("d365-entity:new_purchase")
    assert spec.topic == "d365.entity.new_purchase.changes" and spec.key_field == "new_purchaseid"
    key = str(uuid.uuid4())
    events, errors = prepare(spec, [json.dumps({"new_purchaseid": key, "new_amount": 9.5})])
    assert errors == [] and events[0].key == key
    with pytest.raises(UnknownStream):
        stream("d365-entity:Bad-Name")
    with pytest.raises(UnknownStream):
        stream("contacts")


def test_email_events_are_validated_against_the_event_fields() -> None:
    good = {
        "event_id": "e1",
        "type": "click",
        "ts_ms": 5,
        "contact_id": GUID,
        "url": "https://example.org",
    }
    events, errors = prepare(stream("campaign-email-events"), [json.dumps(good)])
    assert errors == [] and events[0].key == GUID
    assert EMAIL_EVENT.decode(events[0].value)["url"] == "https://example.org"
    errors_text = _errors(
        "campaign-email-events",
        {"event_id": "e2", "type": "view", "ts_ms": "5", "contact_id": GUID, "extra": 1},
        {"type": "open", "ts_ms": 5, "contact_id": GUID},
    )
    assert errors_text == [
        "line 1: type: Input should be 'send', 'open', 'click' or 'bounce'",
        "line 1: ts_ms: Input should be a valid integer",
        "line 1: extra: Extra inputs are not permitted",
        "line 2: event_id: Field required",
    ]
