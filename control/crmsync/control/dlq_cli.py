"""`crmsync workflows dlq <workflow> [--redrive]`: list a workflow's dead letters and re-drive
them, over the control plane's API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from crmsync.control.client import ControlClient


def add_parser(actions: Any, workflows: list[str]) -> None:
    dlq = actions.add_parser(
        "dlq",
        help="list a workflow's dead letters; --redrive sends the matching ones through it again",
    )
    dlq.add_argument("workflow", choices=workflows)
    dlq.add_argument("--reason", help="text in the error message (any case)")
    dlq.add_argument("--error-class", help="e.g. RecordRejected")
    dlq.add_argument("--key", help="the record's key")
    dlq.add_argument("--since", metavar="ISO-TIME", help="dead-lettered at or after (with a zone)")
    dlq.add_argument("--until", metavar="ISO-TIME", help="dead-lettered before (with a zone)")
    dlq.add_argument("--limit", type=int, default=50, help="listing: at most this many (50)")
    dlq.add_argument(
        "--redrive",
        action="store_true",
        help="re-drive the matching dead letters not re-driven yet (asks first, unless --yes)",
    )
    dlq.add_argument("--yes", action="store_true", help="re-drive without asking")


def _filter(args: argparse.Namespace) -> dict[str, str]:
    given = {
        "reason": args.reason,
        "error_class": args.error_class,
        "key": args.key,
        "since": args.since,
        "until": args.until,
    }
    return {k: v for k, v in given.items() if v}


def run(client: ControlClient, args: argparse.Namespace) -> int:
    """Exit 0 done, 1 nothing confirmed; refusals raise `Refused` (the caller maps them)."""
    name, where = args.workflow, _filter(args)
    if not args.redrive:
        listing = client.dead_letters(name, {**where, "limit": str(args.limit)})
        if args.json:
            print(json.dumps(listing, indent=2))
        else:
            _print_listing(listing)
        return 0
    preview = client.redrive(name, {**where, "dry_run": True})
    count = len(preview["redriven"])
    skipped = preview["skipped"]
    if not args.yes:
        note = f" ({len(skipped)} matching skipped: already re-driven or not re-drivable)"
        question = f"Re-drive {count} dead letter(s) of {name}{note if skipped else ''}? [y/N] "
        if count == 0:
            print(f"{name}: nothing to re-drive" + (note if skipped else ""))
            return 0
        if not sys.stdin.isatty() or input(question).strip().lower() not in ("y", "yes"):
            print("not re-driven (pass --yes to skip the question)", file=sys.stderr)
            return 1
    answer = client.redrive(name, where)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(
            f"{name}: re-drove {len(answer['redriven'])} dead letter(s)"
            f" (re-drive {answer['redrive_id']}), skipped {len(answer['skipped'])}"
        )
    return 0


def _print_listing(listing: dict[str, Any]) -> None:
    table = Table(title=f"dead letters of {listing['workflow']}, newest first")
    for column in ("TIME", "CLASS", "REASON", "KEY", "ATTEMPTS", "RE-DRIVEN"):
        table.add_column(column, overflow="fold")
    for letter in listing["dead_letters"]:
        mark = letter.get("redriven")
        table.add_row(
            str(letter.get("failed_at") or letter["timestamp"])[:19],
            str(letter.get("error_class") or ""),
            str(letter.get("reason") or ""),
            str(letter.get("key") or ""),
            str(letter.get("attempts") or ""),
            f"{mark['at'][:19]} → {mark['to']}" if mark else "",
        )
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    if not listing.get("complete", True):
        print("(only the newest dead letters were read)")
