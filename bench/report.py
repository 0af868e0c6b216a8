"""Every benchmark figure in one markdown table, next to the issue's targets; all in latest.json.

Run: .venv/bin/python bench/report.py [--results DIR] [--check]. Reads the JSON that codec.py,
sinks.py, http_clients.py, throughput.py, control.py, resources.py, latency.py,
target_requests.py and emulators.py wrote into DIR (default bench/results),
writes them merged into DIR/latest.json together with the table's rows, and prints the table.
Each target is judged met or missed from the measured number; a figure whose script has not run
shows "not run". With --check the exit code is 1 unless every target is met.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (
    "codec",
    "sinks",
    "http_clients",
    "throughput",
    "control",
    "resources",
    "latency",
    "target_requests",
    "emulators",
)
REQUEST_CPU_LIMIT_US = 250.0  # worker CPU per target request (issue 18)
EMULATOR_TARGET_RPS = 3000  # requests/s one emulator serves on one core
EMULATOR_BULK_US_PER_RECORD = 40.0  # emulator CPU per record of a bulk write (UpsertMultiple)
RSS_LIMIT_BYTES = 300e6  # the 300 MB, as 10^6 bytes (the stricter reading)


@dataclass(frozen=True)
class Row:
    area: str
    figure: str
    measured: str
    target: str = ""
    verdict: str = ""  # met, missed, not run, or "" for a figure without a target


def _get(data: Any, *path: str | int) -> Any:
    """data[path[0]][path[1]]..., None where any step is missing."""
    for step in path:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _rate(value: float) -> str:
    return f"{value:,.0f} records/s"


def _seconds(value: float) -> str:
    return f"{value:.3f} s"


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def _us(value: float) -> str:
    return f"{value:,.0f} µs"


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB"


class Table:
    """The rows, in the order they are added."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def info(self, area: str, figure: str, value: Any, show: Callable[[float], str]) -> None:
        number = _number(value)
        self.rows.append(Row(area, figure, show(number) if number is not None else "not run"))

    def judged(
        self,
        area: str,
        figure: str,
        value: Any,
        show: Callable[[float], str],
        target: str,
        met: Callable[[float], bool],
    ) -> None:
        number = _number(value)
        if number is None:
            self.rows.append(Row(area, figure, "not run", target, "not run"))
        else:
            verdict = "met" if met(number) else "missed"
            self.rows.append(Row(area, figure, show(number), target, verdict))


def _codec(table: Table, data: Any) -> None:
    for key, label in (
        ("avro_encode", "Avro encode"),
        ("avro_decode", "Avro decode"),
        ("json_encode", "json encode (comparison)"),
        ("json_decode", "json decode (comparison)"),
    ):
        table.info("codec", label, _get(data, "rates", key), _rate)


def _sinks(table: Table, data: Any) -> None:
    rows = _get(data, "rows") or []
    if not rows:
        table.info("sinks", "sink write rates", None, _rate)
    for row in rows:
        table.info("sinks", f"{row['case']}, batch {row['batch']}", _get(row, "rate"), _rate)


def _throughput(table: Table, data: Any) -> None:
    area = "throughput"
    base = _number(_get(data, "a_baseline", "records_per_s"))
    flow = _number(_get(data, "b_workflow_discard", "records_per_s"))
    table.info(area, "(a) aiokafka + fastavro baseline", base, _rate)
    table.info(
        area,
        "(a) CPU per record",
        _get(data, "a_baseline", "cpu_us_per_record"),
        lambda v: f"{v:.1f} µs",
    )
    table.info(area, "(b) workflow, discarding sink", flow, _rate)
    table.judged(
        area,
        "(b) as a share of (a)",
        flow / base if flow is not None and base else None,
        lambda v: f"{v:.0%}",
        "≥ 60%",
        lambda v: v >= 0.6,
    )
    flow_cpu = _number(_get(data, "b_workflow_discard", "cpu_us_per_record"))
    base_cpu = _number(_get(data, "a_baseline", "cpu_us_per_record"))
    table.info(area, "(b) CPU per record", flow_cpu, lambda v: f"{v:.1f} µs")
    table.judged(
        area,
        "(b) CPU per record as a multiple of (a)'s",
        flow_cpu / base_cpu if flow_cpu is not None and base_cpu else None,
        lambda v: f"{v:.2f}x",
        "≤ 1.6x",
        _at_most(1.6),
    )
    table.info(
        area,
        "(c) workflow → Campaign emulator",
        _get(data, "c_workflow_emulator", "records_per_s"),
        _rate,
    )
    table.judged(
        area,
        "(c) worker CPU per target request",
        _get(data, "c_workflow_emulator", "worker_cpu_us_per_request"),
        _us,
        f"≤ {REQUEST_CPU_LIMIT_US:.0f} µs",
        _at_most(REQUEST_CPU_LIMIT_US),
    )
    table.info(
        area,
        "(c) emulator CPU per request (its process)",
        _get(data, "c_workflow_emulator", "emulator_cpu_us_per_request"),
        _us,
    )
    table.info(
        area,
        "(d) Kafka's consumer perf tool",
        _get(data, "d_kafka_perf_tool", "records_per_s"),
        _rate,
    )


def _http_clients(table: Table, data: Any) -> None:
    variants = _get(data, "variants") or {}
    if not variants:
        table.info("http", "client CPU per request", None, _us)
    for name, row in variants.items():
        figure = f"{name}: client CPU per request"
        value = _get(row, "client_cpu_us_per_request")
        if name.startswith("crmsync") and name.endswith("aiohttp"):
            limit = f"≤ {REQUEST_CPU_LIMIT_US:.0f} µs"
            table.judged("http", figure, value, _us, limit, _at_most(REQUEST_CPU_LIMIT_US))
        else:
            table.info("http", figure, value, _us)


def _control(table: Table, data: Any) -> None:
    area = "control"
    control = _get(data, "control")
    limits: tuple[tuple[str, str, float | None], ...] = (
        ("stop_s", "Stop → STOPPED and the last request reached Campaign", 1.0),
        ("stop_status_s", "Stop → STOPPED shown", None),
        ("stop_last_write_s", "Stop → the last request reached Campaign", None),
        ("start_running_s", "Start → RUNNING shown", 3.0),
        ("start_s", "Start → RUNNING and requests reach Campaign again", 3.0),
    )
    for key, label, limit in limits:
        table.info(area, f"{label}, p50", _get(control, key, "p50"), _seconds)
        p99 = _get(control, key, "p99")
        if limit is None:
            table.info(area, f"{label}, p99", p99, _seconds)
        else:
            table.judged(
                area,
                f"{label}, p99",
                p99,
                _seconds,
                f"≤ {limit:g} s",
                _at_most(limit),
            )
    table.judged(
        area,
        "requests reaching Campaign after STOPPED was shown",
        _get(control, "writes_after_stopped"),
        lambda v: f"{v:.0f}",
        "0 (CONTRACT)",
        lambda v: v == 0,
    )
    table.judged(
        area,
        "rebalances during the stop/start rounds",
        _get(control, "rebalances"),
        lambda v: f"{v:.0f}",
        "0",
        lambda v: v == 0,
    )
    table.info(area, "GET /api/v1/workflows, p50", _get(data, "api_latency", "p50_ms"), _ms)
    table.judged(
        area,
        "GET /api/v1/workflows, p99",
        _get(data, "api_latency", "p99_ms"),
        _ms,
        "≤ 100 ms",
        _at_most(100),
    )
    points = _get(data, "backlog") or []
    if not points:
        table.judged(area, "backlog vs Kafka's LAG", None, str, "equal", bool)
    for point in points:
        table.rows.append(
            Row(
                area,
                f"backlog vs Kafka's LAG, {point['published']:,} published while stopped",
                f"API {point['api_backlog']:,}, LAG {point['kafka_lag']:,}",
                "equal",
                "met" if point["equal"] else "missed",
            )
        )
    table.judged(
        area,
        "worker RSS, peak under load and stop/start",
        _get(data, "worker_rss_peak_bytes"),
        _mb,
        "≤ 300 MB",
        _at_most(RSS_LIMIT_BYTES),
    )


def _resources(table: Table, data: Any) -> None:
    area = "resources"
    memory = _get(data, "memory")
    backlog = _get(memory, "stopped_with_backlog", "backlog_records")
    drained = _get(memory, "draining", "records")
    for path, label in (
        (("idle", "peak_bytes"), "worker RSS, RUNNING idle"),
        (
            ("stopped_with_backlog", "peak_bytes"),
            f"worker RSS, STOPPED with {backlog:,} records of backlog"
            if backlog
            else "worker RSS, STOPPED with a backlog",
        ),
        (
            ("draining", "peak_bytes"),
            f"worker RSS, peak draining {drained:,} records"
            if drained
            else "worker RSS, peak draining",
        ),
    ):
        table.judged(
            area,
            label,
            _get(memory, *path),
            _mb,
            "≤ 300 MB",
            _at_most(RSS_LIMIT_BYTES),
        )
    scale = _get(data, "scale")
    for key, label in (("workers_1", "1 worker process"), ("workers_2", "2 worker processes")):
        table.info(area, f"discarding sink, {label}", _get(scale, key, "records_per_s"), _rate)
        table.info(
            area,
            f"discarding sink, {label}, CPU per record",
            _get(scale, key, "cpu_us_per_record"),
            lambda v: f"{v:.1f} µs",
        )
    table.info(area, "2 workers / 1 worker", _get(scale, "ratio"), lambda v: f"{v:.2f}x")


def _latency(table: Table, data: Any) -> None:
    area = "latency"
    latency = _get(data, "d365_to_campaign", "latency_ms") or _get(
        data, "campaign_to_d365", "latency_ms"
    )
    at = f" at {latency:.0f} ms" if isinstance(latency, int | float) else ""
    for key, label in (
        ("d365_to_campaign", "d365-to-campaign"),
        ("campaign_to_d365", "campaign-to-d365"),
    ):
        figures = _get(data, key)
        table.judged(
            area,
            f"{label}{at}, requests/s ÷ (concurrency ÷ latency)",
            _get(figures, "ratio_of_limit"),
            lambda v: f"{v:.0%}",
            "≥ 80 %",
            lambda v: v >= 0.8,
        )
        table.info(area, f"{label}{at}, records/s", _get(figures, "records_per_s"), _rate)


def _requests(table: Table, data: Any) -> None:
    area = "requests"
    table.judged(
        area,
        "opt-in-out, requests per record (1 % opt-out changes)",
        _get(data, "opt_in_out", "requests_per_record"),
        lambda v: f"{v:.4f}",
        "≤ 0.02",
        _at_most(0.02),
    )
    table.info(
        area,
        "profile load, requests per created profile, a lookup each (before)",
        _get(data, "load_lookup_each", "requests_per_profile"),
        lambda v: f"{v:.3f}",
    )
    table.judged(
        area,
        "profile load, requests per created profile, cache warmed by paging",
        _get(data, "load_warmed", "requests_per_profile"),
        lambda v: f"{v:.3f}",
        "≈ 1 (≤ 1.05)",
        _at_most(1.05),
    )


def _emulators(table: Table, data: Any) -> None:
    """(f): what one core serves (1e6 / the emulator process's CPU µs per request), judged per
    endpoint; the wall-clock rate, which shares the machine with the load generator, beside it."""
    area = "emulators"
    baseline = _get(data, "baseline")
    table.info(
        area,
        "(f) baseline: fixed JSON from Starlette + uvicorn, one core",
        _get(baseline, "one_core_requests_per_s"),
        lambda v: f"{v:,.0f} requests/s",
    )
    endpoints = _get(data, "endpoints") or []
    if not endpoints:
        table.judged(
            area,
            "(f) emulator endpoints, one core",
            None,
            str,
            f"≥ {EMULATOR_TARGET_RPS:,} requests/s",
            bool,
        )
    for row in endpoints:
        records = _number(_get(row, "records_per_request"))
        if records is not None and records > 1:
            _emulator_bulk(table, area, row)
            continue
        wall = _number(_get(row, "requests_per_s"))
        cpu = _number(_get(row, "emulator_cpu_us_per_request"))
        detail = ""
        if wall is not None and cpu is not None:
            detail = f" ({cpu:,.0f} µs CPU/request; {wall:,.0f}/s measured)"

        def show(value: float, detail: str = detail) -> str:
            return f"{value:,.0f} requests/s{detail}"

        table.judged(
            area,
            f"(f) {row['endpoint']}, one core",
            _get(row, "one_core_requests_per_s"),
            show,
            f"≥ {EMULATOR_TARGET_RPS:,} requests/s",
            lambda v: v >= EMULATOR_TARGET_RPS,
        )


def _emulator_bulk(table: Table, area: str, row: Any) -> None:
    """A bulk endpoint is judged per record: what the emulator spends on each record of a call."""
    cpu = _number(_get(row, "emulator_cpu_us_per_request"))
    records = _get(row, "records_per_request")
    detail = f" ({cpu:,.0f} µs CPU per call of {records})" if cpu is not None else ""

    def show(value: float) -> str:
        return f"{value:,.1f} µs CPU/record{detail}"

    table.judged(
        area,
        f"(f) {row['endpoint']}, per record",
        _get(row, "emulator_cpu_us_per_record"),
        show,
        f"≤ {EMULATOR_BULK_US_PER_RECORD:,.0f} µs CPU/record",
        lambda v: v <= EMULATOR_BULK_US_PER_RECORD,
    )


def build(results: dict[str, Any]) -> list[Row]:
    table = Table()
    _throughput(table, results.get("throughput"))
    _http_clients(table, results.get("http_clients"))
    _control(table, results.get("control"))
    _resources(table, results.get("resources"))
    _codec(table, results.get("codec"))
    _sinks(table, results.get("sinks"))
    _latency(table, results.get("latency"))
    _requests(table, results.get("target_requests"))
    _emulators(table, results.get("emulators"))
    return table.rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every target is met")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for path in sorted(args.results.glob("*.json")):
        if path.stem != "latest":
            results[path.stem] = json.loads(path.read_text())
    rows = build(results)
    print("| area | figure | measured | target | verdict |")
    print("|---|---|---:|---|---|")
    for row in rows:
        print(f"| {row.area} | {row.figure} | {row.measured} | {row.target} | {row.verdict} |")
    verdicts = [row.verdict for row in rows if row.verdict]
    counts = {v: verdicts.count(v) for v in ("met", "missed", "not run")}
    print(f"\ntargets: {counts['met']} met, {counts['missed']} missed, {counts['not run']} not run")
    missing = [name for name in SOURCES if name not in results]
    if missing:
        print(f"no results from: {', '.join(f'bench/{name}.py' for name in missing)}")
    latest = {
        "generated_at": datetime.now(UTC).isoformat(),
        "results": results,
        "table": [asdict(row) for row in rows],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    return 1 if args.check and counts["met"] != len(verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
