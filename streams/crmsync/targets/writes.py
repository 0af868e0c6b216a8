"""The create-fields rule: fields written only when a write creates the record, never over it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

WriteMode = Literal["upsert", "create", "update"]


def creates_first(create_fields: Mapping[str, Any], mode: WriteMode) -> bool:
    """Whether the write starts as a create-only write carrying ``create_fields``.

    An update-only write never creates, so its create fields have nowhere to go.
    """
    return bool(create_fields) and mode != "update"


def when_created(fields: Mapping[str, Any], create_fields: Mapping[str, Any]) -> dict[str, Any]:
    """What a write that creates the record sends: its fields and its create fields."""
    return {**fields, **create_fields}


def when_existing(fields: Mapping[str, Any], mode: WriteMode) -> dict[str, Any] | None:
    """What a write sends to a record that already exists: its fields (never its create fields),
    or None when nothing is to be written (a create-only write, or no fields but create fields).
    """
    if mode == "create" or not fields:
        return None
    return dict(fields)
