"""Opt-in/opt-out decisions: direction, conflicts, echo suppression and a ping-pong that settles."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from crmsync.streams.catalog import parse_config
from crmsync.streams.config import OptInOutConfig
from crmsync.streams.mapping import MappingError
from crmsync.streams.optout import (
    OptOutDecision,
    OptOutState,
    decide,
    side_of,
    state_from_bytes,
    state_to_bytes,
)

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


def written(decision: OptOutDecision) -> list[tuple[str, str, dict[str, Any], str]]:
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
    assert decision.state == OptOutState(True, 100, "d365")


def test_a_campaign_opt_out_updates_only_the_dynamics_flag_of_the_contact() -> None:
    decision = decide(flip("campaign", True, 100), "campaign", None, config())

    assert written(decision) == [("d365", "contacts", {"donotbulkemail": True}, "update")]
    assert decision.writes[0].record.key == CONTACT
    assert decision.state == OptOutState(True, 100, "campaign")


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
    state = OptOutState(True, 200, "d365")

    stale = decide(flip("campaign", False, 150), "campaign", state, config())
    newer = decide(flip("campaign", False, 250), "campaign", state, config())

    assert (stale.writes, stale.state, stale.reason) == ([], None, "stale")
    assert written(newer) == [
        ("d365", "contacts", {"donotbulkemail": False}, "update"),
        # the state came from Dynamics: our write into Campaign may have landed after this change
        ("campaign", "profileAndServicesExt/profile", {"blackListEmail": False}, "update"),
    ]
    assert newer.state == OptOutState(False, 250, "campaign")


def test_on_a_tie_opt_out_wins() -> None:
    opted_in = OptOutState(False, 300, "d365")
    opted_out = OptOutState(True, 300, "d365")

    out = decide(flip("campaign", True, 300), "campaign", opted_in, config())
    back_in = decide(flip("campaign", False, 300), "campaign", opted_out, config())

    assert out.reason == "opt-out wins tie"
    assert written(out)[0] == ("d365", "contacts", {"donotbulkemail": True}, "update")
    assert out.state == OptOutState(True, 300, "campaign")
    assert (back_in.writes, back_in.state, back_in.reason) == ([], None, "opt-out wins tie")


def test_the_echo_of_our_own_write_is_suppressed() -> None:
    state = OptOutState(True, 100, "d365")  # we wrote True to Campaign for a Dynamics change
    echo = decide(flip("campaign", True, 140, before=False), "campaign", state, config())
    assert (echo.writes, echo.state, echo.reason) == ([], None, "echo suppressed")


def test_changes_by_the_integration_user_are_never_synced() -> None:
    settings = config(ignore_users=["crmsync-app"])
    decision = decide(flip("d365", True, 100, user="crmsync-app"), "d365", None, settings)
    assert (decision.writes, decision.reason) == ([], "echo suppressed")


def test_garbage_values_and_keys_are_mapping_errors_but_null_means_opted_in() -> None:
    with pytest.raises(MappingError, match="not a boolean"):
        decide(flip("d365", "perhaps", 100), "d365", None, config())
    nulled = decide(flip("d365", None, 100), "d365", OptOutState(True, 50, "d365"), config())
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
                self.state = decision.state
            for write in decision.writes:
                target = "campaign" if write.system == "campaign" else "d365"
                (value,) = write.record.fields.values()
                self.writes.append((target, value))
                if self.values[target] != value:  # the target publishes its own change event
                    queue += self.change(target, value)


def test_a_ping_pong_converges_one_write_per_change_and_a_write_back_per_side_switch() -> None:
    systems = Systems(config())

    systems.deliver(systems.change("d365", True))
    systems.deliver(systems.change("campaign", False))
    systems.deliver(systems.change("campaign", True))
    systems.deliver(systems.change("d365", False))

    assert systems.writes == [
        ("campaign", True),
        ("d365", False),
        ("campaign", False),  # write-back: the last sync went the other way
        ("d365", True),
        ("campaign", False),
        ("d365", False),  # write-back
    ]
    assert systems.values == {"d365": False, "campaign": False}


def test_a_sync_that_lands_after_a_newer_change_on_its_target_is_undone() -> None:
    """A Dynamics opt-in is synced to Campaign late (the write waited for the profile); a
    Campaign opt-out made meanwhile is newer and must hold on both sides."""
    settings = config()
    values = {"d365": False, "campaign": False}
    opted_in = decide(flip("d365", False, 100), "d365", None, settings)
    values["campaign"] = True  # the user blacklists the profile (ts 110)...
    for write in opted_in.writes:  # ...then the late write lands over it
        values[write.system] = next(iter(write.record.fields.values()))
    assert values == {"d365": False, "campaign": False}

    blacklisted = decide(flip("campaign", True, 110), "campaign", opted_in.state, settings)
    for write in blacklisted.writes:
        values[write.system] = next(iter(write.record.fields.values()))

    assert values == {"d365": True, "campaign": True}
    assert blacklisted.state == OptOutState(True, 110, "campaign")


def test_side_of_and_state_bytes_round_trip() -> None:
    assert side_of("d365.contact.changes") == "d365"
    assert side_of("campaign.profile.changes") == "campaign"
    with pytest.raises(ValueError, match="does not read"):
        side_of("campaign.email.events")
    state = OptOutState(True, 1_714_564_800_250, "campaign")
    assert state_from_bytes(state_to_bytes(state)) == state
    assert state_from_bytes(None) is None and state_from_bytes(b"") is None
