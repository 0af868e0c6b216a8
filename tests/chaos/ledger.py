"""What a chaos scenario sent, the content the targets must end with, and the counted outcome.

The expected state is computed from the published events alone: per key, the last event in
per-key order decides the row. The targets are read back through their real APIs and compared
with it record by record, so a row that exists but holds an older version counts as lost.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Expected:
    """One target's expected rows by key (the last event of each key decides)."""

    name: str
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def set(self, key: str, content: Mapping[str, Any]) -> None:
        self.rows[key] = dict(content)

    def forget(self, key: str) -> None:
        self.rows.pop(key, None)


@dataclass
class Comparison:
    """Expected rows against the rows a target holds."""

    expected: int = 0
    written: int = 0  # expected keys whose one row holds the expected content
    lost: int = 0  # expected keys with no row, or a row with other content
    duplicated: int = 0  # keys with more than one row
    unexpected: int = 0  # rows of keys nothing should have written
    samples: list[str] = field(default_factory=list)

    def add(self, other: Comparison) -> None:
        self.expected += other.expected
        self.written += other.written
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.unexpected += other.unexpected
        self.samples += other.samples


def compare(
    expected: Expected,
    rows: Iterable[Mapping[str, Any]],
    key_of: str,
    ours: set[str] | None = None,
) -> Comparison:
    """Compares `rows` (grouped by the field `key_of`) with `expected`, field by field.

    `ours` bounds the keys this scenario may have written (rows of other keys, e.g. profiles
    created beforehand, are ignored); by default every row counts.
    """
    found: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        found[str(row.get(key_of))].append(row)
    result = Comparison(expected=len(expected.rows))
    for key, want in expected.rows.items():
        got = found.get(key, [])
        if len(got) > 1:
            result.duplicated += 1
            _sample(result, f"{expected.name} {key}: {len(got)} rows")
        if not got:
            result.lost += 1
            _sample(result, f"{expected.name} {key}: missing")
            continue
        differs = {f: (got[-1].get(f), v) for f, v in want.items() if got[-1].get(f) != v}
        if differs:
            result.lost += 1
            _sample(result, f"{expected.name} {key}: (got, want) {differs}")
        else:
            result.written += 1
    allowed = ours if ours is not None else set(found)
    for key in allowed & set(found) - set(expected.rows):
        result.unexpected += 1
        _sample(result, f"{expected.name} {key}: written but not expected")
    return result


def _sample(result: Comparison, text: str) -> None:
    if len(result.samples) < 12:
        result.samples.append(text)


@dataclass
class Outcome:
    """One scenario's counted result: the line it prints and the row of the reliability table."""

    scenario: str
    sent: int
    written: int
    lost: int
    duplicated: int
    dlq: int
    seconds: float
    expected_dlq: int = 0
    unexpected: int = 0
    samples: list[str] = field(default_factory=list)
    problem: str = ""  # a failure that is not a count (e.g. a stop that did not complete)

    def line(self) -> str:
        return (
            f"{self.scenario}: sent={self.sent} written={self.written} lost={self.lost} "
            f"duplicated={self.duplicated} dlq={self.dlq} seconds={self.seconds:.0f}"
        )

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.unexpected == 0
            and self.dlq == self.expected_dlq
            and not self.problem
        )

    def check(self) -> None:
        """The assertion every scenario ends with."""
        detail = "\n  ".join(self.samples)
        assert self.lost == 0, f"{self.line()}\n  {detail}"
        assert self.duplicated == 0, f"{self.line()}\n  {detail}"
        assert self.unexpected == 0, f"{self.line()}\n  {detail}"
        assert self.dlq == self.expected_dlq, f"{self.line()} (expected dlq={self.expected_dlq})"
        assert not self.problem, f"{self.line()}: {self.problem}"


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
