"""`crmsync workflows preview`: a dry run's answer as a side-by-side table (active | pending)."""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

#: The mark of a cell whose pending value differs from the active one.
CHANGED = "≠"


def _value(value: Any) -> str:
    if value is None:
        return "null"
    return value if isinstance(value, str) else json.dumps(value)


def _write_line(write: dict[str, Any] | None) -> str:
    if write is None:
        return ""
    return f"{write['operation']} {write['system']} {write['target']} {write['key']}"


def lines(record: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(what, active, pending, changed) lines of one record: its outcome when either side does
    not simply write, then each write and its fields (the CLI's rows and the page's)."""
    active, pending = record["active"], record["pending"]
    differences = set(record["differences"])
    lines: list[tuple[str, str, str, bool]] = []
    if active["outcome"] != "writes" or pending["outcome"] != "writes":
        lines.append(
            (
                "outcome",
                f"{active['outcome']}: {active['reason']}"
                if active["reason"]
                else active["outcome"],
                f"{pending['outcome']}: {pending['reason']}"
                if pending["reason"]
                else pending["outcome"],
                "outcome" in differences,
            )
        )
    count = max(len(active["writes"]), len(pending["writes"]))
    for index in range(count):
        was = active["writes"][index] if index < len(active["writes"]) else None
        now = pending["writes"][index] if index < len(pending["writes"]) else None
        lines.append(
            ("write", _write_line(was), _write_line(now), _write_line(was) != _write_line(now))
        )
        before = {**(was or {}).get("create_fields", {}), **(was or {}).get("fields", {})}
        after = {**(now or {}).get("create_fields", {}), **(now or {}).get("fields", {})}
        for name in [*before, *(n for n in after if n not in before)]:
            lines.append(
                (
                    f"  {name}",
                    _value(before[name]) if name in before else "—",
                    _value(after[name]) if name in after else "—",
                    before.get(name, ...) != after.get(name, ...),
                )
            )
    return lines


def render(answer: dict[str, Any]) -> Table:
    source = {
        "pending": f"pending edit (version {answer['pending_version']})",
        "body": "the given config",
        "active": "no pending edit: the active config",
    }[answer["pending_source"]]
    table = Table(
        title=f"{answer['workflow']}: active (version {answer['active_version']}) | {source}",
    )
    for column in ("RECORD", "WHAT", "ACTIVE", "PENDING", ""):
        table.add_column(column, overflow="fold")
    for record in answer["records"]:
        where = f"{record['topic']}[{record['partition']}]@{record['offset']}\n{record['key']}"
        if record["filter_change"]:
            where += f"\n{record['filter_change']} by the pending filters"
        for index, (what, was, now, changed) in enumerate(lines(record)):
            mark = CHANGED if changed else ""
            style = "bold yellow" if changed else None
            table.add_row(where if index == 0 else "", what, was, now, mark, style=style)
        table.add_section()
    return table


def summary(answer: dict[str, Any]) -> str:
    count = len(answer["records"])
    line = (
        f"{count} record(s): {answer['changed']} changed, {answer['dropped']} dropped and "
        f"{answer['kept']} kept by the pending filters; nothing was written"
    )
    if not answer["complete"]:
        line += " (the read's byte budget ended it early)"
    if answer.get("note"):
        line += f"\nnote: {answer['note']}"
    return line


def print_preview(answer: dict[str, Any], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    width = None if out.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    console = Console(file=out, width=width, highlight=False)
    if answer["records"]:
        console.print(render(answer))
    else:
        console.print("no records in the workflow's source topics")
    console.print(summary(answer))
