"""Mapping cost per record: the compiled plan next to the per-record walk of the config models.

Run: .venv/bin/python bench/mapping.py [--records N]. Both paths map the same decoded contact
events with the same config (default mappings, one picklist, a filter) in the same process,
interleaved over several rounds; the walk is the pre-#18 code, kept here only to be compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from crmsync.streams import mapping
from crmsync.streams.config import PROFILE_KEY, D365ToCampaignConfig, FieldMapping
from crmsync.streams.sinks.base import SinkRecord


def _config() -> D365ToCampaignConfig:
    base = D365ToCampaignConfig()
    extra = FieldMapping(
        source="preferredcontactmethodcode",
        target="cusContactMethod",
        picklist={"1": "Any", "2": "Email"},
        default="Any",
    )
    return D365ToCampaignConfig.model_validate(
        {
            **base.model_dump(),
            "mappings": [*(m.model_dump() for m in base.mappings), extra.model_dump()],
            "filters": {
                "all": [
                    {"field": "emailaddress1", "op": "exists"},
                    {"field": "statecode", "op": "in", "value": [0, 1]},
                ]
            },
        }
    )


def _events(n: int) -> list[dict[str, Any]]:
    return [
        {
            "op": "u",
            "key": key,
            "before": None,
            "after": {
                "contactid": key,
                "firstname": f"First{i}",
                "lastname": f"Last{i}",
                "emailaddress1": f"person{i}@example.org",
                "donotbulkemail": i % 2 == 0,
                "statecode": 0,
                "preferredcontactmethodcode": 1 + i % 2,
            },
        }
        for i, key in ((i, str(uuid.uuid4())) for i in range(n))
    ]


def _walk(event: Mapping[str, Any], config: D365ToCampaignConfig) -> list[mapping.Write]:
    """contact_writes as it was before #18: the pydantic models read for every record."""
    key = event["key"]
    after = event["after"]
    if config.filters is not None and not mapping.matches(config.filters, after):
        return []
    fields: dict[str, Any] = {}
    create_fields: dict[str, Any] = {}
    for m in config.mappings:
        if m.source in after:
            into = fields if m.apply_updates else create_fields
            into[m.target] = mapping.convert(m, after[m.source])
    fields.pop(PROFILE_KEY, None)
    create_fields.pop(PROFILE_KEY, None)
    record = SinkRecord(
        config.profile_resource,
        key,
        fields=fields,
        create_fields=create_fields,
        key_field=PROFILE_KEY,
    )
    return [mapping.Write("campaign", record)]


def _best_us(fn: Callable[[], object], n: int, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / n * 1e6)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json-out", type=Path, default=Path("bench/results/mapping.json"))
    args = parser.parse_args()
    config, events = _config(), _events(args.records)
    topic = config.contact_topic
    compiled = [mapping.writes_for(e, topic, config) for e in events]
    walked = [_walk(e, config) for e in events]
    assert compiled == walked, "the compiled plan and the walk disagree"
    walk_us: list[float] = []
    plan_us: list[float] = []
    for _ in range(args.rounds):  # interleaved: both see the same machine
        walk_us += _best_us(lambda: [_walk(e, config) for e in events], args.records, 1)
        plan_us += _best_us(
            lambda: [mapping.writes_for(e, topic, config) for e in events], args.records, 1
        )
    results = {"walk_us_per_record": min(walk_us), "compiled_us_per_record": min(plan_us)}
    print(f"d365-to-campaign contact mapping, {args.records} records, best of {args.rounds}\n")
    print("| path | µs/record |")
    print("|---|---:|")
    print(f"| models walked per record (before) | {results['walk_us_per_record']:.2f} |")
    print(f"| compiled once per config (after) | {results['compiled_us_per_record']:.2f} |")
    print(f"\nafter/before: {min(plan_us) / min(walk_us):.2f}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
