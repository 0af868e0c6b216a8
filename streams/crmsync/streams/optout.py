"""Opt-in/opt-out sync decisions: direction, newest change wins, opt-out wins a tie, no echoes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from crmsync.streams.config import OptInOutConfig
from crmsync.streams.mapping import EPOCH_MS_RANGE, GUID, MappingError, Write
from crmsync.streams.sinks.base import SinkRecord

Side = Literal["d365", "campaign"]
#: The two spellings of Campaign's email opt-out flag (newer docs say denyListEmail).
CAMPAIGN_SPELLINGS = {
    "blackListEmail": "denyListEmail",
    "denyListEmail": "blackListEmail",
    "blackList": "denyList",
    "denyList": "blackList",
}


@dataclass(frozen=True)
class OptOutState:
    """The last opt-out value synced for a contact, with its source time and side.

    The runtime keeps one per contact key (in a compacted topic) and stores the decision's new
    state once its writes are acknowledged.
    """

    value: bool
    ts_ms: int
    origin: Side


@dataclass(frozen=True)
class OptOutDecision:
    """What to write for one change, the state to keep afterwards (None: keep the old one), why."""

    writes: list[Write]
    state: OptOutState | None
    reason: str


def side_of(topic: str, config: OptInOutConfig | None = None) -> Side:
    """Which system a topic's changes come from."""
    config = config or OptInOutConfig()
    if topic == config.contact_topic:
        return "d365"
    if topic == config.profile_topic:
        return "campaign"
    raise ValueError(f"opt-in-out does not read topic {topic!r}")


def _flag(value: Any, field: str, key: str) -> bool:
    """An opt-out value as a boolean: null (never set) is false; 0/1 and "true"/"false" too."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise MappingError(f"{field} of {key} is not a boolean: {value!r}")


def _field_in(image: Mapping[str, Any] | None, names: tuple[str, ...]) -> tuple[str, Any] | None:
    for name in names:
        if image is not None and name in image:
            return name, image[name]
    return None


def decide(
    event: Mapping[str, Any], side: Side, state: OptOutState | None, config: OptInOutConfig
) -> OptOutDecision:
    """The decision for one ChangeEvent of a contact (``side="d365"``) or profile (``"campaign"``).

    In order: a direction that excludes ``side`` (or ``disabled``), a change made by one of
    ``ignore_users``, a delete, or an event not carrying the opt-out field, or carrying the value
    it had before, changes nothing. Then against the state: the value last synced is an echo
    (suppressed); an older source time is stale; an equal time is a tie that opt-out (true) wins.
    Otherwise the value is written to the other side — update only, the one field — and becomes
    the state. When the state came from the other side, the value is also written back to
    ``side``: the integration's last write there may have landed after this newer change and
    overwritten it (a write parked until the profile existed, say); the newer value must hold on
    both sides, and the write back is an echo if it changes nothing.
    """
    if not config.syncs(side):
        return OptOutDecision([], None, "direction excludes")
    key = event.get("key")
    if not isinstance(key, str) or not key:
        raise MappingError(f"the event has no contact key (key={key!r})")
    source = event.get("source") or {}
    if source.get("user") is not None and source.get("user") in config.ignore_users:
        return OptOutDecision([], None, "echo suppressed")
    if event.get("op") == "d":
        return OptOutDecision([], None, "deleted")
    if side == "d365":
        names: tuple[str, ...] = (config.d365_field,)
    else:
        other = CAMPAIGN_SPELLINGS.get(config.campaign_field)
        names = (config.campaign_field, other) if other else (config.campaign_field,)
    found = _field_in(event.get("after"), names)
    if found is None:
        return OptOutDecision([], None, "field absent")
    value = _flag(found[1], found[0], key)
    before = _field_in(event.get("before"), names)
    if before is not None and _flag(before[1], before[0], key) == value:
        return OptOutDecision([], None, "field unchanged")
    ts_ms = source.get("ts_ms")
    if not isinstance(ts_ms, int) or isinstance(ts_ms, bool) or ts_ms not in EPOCH_MS_RANGE:
        # A time past 9999 would win every later change of the contact, so it is refused too.
        raise MappingError(f"source.ts_ms of {key} is not epoch milliseconds: {ts_ms!r}")
    if state is not None:
        if value == state.value:
            return OptOutDecision([], None, "echo suppressed")
        if ts_ms < state.ts_ms:
            return OptOutDecision([], None, "stale")
        if ts_ms == state.ts_ms and not value:
            return OptOutDecision([], None, "opt-out wins tie")
    reason = "opt-out wins tie" if state is not None and ts_ms == state.ts_ms else "synced"
    writes = [_write(key, value, side, config)]
    if state is not None and state.origin != side:
        writes.append(_write(key, value, _OTHER[side], config))
    return OptOutDecision(writes, OptOutState(value, ts_ms, side), reason)


_OTHER: dict[Side, Side] = {"d365": "campaign", "campaign": "d365"}


def _write(key: str, value: bool, side: Side, config: OptInOutConfig) -> Write:
    """The update-only write of the opt-out flag on the other side (nothing else is touched)."""
    if side == "d365":
        record = SinkRecord(
            config.profile_resource,
            key,
            fields={config.campaign_field: value},
            mode="update",
            key_field="externalId",
        )
        return Write("campaign", record)
    if not GUID.match(key):
        raise MappingError(f"profile externalId {key!r} is not a Dynamics contactid (a GUID)")
    record = SinkRecord(
        config.contact_entity_set, key.lower(), fields={config.d365_field: value}, mode="update"
    )
    return Write("d365", record)


def state_to_bytes(state: OptOutState) -> bytes:
    """A state as the value of the compacted state topic (small JSON)."""
    return json.dumps(
        {"value": state.value, "ts_ms": state.ts_ms, "origin": state.origin},
        separators=(",", ":"),
    ).encode()


def state_from_bytes(data: bytes | None) -> OptOutState | None:
    """The state stored by ``state_to_bytes``; None for a tombstone (or nothing)."""
    if not data:
        return None
    raw = json.loads(data)
    origin = raw["origin"]
    if origin not in ("d365", "campaign"):
        raise ValueError(f"unknown origin {origin!r} in an opt-out state")
    return OptOutState(bool(raw["value"]), int(raw["ts_ms"]), origin)


__all__ = [
    "OptOutDecision",
    "OptOutState",
    "decide",
    "side_of",
    "state_from_bytes",
    "state_to_bytes",
]
