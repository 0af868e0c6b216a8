"""Opt-in/opt-out sync decisions: direction, newest change wins, opt-out wins a tie, no echoes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
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
class SideState:
    """What one side held as far as crmsync knows: what it showed, what we wrote there.

    ``read`` is the flag of the last event from the side that counted (None: never read, the
    side holds the default, opted in), at its source time ``read_ts``. ``wrote`` is the value
    crmsync last wrote there, acknowledged at ``wrote_ts`` (crmsync's clock; None while the
    write is under way). ``written`` holds every value written since ``read``: until
    ``wrote_ts`` the side's events may show any of them (or ``read``), our write not having
    landed yet, or its echo coming back.
    """

    read: bool | None = None
    read_ts: int = 0
    wrote: bool | None = None
    wrote_ts: int | None = None
    written: frozenset[bool] = frozenset()

    def held(self) -> bool:
        """The value the side holds now, as far as crmsync knows."""
        if self.wrote is not None and (self.wrote_ts is None or self.wrote_ts >= self.read_ts):
            return self.wrote
        return bool(self.read)

    def in_window(self, ts_ms: int) -> bool:
        """Whether an event at ``ts_ms`` may predate our last write landing (or be its echo)."""
        return self.wrote is not None and (self.wrote_ts is None or ts_ms < self.wrote_ts)


@dataclass(frozen=True)
class OptOutState:
    """The opt-out of one contact: the winning value with its source time and side, and what
    each side held as far as crmsync knows.

    The runtime keeps one per contact key (in a compacted topic) and stores a decision's state
    once its writes are acknowledged.
    """

    value: bool
    ts_ms: int
    origin: Side
    d365: SideState = SideState()
    campaign: SideState = SideState()

    def side(self, side: Side) -> SideState:
        return self.d365 if side == "d365" else self.campaign

    def with_side(self, side: Side, known: SideState) -> OptOutState:
        return replace(self, d365=known) if side == "d365" else replace(self, campaign=known)

    def acknowledged(self, now_ms: int) -> OptOutState:
        """The state once its writes went through: their time is known."""
        return replace(
            self,
            d365=_acked(self.d365, now_ms),
            campaign=_acked(self.campaign, now_ms),
        )


def _acked(known: SideState, now_ms: int) -> SideState:
    return (
        replace(known, wrote_ts=now_ms)
        if known.wrote is not None and known.wrote_ts is None
        else known
    )


@dataclass(frozen=True)
class OptOutDecision:
    """What to write for one change, the state to keep afterwards (None: keep the old one), why.

    A decision without writes that still learnt something (a side's change that lost, say)
    says what in ``observed`` (side, value, source time), so it can be applied to whatever
    state is kept when it is stored (``observe``), not to the pending decisions it saw.
    """

    writes: list[Write]
    state: OptOutState | None
    reason: str
    observed: tuple[Side, bool, int] | None = None


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
    ``ignore_users``, a delete, an event not carrying the opt-out field, or carrying the value
    it had before, changes nothing. Then the event is held against what ``side`` held as far
    as crmsync knows (a Dynamics row carries its flag whatever was edited: no before-image):

    - older than the last event read from the side: a replay or duplicate, nothing;
    - while crmsync's write there may not have landed yet (not acknowledged before the
      event's time): showing the value read last or any value we wrote is no change;
    - after it: showing what the side holds (our write, or what it showed last) is no change.

    Only a flag that differs is the side's change, and only then are times compared, against
    the winning change: an older one is stale, an equal time is a tie that opt-out (true)
    wins; otherwise the value is written to the other side (update only, the one field) and
    wins. When crmsync's last write to ``side`` differs and may have landed after this change
    (a write parked until the profile existed, say), the value is also written back to
    ``side``: the newer value must hold on both sides.
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
        other_name = CAMPAIGN_SPELLINGS.get(config.campaign_field)
        names = (config.campaign_field, other_name) if other_name else (config.campaign_field,)
    found = _field_in(event.get("after"), names)
    if found is None:
        return OptOutDecision([], None, "field absent")
    value = _flag(found[1], found[0], key)
    found_before = _field_in(event.get("before"), names)
    before = None if found_before is None else _flag(found_before[1], found_before[0], key)
    if before == value:
        return OptOutDecision([], None, "field unchanged")
    ts_ms = source.get("ts_ms")
    if not isinstance(ts_ms, int) or isinstance(ts_ms, bool) or ts_ms not in EPOCH_MS_RANGE:
        # A time past 9999 would win every later change of the contact, so it is refused too.
        raise MappingError(f"source.ts_ms of {key} is not epoch milliseconds: {ts_ms!r}")

    known = state.side(side) if state is not None else SideState()
    if known.read is not None and ts_ms < known.read_ts:
        return OptOutDecision([], None, "stale")
    if not _changed(known, value, before, ts_ms):
        echo = value in known.written or value == known.wrote
        return OptOutDecision([], None, "echo suppressed" if echo else "not a change")

    other = _OTHER[side]
    if state is not None and value == state.value:
        return _observed(state, side, value, ts_ms, "agrees")
    if state is not None and ts_ms < state.ts_ms:
        return _observed(state, side, value, ts_ms, "stale")
    tie = state is not None and ts_ms == state.ts_ms
    if state is not None and tie and not value:
        return _observed(state, side, value, ts_ms, "opt-out wins tie")

    mine = _read(known, value, ts_ms)
    writes = [_write(key, value, side, config)]
    theirs = state.side(other) if state is not None else SideState()
    theirs = replace(theirs, wrote=value, wrote_ts=None, written=theirs.written | {value})
    if known.wrote is not None and known.wrote != value and known.in_window(ts_ms):
        writes.append(_write(key, value, other, config))
        mine = replace(mine, wrote=value, wrote_ts=None, written=mine.written | {value})
    decided = OptOutState(value, ts_ms, side).with_side(side, mine).with_side(other, theirs)
    return OptOutDecision(writes, decided, "opt-out wins tie" if tie else "synced")


def _changed(known: SideState, value: bool, before: bool | None, ts_ms: int) -> bool:
    """Whether the side's flag changed, given what crmsync knows it held."""
    if known.in_window(ts_ms):
        if before is not None:  # the producer saw it change: unless to a value we wrote
            return value not in known.written
        return value not in known.written and value != bool(known.read)
    if known.read is None and known.wrote is None:
        return value != (before if before is not None else False)
    return value != known.held()


def _read(known: SideState, value: bool, ts_ms: int) -> SideState:
    """The side, having shown ``value`` at ``ts_ms``."""
    written = known.written if known.in_window(ts_ms) else frozenset[bool]()
    return replace(known, read=value, read_ts=ts_ms, written=written)


def observe(state: OptOutState, side: Side, value: bool, ts_ms: int) -> OptOutState:
    """``state`` after ``side`` showed a changed ``value`` that decided nothing: the side
    holds it now, and when it agrees with the winner it is the newer change of that value."""
    known = state.side(side)
    if known.read is not None and ts_ms < known.read_ts:
        return state
    seen = state.with_side(side, _read(known, value, ts_ms))
    if value == state.value and ts_ms > state.ts_ms:
        seen = replace(seen, ts_ms=ts_ms, origin=side)
    return seen


def _observed(state: OptOutState, side: Side, value: bool, ts_ms: int, why: str) -> OptOutDecision:
    return OptOutDecision(
        [], observe(state, side, value, ts_ms), why, observed=(side, value, ts_ms)
    )


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


#: Version 2 adds what each side held; it keeps version 1's keys, with their meaning (the
#: winning value, its source time and side), so a worker of version 1 reads it as before.
STATE_VERSION = 2


def state_to_bytes(state: OptOutState) -> bytes:
    """A state as the value of the compacted state topic (small JSON)."""
    return json.dumps(
        {
            "v": STATE_VERSION,
            "value": state.value,
            "ts_ms": state.ts_ms,
            "origin": state.origin,
            "d365": _side_to_json(state.d365),
            "campaign": _side_to_json(state.campaign),
        },
        separators=(",", ":"),
    ).encode()


def _side_to_json(known: SideState) -> dict[str, Any]:
    return {
        "read": known.read,
        "read_ts": known.read_ts,
        "wrote": known.wrote,
        "wrote_ts": known.wrote_ts,
        "written": sorted(known.written),
    }


class MalformedState(ValueError):
    """A record of the state topic that is not an opt-out state."""


def state_from_bytes(data: bytes | None, stored_ms: int | None = None) -> OptOutState | None:
    """The state stored by ``state_to_bytes``; None for a tombstone (or nothing).

    A version 1 record (the winning value, time and side only) is upgraded: its side showed
    the value then, and crmsync wrote it to the other side, acknowledged by ``stored_ms``
    (the record's timestamp) at the latest. Raises MalformedState for anything else.
    """
    if not data:
        return None
    try:
        raw = json.loads(data)
        origin = raw["origin"]
        if origin not in ("d365", "campaign"):
            raise MalformedState(f"unknown origin {origin!r} in an opt-out state")
        value, ts_ms = _bool(raw["value"]), _int(raw["ts_ms"])
        version = raw.get("v", 1)
        if version == 1:
            wrote_ts = stored_ms if stored_ms is not None else ts_ms
            mine = SideState(read=value, read_ts=ts_ms)
            theirs = SideState(wrote=value, wrote_ts=wrote_ts, written=frozenset({value}))
            return (
                OptOutState(value, ts_ms, origin)
                .with_side(origin, mine)
                .with_side(_OTHER[origin], theirs)
            )
        if version != STATE_VERSION:
            raise MalformedState(f"opt-out state version {version!r} is not understood")
        return OptOutState(
            value, ts_ms, origin, _side_from_json(raw["d365"]), _side_from_json(raw["campaign"])
        )
    except MalformedState:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise MalformedState(f"not an opt-out state: {error!r}") from error


def _side_from_json(raw: Mapping[str, Any]) -> SideState:
    read, wrote, wrote_ts = raw["read"], raw["wrote"], raw["wrote_ts"]
    return SideState(
        read=None if read is None else _bool(read),
        read_ts=_int(raw["read_ts"]),
        wrote=None if wrote is None else _bool(wrote),
        wrote_ts=None if wrote_ts is None else _int(wrote_ts),
        written=frozenset(_bool(v) for v in raw["written"]),
    )


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise MalformedState(f"{value!r} is not a boolean")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedState(f"{value!r} is not epoch milliseconds")
    return value


__all__ = [
    "MalformedState",
    "OptOutDecision",
    "OptOutState",
    "SideState",
    "decide",
    "observe",
    "side_of",
    "state_from_bytes",
    "state_to_bytes",
]
