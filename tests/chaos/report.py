"""The reliability table: written by the chaos suite into docs/reliability.md (or a short copy)."""

from __future__ import annotations

import platform
import re
from datetime import UTC, datetime
from pathlib import Path

from tests.chaos.ledger import Outcome

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
SHORT = ROOT / "bench" / "results" / "reliability-short.md"
START, END = "<!-- chaos-results:start -->", "<!-- chaos-results:end -->"
HEADER = (
    "| scenario | tier | sent | written | lost | duplicated | dlq | seconds | result |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---|\n"
)
_ROW = re.compile(r"^\| (?P<scenario>[^|]+?) \|")
#: The header of a table written before rows named their tier: every row had that tier.
_OLD_TIER = re.compile(r"^Tier `(?P<tier>\w+)`", re.MULTILINE)


def _row(outcome: Outcome, tier: str) -> str:
    result = "pass" if outcome.passed else "**FAIL**"
    return (
        f"| {outcome.scenario} | {tier} | {outcome.sent} | {outcome.written} | {outcome.lost} "
        f"| {outcome.duplicated} | {outcome.dlq} | {outcome.seconds:.0f} | {result} |\n"
    )


def table(outcomes: list[Outcome], tier: str, previous: str = "") -> str:
    """The results block; rows of scenarios not run this time are kept from `previous`, each
    with the tier it was run at."""
    rows: dict[str, str] = {}
    old_tier = _OLD_TIER.search(previous)
    for line in previous.splitlines(keepends=True):
        match = _ROW.match(line)
        if match and match["scenario"] not in ("scenario", "---"):
            cells = line.strip().strip("|").split("|")
            if len(cells) == 8 and old_tier:  # no tier column yet
                cells.insert(1, f" {old_tier['tier']} ")
            rows[match["scenario"]] = "|" + "|".join(cells) + "|\n"
    for outcome in outcomes:
        rows[outcome.scenario] = _row(outcome, tier)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{START}\n"
        f"Last run {when} (tier `{tier}`) on {platform.machine()} "
        f"({_cpus()} CPUs), Python {platform.python_version()}; each row names the tier it was "
        "run at.\n\n" + HEADER + "".join(rows[name] for name in sorted(rows, key=_order)) + f"{END}"
    )


def _order(scenario: str) -> tuple[int, str]:
    match = re.match(r"(\d+)", scenario)
    return (int(match[1]) if match else 99, scenario)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def write(outcomes: list[Outcome], tier: str) -> Path:
    """Short tier: bench/results/reliability-short.md; medium and full: docs/reliability.md."""
    if not outcomes:
        return DOC
    if tier == "short":
        SHORT.parent.mkdir(parents=True, exist_ok=True)
        old = SHORT.read_text() if SHORT.exists() else ""
        SHORT.write_text(
            "# crmsync chaos suite, short tier\n\n" + table(outcomes, tier, old) + "\n"
        )
        return SHORT
    text = DOC.read_text() if DOC.exists() else f"# Reliability\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    old, tail = rest.split(END, 1)
    DOC.write_text(head + table(outcomes, tier, old) + tail)
    return DOC
