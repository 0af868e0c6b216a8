"""Dead letters as an operator reads them, and re-driving them through their workflow.

A re-drive republishes a dead letter's original bytes to its source topic and partition (so the
workflow reads it again after whatever that key had before, in the key's order), with headers
naming the re-drive and the dead letter; then it appends a *marker* to the dead-letter topic, in
the dead letter's partition: an empty record whose headers name the dead letter's offset, the
re-drive and where the event went. Listings and later re-drives read the markers with the dead
letters, so a dead letter is re-driven once: a second re-drive finds the marker and skips it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from crmsync.control import models
from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT, DecodeError

#: Headers of a re-driven event (in its source topic) and of a marker (in the DLQ).
REDRIVE_ID = "crmsync.redrive.id"
REDRIVE_OF = "crmsync.redrive.of"  # event: "<dlq topic>/<partition>/<offset>"; marker: "<offset>"
REDRIVE_TO = "crmsync.redrive.to"  # marker: "<topic>/<partition>/<offset>" the event went to
REDRIVE_BY = "crmsync.redrive.by"
MARKER = "crmsync.redrive.marker"

#: How much of a dead letter's value and of each header the listing shows.
VALUE_PREVIEW_BYTES = 8 * 1024
HEADER_PREVIEW_CHARS = 2048


class DlqOffset(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class DeadLetterFilter(BaseModel):
    """Which dead letters: every criterion given must hold (none given: all of them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str | None = Field(
        default=None, max_length=500, description="text in the error message (any case)"
    )
    error_class: str | None = Field(default=None, max_length=200, description="e.g. RecordRejected")
    key: str | None = Field(default=None, max_length=500, description="the record's key")
    since: AwareDatetime | None = Field(default=None, description="dead-lettered at or after")
    until: AwareDatetime | None = Field(default=None, description="dead-lettered before")
    offsets: list[DlqOffset] | None = Field(
        default=None, max_length=1000, description="exactly these dead letters (DLQ positions)"
    )

    def matches(self, letter: models.DeadLetter) -> bool:
        if self.reason and self.reason.lower() not in (letter.reason or "").lower():
            return False
        if self.error_class and self.error_class != letter.error_class:
            return False
        if self.key is not None and self.key != letter.key:
            return False
        at = _parse_time(letter.failed_at or letter.timestamp)
        if self.since is not None and (at is None or at < self.since):
            return False
        if self.until is not None and (at is None or at >= self.until):
            return False
        if self.offsets is not None and DlqOffset(
            partition=letter.partition, offset=letter.offset
        ) not in set(self.offsets):
            return False
        return True


class RedriveBody(DeadLetterFilter):
    dry_run: bool = Field(
        default=False, description="count what would be re-driven (the confirmation), send none"
    )


class RedrivenItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    partition: int
    offset: int
    key: str | None
    to_topic: str
    to_partition: int
    to_offset: int | None = Field(description="null on a dry run")


class SkippedItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    partition: int
    offset: int
    key: str | None
    why: str


class RedriveAnswer(BaseModel):
    model_config = ConfigDict(frozen=True)

    workflow: str
    redrive_id: str | None = Field(description="null on a dry run")
    dry_run: bool
    matched: int = Field(description="dead letters the filter matched")
    redriven: list[RedrivenItem]
    skipped: list[SkippedItem] = Field(description="matched but not sent, and why")
    complete: bool = Field(
        description="false: the DLQ holds more than one read covers; older ones were not looked at"
    )


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _headers(record: Any) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in record.headers or ()}


def is_marker(record: Any) -> bool:
    return any(k == MARKER for k, _ in record.headers or ())


def marks(records: Iterable[Any]) -> dict[tuple[int, int], models.RedriveMark]:
    """(DLQ partition, offset) of each re-driven dead letter → its marker."""
    found: dict[tuple[int, int], models.RedriveMark] = {}
    for record in records:
        if not is_marker(record):
            continue
        headers = _headers(record)
        try:
            of = int(headers.get(REDRIVE_OF, ""))
        except ValueError:
            continue
        found[(record.partition, of)] = models.RedriveMark(
            redrive_id=headers.get(REDRIVE_ID, ""),
            at=headers.get("crmsync.time", ""),
            by=headers.get(REDRIVE_BY, ""),
            to=headers.get(REDRIVE_TO, ""),
        )
    return found


def letters(records: list[Any]) -> list[models.DeadLetter]:
    """The dead letters among `records` (newest first, as read), markers applied to them."""
    marked = marks(records)
    # A re-driven event that failed again comes back as a new dead letter whose source position
    # is where the re-drive sent it.
    sent_to = {mark.to: (p, o) for (p, o), mark in marked.items() if mark.to}
    shown = []
    for record in records:
        if is_marker(record):
            continue
        letter = dead_letter(record, marked.get((record.partition, record.offset)))
        origin = f"{letter.source_topic}/{letter.source_partition}/{letter.source_offset}"
        if origin in sent_to:
            p, o = sent_to[origin]
            letter = letter.model_copy(update={"returned_from": {"partition": p, "offset": o}})
        shown.append(letter)
    return shown


def dead_letter(record: Any, mark: models.RedriveMark | None = None) -> models.DeadLetter:
    raw_headers = _headers(record)
    headers = {k: _shortened(v, HEADER_PREVIEW_CHARS) for k, v in raw_headers.items()}
    value: dict[str, Any] | None = None
    raw: bytes = record.value or b""
    for schema in (CHANGE_EVENT, EMAIL_EVENT) if len(raw) <= VALUE_PREVIEW_BYTES else ():
        try:
            value = schema.decode(raw)
            break
        except DecodeError:
            continue
    shown = raw[:VALUE_PREVIEW_BYTES]
    return models.DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp=_when(record.timestamp),
        key=record.key.decode(errors="replace") if record.key is not None else None,
        headers=headers,
        value=value,
        value_base64=None if value is not None else base64.b64encode(shown).decode(),
        value_size=len(raw),
        value_truncated=value is None and len(shown) < len(raw),
        reason=headers.get("crmsync.error.message"),
        error_class=headers.get("crmsync.error.class"),
        attempts=_int(raw_headers.get("crmsync.attempts")),
        failed_at=raw_headers.get("crmsync.time"),
        source_topic=raw_headers.get("crmsync.source.topic"),
        source_partition=_int(raw_headers.get("crmsync.source.partition")),
        source_offset=_int(raw_headers.get("crmsync.source.offset")),
        redriven=mark,
    )


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _when(timestamp_ms: int) -> str:
    """A record's timestamp in ISO-8601; a producer may set any long, so one out of range
    is shown as it is rather than failing the listing."""
    try:
        return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat()
    except (ValueError, OverflowError, OSError):
        return str(timestamp_ms)


def _shortened(text: str, most: int) -> str:
    return text if len(text) <= most else f"{text[:most]}… ({len(text)} characters)"


def event_headers(
    redrive_id: str, dlq_topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    return [
        (REDRIVE_ID, redrive_id.encode()),
        (REDRIVE_OF, f"{dlq_topic}/{partition}/{offset}".encode()),
    ]


def marker_headers(
    redrive_id: str, offset: int, to: str, by: str, at: str | None = None
) -> list[tuple[str, bytes]]:
    values: Mapping[str, str] = {
        MARKER: "1",
        REDRIVE_ID: redrive_id,
        REDRIVE_OF: str(offset),
        REDRIVE_TO: to,
        REDRIVE_BY: by,
        "crmsync.time": at or datetime.now(UTC).isoformat(),
    }
    return [(k, v.encode()) for k, v in values.items()]
