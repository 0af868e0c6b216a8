"""Encode/decode rate of ChangeEvent with fastavro, next to the json module on the same records.

Run: .venv/bin/python bench/codec.py [--records N]. Both codecs run in the same process and the
same run, interleaved over several rounds; the ratio is the figure to compare across machines.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastavro import schemaless_reader

from crmsync.schemas.codec import _HEADER_LEN, CHANGE_EVENT
from crmsync.streams.kafka.events import change_event


def _records(n: int) -> list[dict[str, Any]]:
    return [
        change_event(
            "u",
            "contact",
            str(uuid.uuid4()),
            after={
                "contactid": str(uuid.uuid4()),
                "firstname": f"First{i}",
                "lastname": f"Last{i}",
                "emailaddress1": f"person{i}@example.org",
                "donotbulkemail": i % 2 == 0,
                "donotemail": False,
                "modifiedon": "2026-11-28T10:00:00Z",
                "score": i * 0.5,
            },
            system="d365",
            source_ts_ms=1_700_000_000_000 + i,
        )
        for i in range(n)
    ]


def _rate(fn: Callable[[], object], n: int, rounds: int) -> float:
    """Best-of-rounds records per second (the least disturbed round on a shared machine)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json-out", type=Path, default=Path("bench/results/codec.json"))
    args = parser.parse_args()
    records = _records(args.records)
    avro = [CHANGE_EVENT.encode(r) for r in records]
    text = [json.dumps(r).encode() for r in records]
    parsed = CHANGE_EVENT.latest.parsed

    results = {
        "avro_encode": _rate(
            lambda: [CHANGE_EVENT.encode(r, validate=False) for r in records],
            args.records,
            args.rounds,
        ),
        "avro_validate_encode": _rate(
            lambda: [CHANGE_EVENT.encode(r) for r in records], args.records, args.rounds
        ),
        "json_encode": _rate(
            lambda: [json.dumps(r).encode() for r in records], args.records, args.rounds
        ),
        "avro_decode": _rate(
            lambda: [CHANGE_EVENT.decode(b) for b in avro], args.records, args.rounds
        ),
        "json_decode": _rate(lambda: [json.loads(b) for b in text], args.records, args.rounds),
        # the floor: fastavro alone on the same bodies, the writer schema known in advance
        "fastavro_decode": _rate(
            lambda: [schemaless_reader(io.BytesIO(b[_HEADER_LEN:]), parsed, None) for b in avro],
            args.records,
            args.rounds,
        ),
    }
    size = {"avro": statistics.mean(map(len, avro)), "json": statistics.mean(map(len, text))}
    print(f"ChangeEvent codec, {args.records} records, best of {args.rounds} rounds\n")
    print("| codec | encode rec/s | decode rec/s | bytes/record |")
    print("|---|---:|---:|---:|")
    for name in ("avro", "json"):
        print(
            f"| {name} | {results[f'{name}_encode']:,.0f} | {results[f'{name}_decode']:,.0f} "
            f"| {size[name]:.0f} |"
        )
    print(f"| avro, strictly validated first | {results['avro_validate_encode']:,.0f} | | |")
    print(
        f"\nChangeEvent.decode {1e6 / results['avro_decode']:.2f} µs/record, raw fastavro "
        f"{1e6 / results['fastavro_decode']:.2f} µs/record "
        f"({results['fastavro_decode'] / results['avro_decode']:.2f}x)"
    )
    print(
        f"\navro/json: encode {results['avro_encode'] / results['json_encode']:.2f}x, "
        f"decode {results['avro_decode'] / results['json_decode']:.2f}x, "
        f"size {size['avro'] / size['json']:.2f}x"
    )
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"rates": results, "bytes": size}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
