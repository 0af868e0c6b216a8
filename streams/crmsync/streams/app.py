"""Builds one workflow's Faust app: its agent, its supervised side work and the revoke fence.

The agent (`crmsync.<workflow>`, concurrency 1) is the processing unit: the consumer puts each
fetched batch into the agent's channel as one event and the agent writes them, merged per fetch
epoch up to `batch_max_records` (Faust's per-message streams stay out of the hot path). The
control follower is an `app.service`, heartbeats and parked retries are `app.timer`s: a crash of
any of them turns the workflow FAILED with the reason instead of ending silently.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import faust
from faust.types import TP, EventT, Message, StreamT, TransportT
from mode.types.signals import BaseSignalT

from crmsync.streams import catalog
from crmsync.streams import config as configs
from crmsync.streams.consumer import Fetched, PausableConsumer, PausableTransport
from crmsync.streams.control_follower import ControlService, control_record
from crmsync.streams.control_protocol import ControlRecord
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.follower import CompactedTopicFollower
from crmsync.streams.runtime import WorkflowRuntime
from crmsync.streams.settings import Settings
from crmsync.streams.sinks.base import BatchingSink
from crmsync.streams.sinks.campaign import CampaignSink
from crmsync.streams.sinks.dynamics import DynamicsSink

log = logging.getLogger(__name__)

#: Fetched batches the agent takes at most at once (then merged per epoch up to the batch size).
_TAKE_BATCHES = 4
#: The channel's room: above what back-pressure lets the consumer queue, so a put never blocks.
_CHANNEL_BATCHES = 64
#: Container allocations between young-generation collections (CPython's default is 700).
_GC_YOUNG_THRESHOLD = 20_000


class FetchedBatches(faust.Channel[Fetched]):
    """The agent's channel: the consumer puts each fetched batch of the source topics into it.

    Named after those topics, so `faust agents` lists the agent with what it reads.
    """

    source: str = "-"

    def get_topic_name(self) -> str:
        root = self._root if self._root is not None else self
        return f"{getattr(root, 'source', '-')} (fetched batches)"


class WorkflowApp(faust.App):
    """A Faust app whose consumer keeps a stopped workflow's partitions paused."""

    #: Set by `create_app`: the workflow, and what runs it.
    workflow: str
    runtime: WorkflowRuntime
    batches: FetchedBatches
    #: The control topic's follower, made on the app's loop at first start.
    control: CompactedTopicFollower

    def _new_transport(self) -> TransportT:
        return PausableTransport(self.conf.broker_consumer, self)

    async def on_first_start(self) -> None:
        """Before the conductor subscribes: the topics exist, the control topic is read, the
        source topics its record names are added, and nothing is read before it is applied."""
        await super().on_first_start()
        settings = self.runtime.settings
        await topics.ensure_topics(
            settings.kafka,
            catalog.topic_specs(
                settings.topic_partitions, outcomes_retention_h=settings.outcomes_retention_h
            ),
            replication=settings.topic_replication,
        )
        self.control = CompactedTopicFollower(settings.kafka, topics.CONTROL)
        await self.control.start()
        await self.control.loaded.wait()
        source = source_topics(self.workflow, control_record(self.control, self.workflow))
        await topics.ensure_topics(
            settings.kafka,
            [topics.TopicSpec(name, settings.topic_partitions) for name in source],
            replication=settings.topic_replication,
        )
        self.topics.add(self.topic(*source, key_type=bytes, value_type=bytes))
        self.batches.source = ",".join(source)
        consumer = self.consumer
        assert isinstance(consumer, PausableConsumer)
        consumer.stopped = True
        self.runtime.attach(consumer)
        await self.runtime.open()
        _tune_gc()
        log.info(
            "event=worker_started workflow=%s worker=%s topics=%s",
            self.workflow,
            self.runtime.worker_id,
            ",".join(source),
        )

    async def on_stop(self) -> None:
        # No new write starts and the one in flight ends (or is abandoned) before the consumer
        # commits on its way out: unwritten = read again.
        log.info(
            "event=worker_stopping workflow=%s worker=%s", self.workflow, self.runtime.worker_id
        )
        self.runtime.close_gate()
        await super().on_stop()

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        await self.runtime.close()
        if hasattr(self, "control"):
            await self.control.stop()


def _tune_gc() -> None:
    """Keeps the cyclic garbage collector off the data path.

    Each record allocates a handful of containers (its decoded event, item, planned writes)
    that live for one batch. With CPython's default young threshold most of them outlive a
    young collection, are promoted, and the full collections they trigger walk every
    long-lived object of the process (Faust, aiokafka, pydantic models): about a quarter of
    the worker's CPU per record. A young collection once per few batches lets them die young,
    and what start-up built is moved out of the collector's walks (refcounting still frees it).
    """
    young, *older = gc.get_threshold()
    if young < _GC_YOUNG_THRESHOLD:
        gc.collect()
        gc.freeze()
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *older)


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
) -> WorkflowApp:
    """One Faust app per workflow (consumer group `crmsync.<workflow>`) with its agent, timers,
    control service and revoke fence; it reads the topics the active config names when the
    worker starts."""
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
    app.workflow = workflow
    app.runtime = runtime

    batches = FetchedBatches(app, maxsize=_CHANNEL_BATCHES)
    batches.source = ",".join(spec.default_config().source_topics())
    app.batches = batches
    batch_topic = f"{spec.group_id}.batches"

    async def deliver(fetched: Fetched) -> None:
        # The consumer's generation on the message: Faust's stream drops a batch fetched
        # before a rebalance (the rebalance seeks to the commit, so it is read again).
        message = Message(
            batch_topic,
            0,
            0,
            time.time(),
            0,
            None,
            None,
            None,
            None,
            generation_id=fetched.generation,
        )
        runtime.queued(fetched.size, fetched.generation)
        await batches.put(app.create_event(None, fetched, None, message))

    @app.agent(batches, name=spec.group_id, concurrency=1)
    async def write(stream: StreamT[Fetched]) -> None:
        """Writes the fetched batches in order; starts (and restarts) from the commit."""
        await runtime.resync()
        try:
            # noack_take: nothing is acked by Faust (the batches are acked record by record
            # once written) and it hands over the events, whose values are the batches.
            batches_taken = cast(faust.Stream[Fetched], stream).noack_take(
                _TAKE_BATCHES, within=settings.batch_wait_s
            )
            async for taken in batches_taken:
                events = cast(Sequence[EventT[Any]], taken)
                await runtime.handle_fetched([cast(Fetched, event.value) for event in events])
        except Exception as error:
            await runtime.fail(f"the agent crashed: {type(error).__name__}: {error}")
            raise  # Faust's supervisor restarts it; its start re-syncs

    async def heartbeat() -> None:
        await _supervised(runtime, "heartbeat", runtime.report())

    async def retry_parked() -> None:
        await _supervised(runtime, "parked retries", runtime.tick())

    async def check_drift() -> None:
        await _supervised(runtime, "drift check", runtime.check_drift())

    app.timer(settings.heartbeat_s, name=f"{spec.group_id}.heartbeat")(heartbeat)
    if settings.drift_check_s > 0:
        app.timer(settings.drift_check_s, name=f"{spec.group_id}.drift-check")(check_drift)
    app.timer(0.5, name=f"{spec.group_id}.parked-retries")(retry_parked)

    async def fence(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        # Awaited by Faust before the member rejoins the group.
        revoked: set[TP] = args[0]
        await runtime.fence(revoked)

    app.on_partitions_revoked.connect(fence)

    @app.service
    class Control(ControlService):
        """This worker's control follower."""

        owner = app

    app.consumer.deliver = deliver  # type: ignore[attr-defined]
    del write, heartbeat, retry_parked, check_drift, fence, Control  # registered with the app
    return app


async def _supervised(runtime: WorkflowRuntime, what: str, step: Any) -> None:
    """One run of a timer: an unexpected error turns the workflow FAILED with the reason (and
    the timer runs again next time)."""
    try:
        await step
    except asyncio.CancelledError:
        raise
    except Exception as error:
        log.exception("event=task_crashed workflow=%s task=%s", runtime.name, what)
        await runtime.fail(f"{what} crashed: {type(error).__name__}: {error}")


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
    """Runs one worker in this process until `stop` is set (or the app crashes): benchmarks
    and in-process tests; `crmsync worker` runs the same app as a `faust.Worker`."""
    app = create_app(workflow, settings, sinks=sinks)
    stop = stop or asyncio.Event()
    crashed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    crash = app.crash

    async def _crash(exc: BaseException) -> None:
        # Without a faust.Worker nothing ends the process on a crash: end this run instead.
        if not crashed.done():
            crashed.set_result(exc)
        await crash(exc)

    app.crash = _crash  # type: ignore[method-assign,assignment]
    await app.start()
    try:
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        ended: set[asyncio.Future[Any]] = {stopping, crashed}
        await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if crashed.done():
            raise crashed.result()
    finally:
        await app.stop()


def source_topics(workflow: str, record: ControlRecord | None) -> list[str]:
    """The topics the active config reads (the default config's before any control record)."""
    spec = catalog.spec(workflow)
    if record is not None:
        try:
            return spec.parse_config(record.active_config).source_topics()
        except configs.ConfigError:
            pass  # the runtime reports FAILED with the reason once it applies the record
    return spec.default_config().source_topics()
