"""A dead letter in the listing: values past 8 KiB shown truncated with their size; a forged
timestamp or a huge header does not break the listing."""

from __future__ import annotations

import base64

from aiokafka.structs import ConsumerRecord

from crmsync.control.dead_letters import VALUE_PREVIEW_BYTES
from crmsync.control.dead_letters import dead_letter as _dead_letter
from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams.kafka.events import change_event


def _record(
    value: bytes, timestamp: int = 1_700_000_000_000, **headers: bytes
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="crmsync.d365-to-campaign.dlq", partition=0, offset=7, timestamp=timestamp,
        timestamp_type=0, key=b"k", value=value, checksum=None, serialized_key_size=1,
        serialized_value_size=len(value), headers=list(headers.items()),
    )  # fmt: skip


def test_a_large_value_is_shown_truncated_with_its_size() -> None:
    letter = _dead_letter(_record(b"\x00" * 4_000_000))
    assert letter.value_size == 4_000_000 and letter.value_truncated
    assert letter.value_base64 is not None
    assert len(base64.b64decode(letter.value_base64)) == VALUE_PREVIEW_BYTES


def test_a_small_event_is_decoded_whole() -> None:
    raw = CHANGE_EVENT.encode(change_event("u", "contact", "c-1", after={"a": "b"}, system="d365"))
    letter = _dead_letter(_record(raw))
    assert letter.value is not None and letter.value["key"] == "c-1"
    assert letter.value_size == len(raw) and not letter.value_truncated


def test_a_forged_timestamp_and_a_huge_header_do_not_break_the_listing() -> None:
    letter = _dead_letter(_record(b"x", timestamp=2**62, **{"crmsync.error.message": b"e" * 10**6}))
    assert letter.timestamp == str(2**62)
    assert len(letter.headers["crmsync.error.message"]) < 3000
