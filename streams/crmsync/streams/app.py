"""Builds one workflow's Faust app (consumer group `crmsync.<workflow>`) and runs it as a worker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Mapping
from typing import Any

import faust
from faust.types import TransportT

from crmsync.streams import catalog
from crmsync.streams import config as configs
from crmsync.streams.consumer import PausableConsumer, PausableTransport
from crmsync.streams.control_protocol import ControlRecord
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.follower import CompactedTopicFollower
from crmsync.streams.runtime import WorkflowRuntime
from crmsync.streams.settings import Settings
from crmsync.streams.sinks.base import BatchingSink
from crmsync.streams.sinks.campaign import CampaignSink
from crmsync.streams.sinks.dynamics import DynamicsSink

log = logging.getLogger(__name__)


class WorkflowApp(faust.App):
    """A Faust app whose consumer keeps a stopped workflow's partitions paused."""

    def _new_transport(self) -> TransportT:
        return PausableTransport(self.conf.broker_consumer, self)


def default_sinks(workflow: str, settings: Settings) -> dict[str, BatchingSink]:
    sinks: dict[str, BatchingSink] = {}
    for system in catalog.spec(workflow).systems:
        if system == "d365":
            sinks[system] = DynamicsSink.for_target(settings.dynamics)
        else:
            sinks[system] = CampaignSink.for_target(settings.campaign)
    return sinks


def create_app(
    workflow: str,
    settings: Settings,
    sinks: Mapping[str, BatchingSink] | None = None,
    source_topics: list[str] | None = None,
) -> tuple[WorkflowApp, WorkflowRuntime]:
    """One Faust app per workflow, reading the topics its active config names.

    `source_topics` defaults to those of the config in force when the worker starts.
    """
    spec = catalog.spec(workflow)
    # Faust's data folder under .local/ (not the working directory the worker started in).
    datadir = settings.local_dir / "faust" / spec.group_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = WorkflowApp(
        spec.group_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings),
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication or 1,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_max_poll_records=settings.batch_max_records,
        broker_max_poll_interval=settings.max_poll_interval_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        broker_rebalance_timeout=max(30.0, settings.session_timeout_s * 3),
        # Shutdown commits what is written and does not wait for more: unwritten = read again.
        stream_wait_empty=False,
        producer_acks=-1,
        table_standby_replicas=0,
    )
    runtime = WorkflowRuntime(
        workflow,
        settings,
        sinks if sinks is not None else default_sinks(workflow, settings),
        worker_id=settings.worker_id or f"{socket.gethostname()}-{os.getpid()}",
    )
    # Subscribed through Faust's conductor; the records bypass its streams (see consumer.py).
    app.topics.add(
        app.topic(
            *(source_topics or spec.default_config().source_topics()),
            key_type=bytes,
            value_type=bytes,
        )
    )
    return app, runtime


def _credentials(settings: Settings) -> Any:
    options = settings.kafka.options
    if "sasl_mechanism" in options:
        return faust.SASLCredentials(
            username=options["sasl_plain_username"],
            password=options.get("sasl_plain_password"),
            mechanism=options["sasl_mechanism"],
            ssl_context=options.get("ssl_context"),
        )
    if "ssl_context" in options:
        return faust.SSLCredentials(options["ssl_context"])
    return None


async def run_worker(
    workflow: str,
    settings: Settings,
    sinks: Mapping[str, BatchingSink] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Runs one worker until SIGTERM/SIGINT (or `stop`): follows the control topic, reports
    status. `sinks` replaces the API clients (benchmarks use a discarding sink)."""
    await topics.ensure_topics(
        settings.kafka,
        catalog.topic_specs(settings.topic_partitions),
        replication=settings.topic_replication,
    )
    control = CompactedTopicFollower(settings.kafka, topics.CONTROL)
    await control.start()
    await control.loaded.wait()
    first = _control_record(control, workflow)
    source = _source_topics(workflow, first)
    await topics.ensure_topics(
        settings.kafka,
        [
            *catalog.topic_specs(settings.topic_partitions),
            *(topics.TopicSpec(name, settings.topic_partitions) for name in source),
        ],
        replication=settings.topic_replication,
    )
    app, runtime = create_app(workflow, settings, sinks=sinks, source_topics=source)
    app.finalize()
    consumer = app.consumer
    assert isinstance(consumer, PausableConsumer)
    consumer.stopped = True  # nothing is read before the control record was applied
    runtime.attach(consumer)
    await runtime.open()

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    await app.start()
    log.info(
        "event=worker_started workflow=%s worker=%s topics=%s",
        workflow,
        runtime.worker_id,
        ",".join(source),
    )
    try:
        await _apply(runtime, first)

        async def follow() -> None:
            async for _ in control.changes():
                await _apply(runtime, _control_record(control, workflow))

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(settings.heartbeat_s)
                await runtime.report()

        async def retry_parked() -> None:
            while True:
                await asyncio.sleep(0.5)
                await runtime.tick()

        tasks = [
            asyncio.create_task(runtime.run(), name=f"{workflow}.writer"),
            asyncio.create_task(follow()),
            asyncio.create_task(heartbeat()),
            asyncio.create_task(retry_parked()),
        ]
        await stop.wait()
        for task in tasks:
            task.cancel()
    finally:
        log.info("event=worker_stopping workflow=%s worker=%s", workflow, runtime.worker_id)
        runtime.close_gate()
        await app.stop()
        await runtime.close()
        await control.stop()


async def _apply(runtime: WorkflowRuntime, record: ControlRecord | None) -> None:
    """Applies a control record; a failure is reported FAILED, and the worker keeps following
    the control topic so the next Stop/Start is still honoured."""
    try:
        await runtime.apply(record)
    except Exception as error:  # one bad record must not end the control loop
        log.exception("event=control_apply_failed workflow=%s", runtime.name)
        await runtime.fail(
            f"could not apply control generation {record.generation if record else 0}: {error!r}"
        )


def _control_record(control: CompactedTopicFollower, workflow: str) -> ControlRecord | None:
    data = control.latest.get(workflow)
    if data is None:
        return None
    try:
        return ControlRecord.decode(data)
    except ValueError as error:
        log.error("event=bad_control_record workflow=%s error=%r", workflow, error)
        return None


def _source_topics(workflow: str, record: ControlRecord | None) -> list[str]:
    spec = catalog.spec(workflow)
    if record is not None:
        try:
            return spec.parse_config(record.active_config).source_topics()
        except configs.ConfigError:
            pass  # the runtime reports FAILED with the reason once it applies the record
    return spec.default_config().source_topics()
