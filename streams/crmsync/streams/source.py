"""`crmsync source d365`: Dynamics change tracking (delta links) published as ChangeEvents."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field

from crmsync.schemas.codec import CHANGE_EVENT
from crmsync.streams.catalog import default_config, parse_config
from crmsync.streams.config import ConfigError, D365ToCampaignConfig
from crmsync.streams.control_protocol import ControlRecord, WorkerStatus
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import EventProducer, change_event
from crmsync.streams.kafka.follower import CompactedTopicFollower
from crmsync.streams.settings import Settings
from crmsync.targets.dynamics import ChangesPage, DynamicsClient, FullSyncRequired
from crmsync.targets.errors import Fatal, RecordRejected, Retryable, SinkError
from crmsync.targets.retry import backoff

log = logging.getLogger(__name__)

#: The key of the source's record in `crmsync.status`, and its `workflow` field there.
STATUS_KEY = "source/d365"
SOURCE_NAME = "source-d365"
CONFIG_WORKFLOW = "d365-to-campaign"
Phase = Literal["load", "delta"]
_LOADED_WAIT_S = 30.0
_LINK_REFRESH_S = 600.0  # an unchanged delta link is stored again after this, so it stays fresh
_RETRY_CAP_S = 30.0


@dataclass(frozen=True)
class TrackedEntity:
    """One Dynamics table whose changes are published: its names and its topic."""

    logical_name: str
    topic: str
    entity_set: str | None = None  # None → resolved from EntityDefinitions on first use
    primary_key: str | None = None  # None → <logical name>id, until EntityDefinitions says

    @property
    def primary_id(self) -> str:
        # Most tables name their key <logical name>id; activity tables name it activityid.
        return self.primary_key or f"{self.logical_name}id"


def tracked_entities(config: D365ToCampaignConfig) -> list[TrackedEntity]:
    """Contacts and each custom entity of a d365-to-campaign config."""
    return [
        TrackedEntity("contact", config.contact_topic, "contacts"),
        *(TrackedEntity(e.logical_name, e.source_topic) for e in config.custom_entities),
    ]


def plural(logical_name: str) -> str:
    """Dataverse's default entity set name: the logical name in the plural (English rules)."""
    if logical_name.endswith(("s", "x", "z", "ch", "sh")):
        return logical_name + "es"
    if logical_name.endswith("y") and logical_name[-2:-1] not in ("a", "e", "i", "o", "u"):
        return logical_name[:-1] + "ies"
    return logical_name + "s"


def configured_entity_sets(text: str | None) -> dict[str, str]:
    """``logicalname=EntitySetName,...`` as a dict."""
    pairs = (item.partition("=") for item in (text or "").split(",") if item.strip())
    return {name.strip(): value.strip() for name, _, value in pairs if name.strip() and value}


# -- records of the offsets and status topics ---------------------------------------------------


class StoredLink(BaseModel):
    """Where one entity's change tracking goes on: the value of `crmsync.source-offsets`."""

    model_config = ConfigDict(frozen=True)

    entity: str
    entity_set: str
    link: str = Field(description="relative to the Web API root, e.g. contacts?$deltatoken=...")
    phase: Phase = Field(description="load: a page of the initial load; delta: polling")
    stored_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


class EntityStatus(BaseModel):
    """Progress of one entity, as the status record shows it."""

    model_config = ConfigDict(frozen=True)

    entity: str
    entity_set: str | None
    topic: str
    phase: Literal["initial-load", "incremental"]
    last_poll_ms: int | None = Field(description="end of the last successful poll")
    lag_s: float | None = Field(description="seconds since the last successful poll")
    changes_published: int
    full_loads: int
    error: str | None = None


class SourceStatus(WorkerStatus):
    """The source's status + heartbeat in `crmsync.status` (key ``source/d365``).

    A WorkerStatus of the pseudo-workflow ``source-d365`` (so every reader of the topic decodes
    it), with the source's own fields added.
    """

    workflow: str = SOURCE_NAME
    generation: int = 0
    config_version: int = Field(default=0, description="d365-to-campaign version followed")
    system: str = "d365"
    last_poll_ms: int | None = Field(default=None, description="newest successful poll")
    changes_published: int = 0
    lag_s: float | None = Field(default=None, description="the largest entity lag")
    poll_interval_s: float = 0.0
    entities: list[EntityStatus] = Field(default_factory=list)

    @property
    def key(self) -> str:
        return STATUS_KEY


@dataclass
class _Progress:
    entity: TrackedEntity
    entity_set: str | None = None
    phase: Phase = "load"
    last_poll_ms: int | None = None
    changes_published: int = 0
    full_loads: int = 0
    error: str | None = None
    fatal: bool = False

    def view(self, now_ms: int) -> EntityStatus:
        lag = None if self.last_poll_ms is None else round((now_ms - self.last_poll_ms) / 1000, 1)
        return EntityStatus(
            entity=self.entity.logical_name,
            entity_set=self.entity_set,
            topic=self.entity.topic,
            phase="initial-load" if self.phase == "load" else "incremental",
            last_poll_ms=self.last_poll_ms,
            lag_s=lag,
            changes_published=self.changes_published,
            full_loads=self.full_loads,
            error=self.error,
        )


# -- rows → events ------------------------------------------------------------------------------


def epoch_ms(text: Any) -> int | None:
    """A Dataverse datetime (``2024-05-01T12:00:00Z``) as epoch milliseconds; None if absent."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _scalar(value: Any) -> bool | int | float | str | None:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def is_deletion(entry: Mapping[str, Any]) -> bool:
    context = str(entry.get("@odata.context", ""))
    return context.endswith("$deletedEntity") or entry.get("reason") == "deleted"


def events_of(
    entity: TrackedEntity, entries: Sequence[Mapping[str, Any]], *, initial: bool
) -> list[tuple[str, dict[str, Any] | None]]:
    """(key, ChangeEvent) pairs of one page, in order; a deletion is followed by (key, None),
    the tombstone. Rows of an initial load are ``r``; later ones ``c`` when created and last
    modified at the same instant, else ``u``."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    for entry in entries:
        if is_deletion(entry):
            key = str(entry.get("id", "")).lower()
            if not key:
                log.warning("event=deletion_without_id entity=%s", entity.logical_name)
                continue
            out.append((key, change_event("d", entity.logical_name, key, system="d365")))
            out.append((key, None))
            continue
        key = str(entry.get(entity.primary_id) or "").lower()
        if not key:
            log.warning(
                "event=row_without_id entity=%s field=%s", entity.logical_name, entity.primary_id
            )
            continue
        after = {
            name: _scalar(value)
            for name, value in entry.items()
            if "@" not in name  # annotations: @odata.etag, ...@OData.Community.Display.V1...
        }
        modified = entry.get("modifiedon")
        if initial:
            op: Literal["c", "u", "r"] = "r"
        else:
            op = "c" if modified is not None and entry.get("createdon") == modified else "u"
        user = entry.get("_modifiedby_value")
        etag = str(entry.get("@odata.etag") or "")
        version = etag.removeprefix("W/").strip('"') or None
        out.append(
            (
                key,
                change_event(
                    op,
                    entity.logical_name,
                    key,
                    after=after,
                    system="d365",
                    source_ts_ms=epoch_ms(modified),
                    user=str(user) if user else None,
                    txid=version,
                ),
            )
        )
    return out


# -- the source ---------------------------------------------------------------------------------


@dataclass
class D365Source:
    """Follows Dynamics change tracking for every configured entity and publishes ChangeEvents.

    Per entity: an initial load (``r``), then the delta link polled every
    ``source_poll_interval_s``. Each page's events are acknowledged by Kafka (acks=all,
    idempotent) before the link to the next page is stored in `crmsync.source-offsets`, so a
    crash repeats at most one page and never skips a change.
    """

    settings: Settings
    client: DynamicsClient | None = None
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    _producer: EventProducer | None = None
    _links: dict[str, StoredLink] = field(default_factory=dict)
    _progress: dict[str, _Progress] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _config_version: int = 0
    _control_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _status_due: asyncio.Event = field(default_factory=asyncio.Event)
    _entity_sets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.settings.worker_id:
            self.worker_id = self.settings.worker_id
        self._entity_sets = configured_entity_sets(self.settings.source_entity_sets)

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until ``stop`` is set; Kafka unreachable at start raises KafkaError."""
        settings = self.settings
        client = self.client or DynamicsClient(settings.dynamics)
        self.client = client
        control = CompactedTopicFollower(
            settings.kafka,
            topics.CONTROL,
            lambda key, _: self._control_changed.set() if key == CONFIG_WORKFLOW else None,
        )
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(client.aclose)
            await self._ensure_topics([])
            self._producer = await stack.enter_async_context(EventProducer(settings.kafka))
            await self._load_links()
            await control.start()
            stack.push_async_callback(control.stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(control.loaded.wait(), _LOADED_WAIT_S)
            await self._reconcile(control)
            heartbeat = asyncio.create_task(self._heartbeat(), name="source-status")
            log.info(
                "event=source_started worker=%s entities=%s", self.worker_id, list(self._tasks)
            )
            try:
                while not stop.is_set():
                    changed = asyncio.create_task(self._control_changed.wait())
                    stopped = asyncio.create_task(stop.wait())
                    await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    changed.cancel()
                    stopped.cancel()
                    if self._control_changed.is_set() and not stop.is_set():
                        self._control_changed.clear()
                        await self._reconcile(control)
            finally:
                for task in self._tasks.values():
                    task.cancel()
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
                with contextlib.suppress(KafkaError, OSError):
                    await asyncio.wait_for(self._publish_status("STOPPED"), 10)
                log.info("event=source_stopped worker=%s", self.worker_id)

    async def _ensure_topics(self, entities: Sequence[TrackedEntity]) -> None:
        wanted = {topics.SOURCE_OFFSETS, topics.STATUS, *(e.topic for e in entities)}
        custom = [e.logical_name for e in entities if e.logical_name != "contact"]
        specs = [
            spec
            for spec in topics.shared_topic_specs(self.settings.topic_partitions, custom)
            if spec.name in wanted
        ]
        specs += [
            topics.TopicSpec(name, self.settings.topic_partitions)
            for name in wanted - {spec.name for spec in specs}
        ]
        await topics.ensure_topics(
            self.settings.kafka, specs, replication=self.settings.topic_replication
        )

    async def _load_links(self) -> None:
        """Reads every stored link once: this process is the only writer afterwards."""
        offsets = CompactedTopicFollower(self.settings.kafka, topics.SOURCE_OFFSETS)
        await offsets.start()
        try:
            await asyncio.wait_for(offsets.loaded.wait(), _LOADED_WAIT_S)
        finally:
            await offsets.stop()
        for name, value in offsets.latest.items():
            try:
                self._links[name] = StoredLink.model_validate_json(value)
            except ValueError as error:
                log.warning("event=bad_stored_link entity=%s error=%r", name, error)
        log.info(
            "event=links_loaded entities=%s",
            ",".join(f"{n}:{link.phase}" for n, link in self._links.items()) or "-",
        )

    def _config(self, control: CompactedTopicFollower) -> D365ToCampaignConfig:
        raw = control.latest.get(CONFIG_WORKFLOW)
        if raw is None:
            self._config_version = 0
            config = default_config(CONFIG_WORKFLOW)
        else:
            record = ControlRecord.decode(raw)
            config = parse_config(CONFIG_WORKFLOW, record.active_config)
            self._config_version = record.active_version
        assert isinstance(config, D365ToCampaignConfig)
        return config

    async def _reconcile(self, control: CompactedTopicFollower) -> None:
        """Starts a task per entity of the active config; stops those no longer configured."""
        try:
            config = self._config(control)
        except (ConfigError, ValueError) as error:
            log.error("event=bad_control_record workflow=%s error=%s", CONFIG_WORKFLOW, error)
            if self._tasks:
                return
            config = default_config(CONFIG_WORKFLOW)  # type: ignore[assignment]
            assert isinstance(config, D365ToCampaignConfig)
        wanted = {e.logical_name: e for e in tracked_entities(config)}
        for name in list(self._tasks):
            if name not in wanted or self._progress[name].entity != wanted[name]:
                self._tasks.pop(name).cancel()
                self._progress.pop(name, None)
                log.info("event=entity_unfollowed entity=%s", name)
        new = [e for name, e in wanted.items() if name not in self._tasks]
        if new:
            await self._ensure_topics(new)
        for entity in new:
            progress = _Progress(entity)
            stored = self._links.get(entity.logical_name)
            progress.phase = stored.phase if stored else "load"
            self._progress[entity.logical_name] = progress
            self._tasks[entity.logical_name] = asyncio.create_task(
                self._follow(progress), name=f"source:{entity.logical_name}"
            )
        self._status_due.set()

    # -- one entity -----------------------------------------------------------------------

    async def _follow(self, progress: _Progress) -> None:
        """Polls one entity for as long as the source runs; never raises (but cancellation)."""
        entity = progress.entity
        attempt = 0
        while True:
            try:
                await self._sync(progress)
                attempt = 0
                if progress.error:
                    log.info("event=entity_recovered entity=%s", entity.logical_name)
                progress.error, progress.fatal = None, False
                self._status_due.set()
                await asyncio.sleep(self.settings.source_poll_interval_s)
            except FullSyncRequired as error:
                log.warning(
                    "event=delta_token_expired entity=%s action=full_load reason=%s",
                    entity.logical_name,
                    error.reason,
                )
                self._restart_load(progress)
            except RecordRejected as error:
                stored = self._links.get(entity.logical_name)
                if stored is not None:
                    log.warning(
                        "event=stored_link_refused entity=%s action=full_load reason=%s",
                        entity.logical_name,
                        error.reason,
                    )
                    self._restart_load(progress)
                    continue
                await self._failed(progress, error)  # the initial query itself is refused
            except Fatal as error:
                await self._failed(progress, error)
            except Retryable as error:
                attempt += 1
                wait = error.retry_after or _backoff(attempt)
                progress.error = error.reason
                log.warning(
                    "event=poll_retry entity=%s attempt=%d wait_s=%.1f reason=%s",
                    entity.logical_name,
                    attempt,
                    wait,
                    error.reason,
                )
                self._status_due.set()
                await asyncio.sleep(wait)
            except (KafkaError, OSError) as error:
                attempt += 1
                wait = _backoff(attempt)
                progress.error = f"kafka: {error!r}"
                log.warning(
                    "event=publish_retry entity=%s attempt=%d wait_s=%.1f error=%r",
                    entity.logical_name,
                    attempt,
                    wait,
                    error,
                )
                await asyncio.sleep(wait)
            except Exception as error:  # a bug must not end the source: report, wait, try again
                log.exception("event=source_error entity=%s", entity.logical_name)
                await self._failed(progress, Fatal(f"unexpected: {error!r}"))

    def _restart_load(self, progress: _Progress) -> None:
        self._links.pop(progress.entity.logical_name, None)
        progress.phase = "load"
        self._status_due.set()

    async def _failed(self, progress: _Progress, error: SinkError) -> None:
        progress.error, progress.fatal = error.reason, True
        log.error(
            "event=source_failed entity=%s retry_in_s=%.0f reason=%s",
            progress.entity.logical_name,
            self.settings.source_fatal_retry_s,
            error.reason,
        )
        self._status_due.set()
        await asyncio.sleep(self.settings.source_fatal_retry_s)

    async def _entity_set(self, entity: TrackedEntity) -> str:
        """The entity set of a logical name: given, configured, from EntityDefinitions, or the
        plural."""
        name = entity.logical_name
        known = entity.entity_set or self._entity_sets.get(name)
        if known:
            return known
        assert self.client is not None
        try:
            found = await self.client.get(
                "EntityDefinitions", {"LogicalName": name}, select=["EntitySetName"]
            )
        except (Fatal, RecordRejected) as error:
            found = None
            log.info("event=entity_definitions_unreadable entity=%s reason=%s", name, error.reason)
        entity_set = str(found["EntitySetName"]) if found and found.get("EntitySetName") else None
        if entity_set is None:
            entity_set = plural(name)
            log.info("event=entity_set_assumed entity=%s entity_set=%s", name, entity_set)
        self._entity_sets[name] = entity_set
        return entity_set

    async def _sync(self, progress: _Progress) -> None:
        """Reads pages until the delta link; each page published, then its successor stored."""
        assert self.client is not None
        entity = progress.entity
        entity_set = await self._entity_set(entity)
        progress.entity_set = entity_set
        if entity.primary_key is None:
            try:
                primary = await self.client.primary_id(entity_set)
            except (Fatal, RecordRejected) as error:
                primary = None
                log.info("event=primary_id_assumed entity=%s reason=%s", entity.logical_name, error)
            if primary:
                entity = progress.entity = replace(entity, primary_key=primary)
        page_size = self.settings.source_page_size
        stored = self._links.get(entity.logical_name)
        if stored is not None and stored.entity_set != entity_set:
            stored = None
        if stored is None:
            log.info(
                "event=initial_load_started entity=%s entity_set=%s",
                entity.logical_name,
                entity_set,
            )
            progress.phase = "load"
            progress.full_loads += 1
            page = await self.client.read_changes(entity_set, page_size=page_size)
            phase: Phase = "load"
        else:
            page = await self.client.read_changes(link=stored.link, page_size=page_size)
            phase = stored.phase
        while True:
            published = await self._publish(entity, page, initial=phase == "load")
            progress.changes_published += published
            progress.last_poll_ms = int(time.time() * 1000)
            if page.next_link is not None:
                await self._store(entity_set, entity, page.next_link, phase, force=True)
                page = await self.client.read_changes(link=page.next_link, page_size=page_size)
                continue
            if page.delta_link is None:
                raise Fatal(f"{entity_set}: the last page carries no @odata.deltaLink")
            if phase == "load":
                log.info(
                    "event=initial_load_done entity=%s published=%d",
                    entity.logical_name,
                    progress.changes_published,
                )
            await self._store(entity_set, entity, page.delta_link, "delta", force=published > 0)
            progress.phase = "delta"
            return

    async def _publish(self, entity: TrackedEntity, page: ChangesPage, *, initial: bool) -> int:
        """Sends a page's events and waits until Kafka acknowledged every one; the count."""
        assert self._producer is not None
        pairs = events_of(entity, page.value, initial=initial)
        futures = []
        events = 0
        for key, event in pairs:
            if event is None:
                if not self.settings.source_tombstones:
                    continue
                value = None
            else:
                value = CHANGE_EVENT.encode(event, validate=False)
                events += 1
            futures.append(await self._producer.send_encoded(entity.topic, key, value, wait=False))
        await asyncio.gather(*futures)
        if events:
            log.info(
                "event=changes_published entity=%s topic=%s events=%d initial=%s",
                entity.logical_name,
                entity.topic,
                events,
                initial,
            )
        return events

    async def _store(
        self, entity_set: str, entity: TrackedEntity, link: str, phase: Phase, *, force: bool
    ) -> None:
        """Stores the link to read next (acks=all), unless it would only refresh a young one."""
        assert self._producer is not None
        current = self._links.get(entity.logical_name)
        if (
            not force
            and current is not None
            and current.phase == phase
            and current.entity_set == entity_set
            and _age_s(current.stored_at) < _LINK_REFRESH_S
        ):
            return
        stored = StoredLink(
            entity=entity.logical_name, entity_set=entity_set, link=link, phase=phase
        )
        await self._producer.send_encoded(
            topics.SOURCE_OFFSETS, entity.logical_name, stored.model_dump_json().encode()
        )
        self._links[entity.logical_name] = stored

    # -- status ---------------------------------------------------------------------------

    def status(self, state: str | None = None) -> SourceStatus:
        now = int(time.time() * 1000)
        views = [p.view(now) for p in self._progress.values()]
        failed = [p for p in self._progress.values() if p.fatal]
        polled = [v.last_poll_ms for v in views if v.last_poll_ms is not None]
        lags = [v.lag_s for v in views if v.lag_s is not None]
        if state is None:
            state = "FAILED" if failed else "RUNNING" if polled else "STARTING"
        error = "; ".join(f"{p.entity.logical_name}: {p.error}" for p in failed) or None
        return SourceStatus(
            worker_id=self.worker_id,
            state=state,  # type: ignore[arg-type]
            config_version=self._config_version,
            error=error,
            partitions=sorted({p.entity.topic for p in self._progress.values()}),
            records_written=sum(v.changes_published for v in views),
            changes_published=sum(v.changes_published for v in views),
            last_poll_ms=max(polled) if polled else None,
            lag_s=max(lags) if lags else None,
            poll_interval_s=self.settings.source_poll_interval_s,
            entities=views,
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    async def _publish_status(self, state: str | None = None) -> None:
        assert self._producer is not None
        status = self.status(state)
        await self._producer.send_encoded(topics.STATUS, status.key, status.encode())

    async def _heartbeat(self) -> None:
        while True:
            self._status_due.clear()
            try:
                await self._publish_status()
            except (KafkaError, OSError) as error:  # the status must not stop the data path
                log.warning("event=status_not_sent error=%r", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_due.wait(), self.settings.heartbeat_s)


def _backoff(attempt: int) -> float:
    return backoff(attempt, base_s=0.5, cap_s=_RETRY_CAP_S)


def _age_s(iso: str) -> float:
    try:
        return time.time() - datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return float("inf")


async def run_source(settings: Settings) -> None:
    """The `crmsync source d365` process: runs until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await D365Source(settings).run(stop)
