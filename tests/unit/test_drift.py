"""Drift verdicts: what a change of a target does to the values a workflow writes."""

from __future__ import annotations

from crmsync.streams.drift import (
    Difference,
    Snapshot,
    compare,
    fits,
    reason,
    still_breaking,
    widens,
)
from crmsync.streams.preflight import Requirement

WF = "d365-to-campaign"


def column(name: str, shape: str, present: bool = True) -> Requirement:
    return Requirement(WF, "d365", "column", name, present, "", shape if present else "")


def test_a_shorter_length_or_another_type_breaks_a_longer_length_does_not() -> None:
    assert fits("String(100)", "String(100)")
    assert fits("String(100)", "String(200)")
    assert not fits("String(100)", "String(50)")
    assert not fits("Decimal(2)", "Decimal(0)")
    assert not fits("String(100)", "Integer")
    assert fits("Boolean", "Boolean")


def test_a_column_gone_is_named_with_what_it_was() -> None:
    was = Snapshot.of(WF, [column("new_purchases.new_amount", "Decimal(2)")])
    now = Snapshot.of(WF, [column("new_purchases.new_amount", "", present=False)])
    (difference,) = compare(was, now)
    assert difference.breaking
    assert reason([difference]) == "new_purchases.new_amount: was Decimal(2), now missing"


def test_a_new_column_and_a_longer_field_are_only_reported() -> None:
    was = Snapshot.of(
        WF, [column("contacts.firstname", "String(50)")], {"d365:contacts": {"firstname"}}
    )
    now = Snapshot.of(
        WF,
        [column("contacts.firstname", "String(100)")],
        {"d365:contacts": {"firstname", "new_nickname"}},
    )
    found = compare(was, now)
    assert {d.text() for d in found} == {
        "contacts.firstname: was String(50), now String(100)",
        "contacts.new_nickname: was absent, now present",
    }
    assert not any(d.breaking for d in found)
    assert reason(found) == ""


def test_start_is_refused_until_the_target_is_put_back_or_the_config_no_longer_needs_it() -> None:
    shrunk = Difference("campaign", "field", "profile.firstName", "string(30)", "string(10)", True)
    still = [Requirement(WF, "campaign", "field", "profile.firstName", True, "", "string(10)")]
    put_back = [Requirement(WF, "campaign", "field", "profile.firstName", True, "", "string(30)")]
    assert [d.now for d in still_breaking([shrunk], still, WF)] == ["string(10)"]
    assert still_breaking([shrunk], put_back, WF) == []
    assert still_breaking([shrunk], [], WF) == []  # the edited config does not map it any more
    gone = Difference("d365", "column", "contacts.firstname", "String(50)", "missing", True)
    missing = [column("contacts.firstname", "", present=False)]
    assert still_breaking([gone], missing, WF) == [gone]


def test_differences_travel_as_dicts() -> None:
    difference = Difference("d365", "key", "crmsync_emailsends(crmsync_eventid)", "present",
                            "missing", True)  # fmt: skip
    assert Difference.from_dict(difference.as_dict()) == difference


def test_a_kept_baseline_is_widened_by_a_longer_field_never_narrowed() -> None:
    kept = {"campaign|field|p.firstName": "string(30)", "d365|column|c.name": "String(100)"}
    assert widens(kept, {**kept, "campaign|field|p.firstName": "string(80)"})
    assert not widens(kept, {**kept, "campaign|field|p.firstName": "string(10)"})
    assert not widens(kept, kept)  # nothing to write
    assert not widens(kept, {"campaign|field|p.firstName": "string(30)"})  # a piece not reported
