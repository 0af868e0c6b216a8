"""The Avro codec: round trips, the spec's single-object framing, schema resolution, bad bytes."""

from __future__ import annotations

import copy
import json
import random
import struct
from importlib import resources
from typing import Any

import pytest

from crmsync.schemas.codec import (
    CHANGE_EVENT,
    EMAIL_EVENT,
    DecodeError,
    EventSchema,
    InvalidEvent,
    MalformedEvent,
    UnknownSchema,
)
from crmsync.streams.kafka.events import Scalar, change_event


def _crc64_avro(data: bytes) -> int:
    """The Avro spec's reference fingerprint algorithm, written out independently of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def _contact(**after: Scalar) -> dict[str, Any]:
    return change_event(
        "u",
        "contact",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        after={"firstname": "Ada", **after},
        system="d365",
        source_ts_ms=1_700_000_000_000,
    )


def test_change_event_round_trips_every_value_type() -> None:
    event = _contact(
        lastname="Lovelace",
        donotbulkemail=True,
        donotemail=False,
        visits=2**62,
        score=-1.25,
        nothing=None,
        empty="",
        unicode="Zoë ✓",
    )
    event["before"] = {"firstname": "A"}
    event["source"]["user"] = "admin@contoso"
    event["source"]["txid"] = "tx-1"
    assert CHANGE_EVENT.decode(CHANGE_EVENT.encode(event)) == event


@pytest.mark.parametrize("op", ["c", "u", "d", "r"])
def test_every_op_round_trips(op: str) -> None:
    event = _contact()
    event["op"] = op
    if op == "d":
        event["after"] = None
    assert CHANGE_EVENT.decode(CHANGE_EVENT.encode(event)) == event


def test_email_event_round_trips_with_and_without_optional_fields() -> None:
    minimal = {"event_id": "e-1", "type": "open", "ts_ms": 1, "contact_id": "c-1"}
    decoded = EMAIL_EVENT.decode(EMAIL_EVENT.encode(minimal))
    assert decoded["event_id"] == "e-1" and decoded["url"] is None
    full = {
        **minimal,
        "type": "click",
        "email": "a@b.c",
        "campaign_id": "CAMP1",
        "campaign_name": "Spring",
        "delivery_id": "DM1",
        "delivery_name": "Newsletter",
        "mirror_page_url": "https://m/1",
        "url": "https://x/y",
        "bounce_type": None,
        "bounce_reason": None,
    }
    assert EMAIL_EVENT.decode(EMAIL_EVENT.encode(full)) == full


def test_single_object_framing_matches_the_avro_spec() -> None:
    event = _contact()
    data = CHANGE_EVENT.encode(event)
    canonical = CHANGE_EVENT.latest.canonical.encode()
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == struct.pack("<Q", _crc64_avro(canonical))
    # the canonical form is the spec's: names fully qualified, no docs or defaults
    assert json.loads(canonical)["name"] == "io.crmsync.events.ChangeEvent"
    assert "doc" not in canonical.decode() and "default" not in canonical.decode()


def test_golden_bytes_of_a_known_email_event() -> None:
    event = {"event_id": "e", "type": "send", "ts_ms": 1, "contact_id": "c"}
    body = bytes(
        [
            0x02,
            ord("e"),  # event_id: length 1 (zig-zag 2), "e"
            0x00,  # type: enum index 0 = send
            0x02,  # ts_ms: 1 (zig-zag)
            0x02,
            ord("c"),  # contact_id
            *([0x00] * 9),  # nine optional fields: union branch 0 = null
        ]
    )
    fingerprint = struct.pack("<Q", _crc64_avro(EMAIL_EVENT.latest.canonical.encode()))
    assert EMAIL_EVENT.encode(event) == b"\xc3\x01" + fingerprint + body


def _v2_change_event() -> EventSchema:
    """v1 plus a field with a default: the additive evolution producers are allowed."""
    v1 = CHANGE_EVENT.latest
    schema = json.loads((resources.files("crmsync.schemas") / "ChangeEvent.v1.avsc").read_text())
    v2 = copy.deepcopy(schema)
    v2["fields"].append(
        {"name": "schema_version", "type": "int", "default": 1, "doc": "added in v2"}
    )
    evolved = EventSchema.from_versions("ChangeEvent", [schema, v2])
    assert evolved.versions[0].fingerprint == v1.fingerprint
    return evolved


def test_data_written_with_v1_reads_with_v2_through_schema_resolution() -> None:
    evolved = _v2_change_event()
    old_bytes = CHANGE_EVENT.encode(_contact())
    decoded = evolved.decode(old_bytes)
    assert decoded["schema_version"] == 1  # the reader's default fills the new field
    assert decoded["after"] == {"firstname": "Ada"}


def test_data_written_with_v2_is_unknown_to_a_v1_reader() -> None:
    evolved = _v2_change_event()
    new_bytes = evolved.encode({**_contact(), "schema_version": 2})
    with pytest.raises(UnknownSchema, match="unknown writer schema fingerprint"):
        CHANGE_EVENT.decode(new_bytes)


def test_invalid_records_name_the_field() -> None:
    bad = _contact()
    bad["op"] = "x"
    with pytest.raises(InvalidEvent) as caught:
        CHANGE_EVENT.encode(bad)
    assert caught.value.errors[0][0] == "op"
    nested = _contact()
    nested["after"]["address"] = {"city": "Paris"}  # a map is not a field value
    with pytest.raises(InvalidEvent, match="after"):
        CHANGE_EVENT.encode(nested)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc3", b"\xc3\x01", b"{}", b"\x00\x00\x00\x00\x01abc", b"\xc3\x02" + b"\x00" * 12],
)
def test_malformed_framing_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(MalformedEvent):
        CHANGE_EVENT.decode(data)


def test_truncated_and_extended_bodies_are_typed_errors() -> None:
    data = CHANGE_EVENT.encode(_contact(lastname="Lovelace"))
    for cut in range(10, len(data)):
        with pytest.raises(MalformedEvent):
            CHANGE_EVENT.decode(data[:cut])
    with pytest.raises(MalformedEvent, match="trailing"):
        CHANGE_EVENT.decode(data + b"\x00")


def test_random_bytes_never_escape_as_anything_but_decode_errors() -> None:
    rng = random.Random(7)
    header = CHANGE_EVENT.encode(_contact())[:10]
    for _ in range(3000):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        data = header + body if rng.random() < 0.8 else body
        try:
            CHANGE_EVENT.decode(data)
        except DecodeError:
            pass
