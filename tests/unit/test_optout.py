"""Opt-in/opt-out decisions: direction, conflicts, echo suppression and a ping-pong that settles."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from crmsync.streams.catalog import parse_config
from crmsync.streams.config import OptInOutConfig
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.mapping import MappingError
from crmsync.streams.optout import (
    MalformedState,
    OptOutDecision,
    OptOutState,
    SideState,
    decide,
    side_of,
    state_from_bytes,
    state_to_bytes,
)
from crmsync.streams.workflows import Planned

CONTACT = str(uuid.UUID(int=5))
FIELD = {"d365": "donotbulkemail", "campaign": "blackListEmail"}


def config(**data: Any) -> OptInOutConfig:
    parsed = parse_config("opt-in-out", data)
    assert isinstance(parsed, OptInOutConfig)
    return parsed


def flip(
    side: str,
    value: Any,
    ts: int,
    *,
    before: Any = "absent",
    field: str | None = None,
    user: str | None = None,
    op: str = "u",
) -> dict[str, Any]:
    name = field or FIELD[side]
    return {
        "op": op,
        "entity": "contact" if side == "d365" else "profile",
        "key": CONTACT,
        "before": None if before == "absent" else {name: before},
        "after": None if op == "d" else {name: value, "firstname": "Ada"},
        "source": {"system": side, "ts_ms": ts, "user": user, "txid": None},
        "ts_ms": ts + 5,
    }


def synced(value: bool, ts: int, origin: str, acked: int | None = None) -> OptOutState:
    """The state a change of ``origin`` leaves once synced: it showed the value at ``ts``, and
    crmsync's write of it to the other side was acknowledged at ``acked`` (default ts + 1000)."""
    other = "campaign" if origin == "d365" else "d365"
    state = OptOutState(value, ts, origin)  # type: ignore[arg-type]
    state = state.with_side(origin, SideState(read=value, read_ts=ts))  # type: ignore[arg-type]
    return state.with_side(
        other,  # type: ignore[arg-type]
        SideState(
            wrote=value, wrote_ts=ts + 1000 if acked is None else acked, written=frozenset({value})
        ),
    )


def written(decision: OptOutDecision | Planned) -> list[tuple[str, str, dict[str, Any], str]]:
    return [
        (w.system, w.record.target, dict(w.record.fields), w.record.mode) for w in decision.writes
    ]


def test_a_dynamics_opt_out_updates_only_the_campaign_flag_of_the_profile() -> None:
    decision = decide(flip("d365", True, 100), "d365", None, config())

    assert decision.reason == "synced"
    assert written(decision) == [
        ("campaign", "profileAndServicesExt/profile", {"blackListEmail": True}, "update")
    ]
    assert decision.writes[0].record.key == CONTACT
    assert decision.writes[0].record.key_field == "externalId"
    assert decision.state is not None
    assert (decision.state.value, decision.state.ts_ms, decision.state.origin) == (
        True,
        100,
        "d365",
    )


def test_a_campaign_opt_out_updates_only_the_dynamics_flag_of_the_contact() -> None:
    decision = decide(flip("campaign", True, 100), "campaign", None, config())

    assert written(decision) == [("d365", "contacts", {"donotbulkemail": True}, "update")]
    assert decision.writes[0].record.key == CONTACT
    assert decision.state is not None
    assert decision.state.acknowledged(150) == synced(True, 100, "campaign", acked=150)


@pytest.mark.parametrize("spelling", ["denyListEmail", "blackListEmail"])
def test_both_campaign_spellings_are_understood(spelling: str) -> None:
    decision = decide(flip("campaign", True, 100, field=spelling), "campaign", None, config())
    assert written(decision) == [("d365", "contacts", {"donotbulkemail": True}, "update")]
    # Configured with the newer name, the older one is still read.
    other = decide(
        flip("campaign", True, 100, field="blackListEmail"),
        "campaign",
        None,
        config(campaign_field="denyListEmail"),
    )
    assert other.writes


@pytest.mark.parametrize(
    ("direction", "d365_synced", "campaign_synced"),
    [
        ("bidirectional", True, True),
        ("d365-to-campaign", True, False),
        ("campaign-to-d365", False, True),
        ("disabled", False, False),
    ],
)
def test_direction_gates_each_side(
    direction: str, d365_synced: bool, campaign_synced: bool
) -> None:
    settings = config(direction=direction)
    from_d365 = decide(flip("d365", True, 100), "d365", None, settings)
    from_campaign = decide(flip("campaign", True, 100), "campaign", None, settings)

    assert bool(from_d365.writes) is d365_synced
    assert bool(from_campaign.writes) is campaign_synced
    for decision, synced in ((from_d365, d365_synced), (from_campaign, campaign_synced)):
        if not synced:
            assert decision.reason == "direction excludes" and decision.state is None


def test_an_event_without_the_field_or_with_it_unchanged_changes_nothing() -> None:
    no_field = flip("d365", True, 100)
    no_field["after"] = {"firstname": "Ada"}
    unchanged = flip("d365", True, 100, before=True)
    deleted = flip("d365", None, 100, op="d")

    for event, reason in (
        (no_field, "field absent"),
        (unchanged, "field unchanged"),
        (deleted, "deleted"),
    ):
        decision = decide(event, "d365", OptOutState(False, 50, "d365"), config())
        assert (decision.writes, decision.state, decision.reason) == ([], None, reason)


def test_the_newer_change_wins_and_a_stale_one_is_dropped() -> None:
    state = synced(True, 200, "d365", acked=300)

    stale = decide(flip("campaign", False, 150, before=True), "campaign", state, config())
    newer = decide(flip("campaign", False, 250, before=True), "campaign", state, config())

    assert (stale.writes, stale.reason) == ([], "stale")
    assert written(newer) == [
        ("d365", "contacts", {"donotbulkemail": False}, "update"),
        # the state came from Dynamics: our write into Campaign may have landed after this change
        ("campaign", "profileAndServicesExt/profile", {"blackListEmail": False}, "update"),
    ]
    assert newer.state is not None
    assert (newer.state.value, newer.state.ts_ms, newer.state.origin) == (False, 250, "campaign")


def test_on_a_tie_opt_out_wins() -> None:
    opted_in = synced(False, 300, "d365")
    opted_out = synced(True, 300, "d365")

    out = decide(flip("campaign", True, 300, before=False), "campaign", opted_in, config())
    back_in = decide(flip("campaign", False, 300, before=True), "campaign", opted_out, config())

    assert out.reason == "opt-out wins tie"
    assert written(out)[0] == ("d365", "contacts", {"donotbulkemail": True}, "update")
    assert out.state is not None and (out.state.value, out.state.origin) == (True, "campaign")
    assert (back_in.writes, back_in.reason) == ([], "opt-out wins tie")
    assert back_in.state is not None and back_in.state.value is True


def test_the_echo_of_our_own_write_is_suppressed() -> None:
    state = synced(True, 100, "d365", acked=150)  # we wrote True to Campaign, acknowledged at 150
    echo = decide(flip("campaign", True, 140, before=False), "campaign", state, config())
    late_echo = decide(flip("campaign", True, 190), "campaign", state, config())
    assert (echo.writes, echo.state, echo.reason) == ([], None, "echo suppressed")
    assert (late_echo.writes, late_echo.state, late_echo.reason) == ([], None, "echo suppressed")


def test_changes_by_the_integration_user_are_never_synced() -> None:
    settings = config(ignore_users=["crmsync-app"])
    decision = decide(flip("d365", True, 100, user="crmsync-app"), "d365", None, settings)
    assert (decision.writes, decision.reason) == ([], "echo suppressed")


def test_garbage_values_and_keys_are_mapping_errors_but_null_means_opted_in() -> None:
    with pytest.raises(MappingError, match="not a boolean"):
        decide(flip("d365", "perhaps", 100), "d365", None, config())
    nulled = decide(flip("d365", None, 100), "d365", synced(True, 50, "d365"), config())
    assert written(nulled)[0][2] == {"blackListEmail": False}
    bad_key = flip("campaign", True, 100)
    bad_key["key"] = "crm-42"
    with pytest.raises(MappingError, match="not a Dynamics contactid"):
        decide(bad_key, "campaign", None, config())


class Systems:
    """Both systems and the runtime's state: applies writes, and publishes their echo events."""

    def __init__(self, settings: OptInOutConfig) -> None:
        self.settings = settings
        self.values = {"d365": False, "campaign": False}
        self.state: OptOutState | None = None
        self.writes: list[tuple[str, bool]] = []
        self.clock = 1_000

    def change(self, side: str, value: bool) -> list[tuple[str, dict[str, Any]]]:
        """A user's change on ``side``; returns the events the systems publish."""
        self.clock += 10
        before, self.values[side] = self.values[side], value
        return [(side, flip(side, value, self.clock, before=before))]

    def deliver(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Feed events to the workflow until no more are produced (echoes included)."""
        queue = list(events)
        while queue:
            side, event = queue.pop(0)
            decision = decide(event, side, self.state, self.settings)  # type: ignore[arg-type]
            if decision.state is not None:
                self.state = decision.state.acknowledged(self.clock + 1)
            for write in decision.writes:
                target = "campaign" if write.system == "campaign" else "d365"
                (value,) = write.record.fields.values()
                self.writes.append((target, value))
                if self.values[target] != value:  # the target publishes its own change event
                    queue += self.change(target, value)


def test_a_ping_pong_converges_one_write_per_change() -> None:
    systems = Systems(config())

    systems.deliver(systems.change("d365", True))
    systems.deliver(systems.change("campaign", False))
    systems.deliver(systems.change("campaign", True))
    systems.deliver(systems.change("d365", False))

    # Each write was acknowledged before the next change was made: no write-back is needed,
    # and the echo of each write (the target's change event) is suppressed.
    assert systems.writes == [
        ("campaign", True),
        ("d365", False),
        ("d365", True),
        ("campaign", False),
    ]
    assert systems.values == {"d365": False, "campaign": False}


def test_a_sync_that_lands_after_a_newer_change_on_its_target_is_undone() -> None:
    """A Dynamics opt-in is synced to Campaign late (the write waited for the profile); a
    Campaign opt-out made meanwhile is newer and must hold on both sides."""
    settings = config()
    values = {"d365": False, "campaign": False}
    opted_in = decide(flip("d365", False, 100, before=True), "d365", None, settings)
    values["campaign"] = True  # the user blacklists the profile (ts 110)...
    for write in opted_in.writes:  # ...then the late write lands over it
        values[write.system] = next(iter(write.record.fields.values()))
    assert values == {"d365": False, "campaign": False}

    blacklisted = decide(flip("campaign", True, 110), "campaign", opted_in.state, settings)
    for write in blacklisted.writes:
        values[write.system] = next(iter(write.record.fields.values()))

    assert values == {"d365": True, "campaign": True}
    assert blacklisted.state is not None
    assert (blacklisted.state.value, blacklisted.state.ts_ms) == (True, 110)


def test_side_of_and_state_bytes_round_trip() -> None:
    assert side_of("d365.contact.changes") == "d365"
    assert side_of("campaign.profile.changes") == "campaign"
    with pytest.raises(ValueError, match="does not read"):
        side_of("campaign.email.events")
    state = synced(True, 1_714_564_800_250, "campaign")
    assert state_from_bytes(state_to_bytes(state)) == state
    pending = decide(flip("d365", True, 100), "d365", None, config()).state
    assert pending is not None and state_from_bytes(state_to_bytes(pending)) == pending
    assert state_from_bytes(None) is None and state_from_bytes(b"") is None


# -- issue 14: an edit that did not touch the flag -------------------------------------------


def test_a_dynamics_edit_made_before_our_write_landed_keeps_the_campaign_opt_out() -> None:
    """Dynamics change tracking has no before-image: a first-name edit made before crmsync's
    write of a Campaign opt-out reached Dynamics publishes the row, still opted in, later."""
    settings = config()
    opted_out = decide(flip("campaign", True, 1_000, before=False), "campaign", None, settings)
    assert written(opted_out) == [("d365", "contacts", {"donotbulkemail": True}, "update")]
    assert opted_out.state is not None
    edit = flip("d365", False, 2_000)  # donotbulkemail as the row held it, firstname edited

    while_writing = decide(edit, "d365", opted_out.state, settings)
    after_ack = decide(edit, "d365", opted_out.state.acknowledged(2_500), settings)

    for decision in (while_writing, after_ack):
        assert (decision.writes, decision.state, decision.reason) == ([], None, "not a change")


def test_an_opt_in_made_in_dynamics_after_our_write_landed_is_a_change() -> None:
    settings = config()
    opted_out = decide(flip("campaign", True, 1_000, before=False), "campaign", None, settings)
    assert opted_out.state is not None
    kept = opted_out.state.acknowledged(2_500)

    opted_in = decide(flip("d365", False, 3_000), "d365", kept, settings)
    echo = decide(flip("d365", True, 2_400), "d365", kept, settings)

    assert written(opted_in) == [
        ("campaign", "profileAndServicesExt/profile", {"blackListEmail": False}, "update")
    ]
    assert (echo.writes, echo.reason) == ([], "echo suppressed")


def test_an_unchanged_flag_on_a_contact_never_seen_is_not_an_opt_in() -> None:
    """Nothing known: the side held the default (opted in); an opt-out is a change."""
    settings = config()
    assert decide(flip("d365", False, 100), "d365", None, settings).reason == "not a change"
    assert decide(flip("d365", True, 100), "d365", None, settings).writes
    assert decide(flip("d365", False, 100, before=True), "d365", None, settings).writes


def test_a_losing_change_is_remembered_so_a_later_edit_does_not_win_with_it() -> None:
    settings = config()
    kept = synced(False, 2_000, "campaign", acked=5_000)  # a Campaign opt-in, written at 5000
    older = decide(flip("d365", True, 1_500, before=False), "d365", kept, settings)
    assert (older.writes, older.reason) == ([], "stale")
    assert older.state is not None
    # The row edited again before our write landed shows the same (older) opt-out: no change.
    edit = decide(flip("d365", True, 3_000), "d365", older.state, settings)
    assert (edit.writes, edit.reason) == ([], "not a change")


# -- the state topic: versions, upgrade, rolling upgrade, bad records ------------------------


def _v1_state_from_bytes(data: bytes) -> OptOutState:
    """How a worker of the previous release reads a state record (its code, verbatim)."""
    import json

    raw = json.loads(data)
    origin = raw["origin"]
    if origin not in ("d365", "campaign"):
        raise ValueError(f"unknown origin {origin!r} in an opt-out state")
    return OptOutState(bool(raw["value"]), int(raw["ts_ms"]), origin)


V1_CAMPAIGN_OPT_OUT = b'{"value":true,"ts_ms":1000,"origin":"campaign"}'


def test_a_previous_release_reads_the_winner_of_a_new_record() -> None:
    state = synced(True, 1_000, "campaign", acked=2_500)
    old_view = _v1_state_from_bytes(state_to_bytes(state))
    assert (old_view.value, old_view.ts_ms, old_view.origin) == (True, 1_000, "campaign")


def test_a_record_of_the_previous_release_is_upgraded_conservatively() -> None:
    """Written by an old worker after its write to Dynamics was acknowledged (record time)."""
    state = state_from_bytes(V1_CAMPAIGN_OPT_OUT, stored_ms=2_500)
    assert state == synced(True, 1_000, "campaign", acked=2_500)
    # The edit, made before that write landed, changes nothing; an opt-in after does.
    edit = decide(flip("d365", False, 2_000), "d365", state, config())
    opt_in = decide(flip("d365", False, 3_000), "d365", state, config())
    assert (edit.writes, edit.reason) == ([], "not a change")
    assert written(opt_in)[0][2] == {"blackListEmail": False}


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"value":true}',
        b'{"value":"yes","ts_ms":1,"origin":"d365"}',
        b'{"value":true,"ts_ms":1,"origin":"erp"}',
        b'{"v":2,"value":true,"ts_ms":1,"origin":"d365","d365":{},"campaign":null}',
        b'{"v":9,"value":true,"ts_ms":1,"origin":"d365"}',
    ],
)
def test_a_malformed_state_record_is_refused_and_the_workflow_keeps_what_it_knew(
    data: bytes,
) -> None:
    from crmsync.streams.workflows import OptInOut

    with pytest.raises(MalformedState):
        state_from_bytes(data)
    workflow = OptInOut(config(), KafkaClients("unused:9092"))
    workflow.remember(CONTACT, V1_CAMPAIGN_OPT_OUT, 2_500)
    workflow.remember(CONTACT, data, 3_000)  # logged, not raised
    assert workflow._states[CONTACT] == synced(True, 1_000, "campaign", acked=2_500)


async def test_a_decision_stored_while_an_older_one_is_pending_never_carries_it() -> None:
    """A Campaign opt-out waits for its write; an opt-in in the same millisecond loses the tie
    and, writing nothing, is acknowledged first. A stop then forgets the opt-out: read again,
    it must still be written."""
    from crmsync.streams.workflows import OptInOut

    class StateTopic:
        records: list[bytes] = []

        async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> None:
            self.records.append(value)

    workflow = OptInOut(config(), KafkaClients("unused:9092"), clock=lambda: 5_000)
    workflow._producer = StateTopic()
    workflow.remember(CONTACT, state_to_bytes(synced(False, 100, "d365", acked=200)))
    opt_out = flip("campaign", True, 1_000, before=False)
    (pending,) = await workflow.plan([("campaign.profile.changes", opt_out)])
    opt_in = flip("campaign", False, 1_000, before=True)
    (older,) = await workflow.plan([("campaign.profile.changes", opt_in)])
    assert pending.writes and not older.writes and older.after_written is not None

    await older.after_written()  # acknowledged first: the opt-out's writes are still under way
    assert workflow._states[CONTACT].value is False
    workflow.forget_pending()  # stop and start: the opt-out is read again
    (again,) = await workflow.plan([("campaign.profile.changes", opt_out)])

    assert written(again) == [("d365", "contacts", {"donotbulkemail": True}, "update")]


def test_a_mix_of_contact_edits_writes_only_for_the_opt_out_flips() -> None:
    """Whole Dynamics rows (no before-image), most editing other fields: with the kept state,
    only the 1 % that move the flag write anything (one update of the other side each)."""
    rng = random.Random(3)
    contacts = [str(uuid.UUID(int=1000 + n)) for n in range(50)]
    flags = {c: rng.random() < 0.2 for c in contacts}
    states: dict[str, OptOutState] = {}
    cfg = config(direction="bidirectional")

    def row(key: str, ts: int, n: int) -> dict[str, Any]:
        after = {"donotbulkemail": flags[key], "lastname": f"Edit{n}"}
        return {
            "op": "u",
            "entity": "contact",
            "key": key,
            "before": None,
            "after": after,
            "source": {"system": "d365", "ts_ms": ts, "user": None, "txid": None},
            "ts_ms": ts,
        }

    def apply(key: str, event: dict[str, Any], now: int) -> int:
        decision = decide(event, "d365", states.get(key), cfg)
        if decision.state is not None:
            states[key] = decision.state.acknowledged(now)
        return len(decision.writes)

    ts = 1_714_564_800_000
    for c in contacts:  # the kept state learns each flag (the opted-out ones are synced once)
        apply(c, row(c, ts, 0), ts + 500)
    writes = flips = 0
    for n in range(5000):
        key = rng.choice(contacts)
        if rng.random() < 0.01:
            flags[key] = not flags[key]
            flips += 1
        at = ts + 1000 + n * 10
        writes += apply(key, row(key, at, n + 1), at + 5)

    assert flips > 20
    assert writes == flips
