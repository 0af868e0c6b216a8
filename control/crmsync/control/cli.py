"""The `crmsync` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from crmsync.streams.catalog import NAMES as WORKFLOWS
from crmsync.streams.settings import Settings

if TYPE_CHECKING:
    from crmsync.deploy.local.kafka import LocalKafka

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crmsync",
        description="Keeps Dynamics 365 and Adobe Campaign Standard in sync through Kafka.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the local stack in the foreground (Ctrl-C stops it)")
    up.add_argument(
        "--brokers",
        type=int,
        choices=(1, 3),
        default=1,
        help="local Kafka nodes (3 = a cluster on ports 9092-9094)",
    )
    up.add_argument("--detach", action="store_true", help="return once everything is ready")
    commands.add_parser("down", help="stop the local stack started by `crmsync up`")

    emulators = commands.add_parser(
        "emulators", help="run the Dynamics 365 and Campaign API emulators (127.0.0.1 only)"
    )
    emulators.add_argument("--dynamics-port", type=int, default=8081)
    emulators.add_argument("--campaign-port", type=int, default=8082)
    emulators.add_argument("--data-dir", type=Path, help="default: .local/emulators")
    emulators.add_argument(
        "--only",
        choices=("dynamics", "campaign"),
        help="run this one emulator in this process (default: each in a process of its own)",
    )

    worker = commands.add_parser("worker", help="run one worker of one workflow")
    worker.add_argument("workflow", choices=WORKFLOWS)

    source = commands.add_parser(
        "source", help="run a change source: d365 = Dynamics change tracking → Kafka"
    )
    source.add_argument("system", choices=("d365",))

    demo = commands.add_parser(
        "demo",
        help="create contacts in the Dynamics emulator, flip opt-outs on both sides and publish "
        "email events, so every workflow moves",
    )
    demo.add_argument("--contacts", type=int, default=50, metavar="N", help="default 50")

    commands.add_parser(
        "control",
        help="run the control plane (HTTP API, metrics) on CRMSYNC_HTTP_HOST:CRMSYNC_HTTP_PORT",
    )
    flows = commands.add_parser(
        "workflows",
        help="status, stop/start and replay of the workflows, over the control plane's API",
        description="Talks to the control plane at CRMSYNC_CONTROL_URL (default "
        "http://CRMSYNC_HTTP_HOST:CRMSYNC_HTTP_PORT) with CRMSYNC_ADMIN_TOKEN or the token in "
        ".local/admin-token. Exit codes: 0 ok, 1 refused, 2 usage, 3 control plane unreachable.",
    )
    flows.add_argument("--json", action="store_true", help="print the API's JSON answer")
    flow_actions = flows.add_subparsers(dest="action", metavar="ACTION")
    flow_actions.add_parser("list", help="every workflow: status, backlog, trend (the default)")
    for action, text in (
        ("show", "one workflow in detail"),
        ("start", "start (pending config changes become active)"),
        ("stop", "stop: nothing more is written once STOPPED"),
    ):
        one = flow_actions.add_parser(action, help=text)
        one.add_argument("workflow", choices=WORKFLOWS)
        if action != "show":
            one.add_argument(
                "--wait", action="store_true", help="return once the status is RUNNING/STOPPED"
            )
    preview = flow_actions.add_parser(
        "preview",
        help="dry run: what the active and the pending config would write for the newest "
        "source records, side by side (writes nothing)",
    )
    preview.add_argument("workflow", choices=WORKFLOWS)
    preview.add_argument(
        "--records", type=int, default=20, metavar="N", help="newest records to plan (1-500)"
    )
    preview.add_argument(
        "--config",
        metavar="FILE",
        help="a config (JSON; - for standard input) instead of the pending one",
    )
    preview.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON"
    )
    from crmsync.control import dlq_cli

    dlq_cli.add_parser(flow_actions, list(WORKFLOWS))
    replay = flow_actions.add_parser(
        "replay", help="move a STOPPED workflow's committed offsets back"
    )
    replay.add_argument("workflow", choices=WORKFLOWS)
    replay.add_argument(
        "--from",
        dest="from_",
        required=True,
        metavar="earliest|ISO-TIME",
        help="earliest, or an ISO-8601 time (no zone = UTC)",
    )

    publish = commands.add_parser(
        "publish",
        help="validate JSON Lines and publish them as Avro events",
        description="Streams: d365-contacts, d365-entity:<logicalname>, campaign-email-events, "
        "campaign-profiles. Every line is validated first; if any is invalid nothing is "
        "published (unless --skip-invalid).",
    )
    publish.add_argument("stream")
    publish.add_argument("file", help="a JSON Lines file, or - for standard input")
    publish.add_argument(
        "--skip-invalid", action="store_true", help="publish the valid lines and report the rest"
    )

    topics_cmd = commands.add_parser("topics", help="create every crmsync topic (idempotent)")
    topics_cmd.add_argument("action", choices=("create",))
    topics_cmd.add_argument(
        "--custom-entity",
        action="append",
        default=[],
        metavar="LOGICALNAME",
        help="also create its change topic",
    )

    targets_cmd = commands.add_parser(
        "targets", help="what the workflows need in Dynamics and Campaign (preflight)"
    )
    targets_actions = targets_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = targets_actions.add_parser(
        "check",
        help="every table, column, key, navigation property, resource and custom filter the "
        "workflows' configs need: present, or missing with what to do (exit 1 if any is missing)",
    )
    setup = targets_actions.add_parser(
        "setup",
        help="create crmsync's activity tables, columns and alternate keys in Dynamics through "
        "the Web API metadata endpoints (only what is missing)",
    )
    setup.add_argument("system", choices=("d365",))
    setup.add_argument(
        "--dry-run", action="store_true", help="print the requests instead of sending them"
    )
    for sub in (check, setup):
        sub.add_argument(
            "--config",
            action="append",
            default=[],
            metavar="WORKFLOW=FILE",
            help="use this config (JSON) instead of the workflow's default",
        )
    check.add_argument("--json", action="store_true", help="print the requirements as JSON")

    kafka = commands.add_parser("kafka", help="the local Apache Kafka")
    kafka_actions = kafka.add_subparsers(dest="action", required=True, metavar="ACTION")
    kafka_run = kafka_actions.add_parser("run", help="run the local broker in the foreground")
    kafka_run.add_argument("--brokers", type=int, choices=(1, 3), default=1)
    kafka_run.add_argument(
        "--secure",
        action="store_true",
        help="SASL/SCRAM for every client and the ACLs of deploy/kafka/acls.yaml (one principal "
        "per component; passwords in the data folder's scram-passwords.json)",
    )
    kafka_actions.add_parser("fetch", help="obtain Kafka's jars into .cache/kafka (once)")
    tool = kafka_actions.add_parser(
        "tool", help="run one of Kafka's own tools, e.g. kafka-consumer-groups --describe ..."
    )
    tool.add_argument("name")
    tool.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings()
    handler = {
        "publish": _publish,
        "topics": _topics,
        "kafka": _kafka,
        "up": _up,
        "down": _down,
        "emulators": _emulators,
        "worker": _worker,
        "control": _control,
        "source": _source,
        "demo": _demo,
        "workflows": _workflows,
        "targets": _targets,
    }[args.command]
    try:
        return handler(settings, args)
    except KeyboardInterrupt:
        return 130


def _targets(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from crmsync.streams import preflight
    from crmsync.streams.catalog import default_config, parse_config
    from crmsync.streams.config import ConfigError
    from crmsync.targets.campaign import CampaignClient
    from crmsync.targets.dynamics import DynamicsClient
    from crmsync.targets.errors import Retryable, SinkError

    configs: dict[str, Any] = {
        name: default_config(name)
        for name in ("d365-to-campaign", "campaign-to-d365", "opt-in-out")
    }
    for given in args.config:
        name, _, file = given.partition("=")
        if name not in configs or not file:
            print(f"crmsync targets: --config {given!r}: WORKFLOW=FILE", file=sys.stderr)
            return EXIT_USAGE
        try:
            configs[name] = parse_config(name, json.loads(Path(file).read_text(encoding="utf-8")))
        except (OSError, ValueError, ConfigError) as error:
            print(f"crmsync targets: {file}: {error}", file=sys.stderr)
            return EXIT_INVALID

    async def run() -> list[preflight.Requirement]:
        async with (
            DynamicsClient(settings.dynamics) as dynamics,
            CampaignClient(settings.campaign) as campaign,
        ):
            if args.action != "setup":
                return await preflight.check(configs, dynamics, campaign)
            plan = await preflight.setup_dynamics(configs, dynamics, dry_run=True)
            for step in plan:
                print(f"{step.method} {step.path}")
                print(json.dumps(step.body, indent=2))
            if not plan:
                print("nothing to create: every crmsync table, column and key is there")
            elif not args.dry_run:
                await preflight.apply(dynamics, plan)
                print(f"created: {len(plan)} metadata request(s) sent", file=sys.stderr)
            if args.dry_run:
                return []
            return await preflight.check_dynamics(dynamics, preflight.needs_of(configs))

    try:
        requirements = asyncio.run(run())
    except SinkError as error:  # setup reads Dynamics itself: it cannot work around an outage
        print(f"crmsync targets setup: {error.reason}", file=sys.stderr)
        return EXIT_UNREACHABLE if isinstance(error, Retryable) else EXIT_INVALID
    if args.action == "setup":
        left = [r for r in preflight.missing(requirements) if r.target == "d365"]
        if args.dry_run or not left:
            return EXIT_OK
        for r in left:
            print(f"still missing: {r.kind} {r.name}  → {r.fix}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(json.dumps({"requirements": [r.as_dict() for r in requirements]}, indent=2))
    else:
        for r in requirements:
            state = "present" if r.present else "MISSING"
            fix = f"  → {r.fix}" if r.fix else ""
            print(f"{state:8} {r.workflow:17} {r.target:9} {r.kind:10} {r.name}{fix}")
    missing = preflight.missing(requirements)
    if missing:
        print(f"{len(missing)} requirement(s) missing", file=sys.stderr)
    return EXIT_INVALID if missing else EXIT_OK


def _publish(settings: Settings, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from crmsync.control import publish

    try:
        spec = publish.stream(args.stream)
    except publish.UnknownStream as unknown:
        print(f"crmsync publish: {unknown}", file=sys.stderr)
        return EXIT_USAGE
    try:
        source: TextIO = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    except OSError as unreadable:
        print(f"crmsync publish: cannot read {args.file}: {unreadable.strerror}", file=sys.stderr)
        return EXIT_INVALID
    with source:
        try:
            events, errors = publish.prepare(spec, source)
        except UnicodeDecodeError as undecodable:
            print(f"crmsync publish: {args.file} is not UTF-8 text: {undecodable}", file=sys.stderr)
            return EXIT_INVALID
    for error in errors[:200]:
        print(f"invalid: {error}", file=sys.stderr)
    if len(errors) > 200:
        print(f"invalid: ... and {len(errors) - 200} more", file=sys.stderr)
    if errors and not args.skip_invalid:
        lines = len({e.line for e in errors})
        print(f"nothing published: {lines} invalid line(s)", file=sys.stderr)
        return EXIT_INVALID

    async def run() -> None:
        with Progress(disable=not sys.stderr.isatty(), transient=True) as progress:
            task = progress.add_task(f"publishing to {spec.topic}", total=len(events))
            await publish.send(
                settings.kafka,
                spec,
                events,
                partitions=settings.topic_partitions,
                on_sent=lambda n: progress.advance(task, n),
                registry_url=settings.schema_registry_url,
            )

    if not _run_kafka_call(settings, run()):
        return EXIT_UNREACHABLE
    print(f"published {len(events)} events to {spec.topic}")
    if errors:
        print(f"skipped {len({e.line for e in errors})} invalid line(s)", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _run_kafka_call(settings: Settings, call: object) -> bool:
    """Runs a coroutine that talks to Kafka; False (with a message) when Kafka is unreachable."""
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

    try:
        asyncio.run(call)  # type: ignore[arg-type]
    except (KafkaConnectionError, KafkaTimeoutError, OSError) as error:
        print(
            f"crmsync: cannot reach Kafka at {settings.bootstrap_servers}: {error}", file=sys.stderr
        )
        return False
    return True


def _topics(settings: Settings, args: argparse.Namespace) -> int:
    from crmsync.streams.catalog import topic_specs
    from crmsync.streams.kafka import topics

    async def run() -> None:
        created = await topics.ensure_topics(
            settings.kafka,
            topic_specs(
                settings.topic_partitions, args.custom_entity, settings.outcomes_retention_h
            ),
            replication=settings.topic_replication,
        )
        print(f"created {len(created)} topic(s)" + (": " + ", ".join(created) if created else ""))

    return EXIT_OK if _run_kafka_call(settings, run()) else EXIT_UNREACHABLE


def _local_kafka(settings: Settings, brokers: int, secure: bool = False) -> LocalKafka:
    from crmsync.deploy.local.kafka import LocalKafka

    data = settings.local_dir / ("kafka" if brokers == 1 else "kafka-cluster")
    if secure:
        data = data.with_name(data.name + "-secure")
    return LocalKafka(cache_dir=settings.cache_dir, data_dir=data, nodes=brokers, secure=secure)


def _kafka(settings: Settings, args: argparse.Namespace) -> int:
    from crmsync.deploy.local.kafka import KafkaLaunchError, ensure_jars, run_tool

    try:
        if args.action == "fetch":
            print(ensure_jars(settings.cache_dir))
            return EXIT_OK
        if args.action == "tool":
            print(run_tool(settings.cache_dir, args.name, args.args, timeout=600), end="")
            return EXIT_OK
        kafka = _local_kafka(settings, args.brokers, getattr(args, "secure", False))
        with kafka:
            if kafka.secure:
                kafka.apply_acls()
                print(
                    "SASL_PLAINTEXT, SCRAM-SHA-256; principals and ACLs of deploy/kafka/acls.yaml; "
                    f"passwords in {kafka.data_dir / 'scram-passwords.json'}",
                    flush=True,
                )
            print(f"Kafka is ready on {kafka.bootstrap_servers} (Ctrl-C stops it)", flush=True)
            _wait_for_signal()
        return EXIT_OK
    except KafkaLaunchError as error:
        print(f"crmsync kafka: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _wait_for_signal(every: Callable[[], None] | None = None) -> None:
    """Blocks until SIGINT or SIGTERM, calling `every` about once a second meanwhile."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    while not received:
        if every is None:
            signal.pause()
        else:
            every()
            time.sleep(1.0)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    """The workflow's Faust app run by a `faust.Worker` (signals, SIGUSR1 traceback dump,
    blocking detector, an app crash ends the process), keeping crmsync's logging."""
    import faust

    from crmsync.streams import catalog
    from crmsync.streams.app import create_app
    from crmsync.streams.kafka import topics

    logging.getLogger("faust").setLevel(logging.WARNING)
    logging.getLogger("mode").setLevel(logging.WARNING)
    reachable = topics.ensure_topics(
        settings.kafka,
        catalog.topic_specs(settings.topic_partitions),
        replication=settings.topic_replication,
    )
    if not _run_kafka_call(settings, reachable):
        return EXIT_UNREACHABLE
    asyncio.set_event_loop(asyncio.new_event_loop())  # the one the app and the Worker share
    app = create_app(args.workflow, settings)
    worker = faust.Worker(app, override_logging=False, redirect_stdouts=False, quiet=True)
    worker.execute_from_commandline()


def _source(settings: Settings, args: argparse.Namespace) -> int:
    from crmsync.streams.source import run_source

    if not _run_kafka_call(settings, run_source(settings)):
        return EXIT_UNREACHABLE
    return EXIT_OK


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from crmsync.control.demo import DemoFailed, DemoRefused, run_demo

    if args.contacts < 1:
        print("crmsync demo: --contacts must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        if not _run_kafka_call(settings, run_demo(settings, args.contacts)):
            return EXIT_UNREACHABLE
    except DemoRefused as error:
        print(f"crmsync demo: {error}", file=sys.stderr)
        return EXIT_INVALID
    except DemoFailed as error:
        print(f"crmsync demo: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK


def _control(settings: Settings, args: argparse.Namespace) -> int:
    from crmsync.control.auth import TokenError
    from crmsync.control.server import ControlPlaneFailed, serve

    try:
        asyncio.run(serve(settings))
    except TokenError as error:
        print(f"crmsync control: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ControlPlaneFailed as error:
        print(f"crmsync control: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK


def _workflows(settings: Settings, args: argparse.Namespace) -> int:
    import json
    import time

    from crmsync.control.auth import stored_admin_token
    from crmsync.control.client import ControlClient, Refused, Unreachable

    action = args.action or "list"
    with ControlClient(settings.control_base_url, stored_admin_token(settings)) as client:
        try:
            if action == "list":
                flows = client.workflows()
                print(json.dumps(flows, indent=2) if args.json else _table(flows))
                return EXIT_OK
            if action == "show":
                detail = client.workflow(args.workflow)
                print(json.dumps(detail, indent=2) if args.json else _describe(detail))
                return EXIT_OK
            if action == "preview":
                config = _config_file(args.config) if args.config else None
                answer = client.preview(args.workflow, config, args.records)
                if args.json:
                    print(json.dumps(answer, indent=2))
                else:
                    from crmsync.control.preview_table import print_preview

                    print_preview(answer)
                return EXIT_OK
            if action == "dlq":
                from crmsync.control import dlq_cli

                return dlq_cli.run(client, args)
            if action == "replay":
                answer = client.replay(args.workflow, args.from_)
                print(
                    json.dumps(answer, indent=2)
                    if args.json
                    else f"{args.workflow}: replay from {args.from_}: backlog {answer['backlog']}"
                )
                return EXIT_OK
            act = client.start if action == "start" else client.stop
            answer = act(args.workflow)
            print(json.dumps(answer) if args.json else f"{args.workflow}: {answer['status']}")
            if args.wait:
                wanted = "RUNNING" if action == "start" else "STOPPED"
                deadline = time.monotonic() + 120
                while (status := client.workflow(args.workflow)["status"]) != wanted:
                    if status == "FAILED" or time.monotonic() > deadline:
                        print(f"{args.workflow}: {status}, not {wanted}", file=sys.stderr)
                        return EXIT_INVALID
                    time.sleep(0.5)
                print(f"{args.workflow}: {wanted}")
            return EXIT_OK
        except Refused as refused:
            print(f"crmsync workflows {action}: {refused}", file=sys.stderr)
            return EXIT_INVALID
        except InvalidFile as error:
            print(f"crmsync workflows {action}: {error}", file=sys.stderr)
            return EXIT_INVALID
        except Unreachable as error:
            print(f"crmsync workflows: {error}", file=sys.stderr)
            return EXIT_UNREACHABLE


class InvalidFile(ValueError):
    """A file given on the command line that cannot be read or is not what it must be."""


def _config_file(name: str) -> dict[str, Any]:
    import json

    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as error:
        raise InvalidFile(f"cannot read {name}: {error.strerror or error}") from None
    except ValueError as error:
        raise InvalidFile(f"{name} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidFile(f"{name}: a config is a JSON object")
    return data


def _table(flows: list[dict[str, Any]]) -> str:
    rows = [("WORKFLOW", "STATUS", "BACKLOG", "TREND", "PENDING", "ERROR")]
    for flow in flows:
        trend = str(flow["trend"]).replace("_", " ")
        if flow.get("eta_s") is not None:
            trend += f" (ETA {flow['eta_s']:.0f}s)"
        rows.append(
            (
                str(flow["name"]),
                str(flow["status"]),
                str(flow["backlog"]),
                trend,
                "yes" if flow["pending_changes"] else "",
                str(flow.get("error") or ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _describe(detail: dict[str, Any]) -> str:
    lines = [
        f"{detail['name']} — {detail['title']}",
        f"  status:   {detail['status']}"
        + (f" ({detail['error']})" if detail.get("error") else ""),
        f"  desired:  {detail['desired']} (generation {detail['generation']})",
        f"  backlog:  {detail['backlog']} ({str(detail['trend']).replace('_', ' ')})",
        f"  config:   version {detail['active_version']}"
        + (f", pending version {detail['pending_version']}" if detail["pending_changes"] else ""),
        f"  updated:  {detail['updated_at']} by {detail['updated_by']}",
    ]
    for change in detail.get("pending_diff") or []:
        lines.append(f"    {change['path']}: {change['active']!r} -> {change['pending']!r}")
    lines.append("  partitions:")
    for p in detail["partitions"]:
        committed = "-" if p["committed_offset"] is None else p["committed_offset"]
        lines.append(
            f"    {p['topic']}[{p['partition']}] end {p['end_offset']} committed {committed}"
            f" lag {p['lag']}"
        )
    lines.append("  workers:")
    for w in detail["workers"]:
        live = "" if w["live"] else " (no heartbeat)"
        lines.append(
            f"    {w['worker_id']}: {w['state']} generation {w['generation']} config "
            f"{w['config_version']}, {len(w['partitions'])} partitions, "
            f"{w['records_written']} written{live}"
        )
    return "\n".join(lines)


def _emulators(settings: Settings, args: argparse.Namespace) -> int:
    import os

    from crmsync.deploy.emulators import server

    data_dir = args.data_dir or settings.local_dir / "emulators"
    if args.only is None:
        print(
            f"Dynamics 365 emulator: http://127.0.0.1:{args.dynamics_port}/api/data/v9.2\n"
            f"Campaign emulator:     http://127.0.0.1:{args.campaign_port}/local/campaign",
            flush=True,
        )
        return _emulator_processes(args, data_dir)
    server.run(
        server.serve_emulators(
            data_dir,
            only=(args.only,),
            dynamics_port=args.dynamics_port,
            campaign_port=args.campaign_port,
            client_id=os.environ.get("CRMSYNC_EMULATOR_CLIENT_ID", "crmsync-local"),
            client_secret=os.environ.get("CRMSYNC_EMULATOR_CLIENT_SECRET", "crmsync-local"),
            parent_pid=int(os.environ.get(_EMULATORS_PARENT, "0")) or None,
        )
    )
    return EXIT_OK


#: Set for the two emulator processes `crmsync emulators` starts: they end when it is gone.
_EMULATORS_PARENT = "CRMSYNC_EMULATORS_PARENT_PID"


def _emulator_processes(args: argparse.Namespace, data_dir: Path) -> int:
    """Each emulator in a child process of its own (one core each at most, never sharing one
    event loop), until SIGINT/SIGTERM or until one of them ends (this process then ends too, so
    whoever supervises it restarts both)."""
    import os
    import subprocess

    common = [
        *("--dynamics-port", str(args.dynamics_port)),
        *("--campaign-port", str(args.campaign_port)),
        *("--data-dir", str(data_dir)),
    ]
    env = {**os.environ, _EMULATORS_PARENT: str(os.getpid())}
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "crmsync.control.cli", "emulators", "--only", kind, *common],
            env=env,
        )
        for kind in ("dynamics", "campaign")
    ]
    try:
        while not received and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    if received:
        return EXIT_OK
    failed = [child.returncode for child in children if child.returncode not in (None, 0)]
    return failed[0] if failed else 1


def _up(settings: Settings, args: argparse.Namespace) -> int:
    from crmsync.control import stack
    from crmsync.control.auth import TokenError
    from crmsync.deploy.local.kafka import KafkaLaunchError

    if args.detach:
        return _up_detached(settings, args)
    local = stack.LocalStack(settings, brokers=args.brokers)
    try:
        local.start()
        stack.write_pid_file(settings, local)
        print("crmsync is up:", flush=True)
        for name, where in local.describe().items():
            print(f"  {name:<18} {where}", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        _wait_for_signal(every=local.supervise)  # a process that dies is restarted
        print("stopping...", flush=True)
        return EXIT_OK
    except TokenError as error:
        print(f"crmsync up: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (KafkaLaunchError, stack.StackError) as error:
        print(f"crmsync up: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        local.stop()
        stack.pid_file(settings).unlink(missing_ok=True)


def _up_detached(settings: Settings, args: argparse.Namespace) -> int:
    import subprocess
    import time

    from crmsync.control import stack

    pid_file = stack.pid_file(settings)
    pid_file.unlink(missing_ok=True)
    logs = settings.local_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "up.log").open("ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "crmsync.control.cli", "up", "--brokers", str(args.brokers)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(
                f"crmsync up failed (exit {child.returncode}); see {logs / 'up.log'}",
                file=sys.stderr,
            )
            return EXIT_UNREACHABLE
        if pid_file.exists():
            banner = (logs / "up.log").read_text().rsplit("crmsync is up:", 1)[-1]
            print("\n".join(line for line in banner.strip().splitlines() if "Ctrl-C" not in line))
            print("crmsync is up (detached); `crmsync down` stops it.")
            return EXIT_OK
        time.sleep(0.3)
    print("crmsync up: not ready after 300s", file=sys.stderr)
    return EXIT_UNREACHABLE


def _down(settings: Settings, args: argparse.Namespace) -> int:
    from crmsync.control import stack

    if stack.down(settings):
        print("crmsync stopped")
    else:
        print("crmsync is not running")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
