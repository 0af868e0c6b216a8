"""The three workflows: which topics each reads and how one source record becomes target writes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT, EventSchema
from crmsync.streams import mapping, optout
from crmsync.streams.config import (
    CampaignToD365Config,
    D365ToCampaignConfig,
    OptInOutConfig,
    WorkflowConfig,
)
from crmsync.streams.control_protocol import TopicFollower
from crmsync.streams.kafka import topics
from crmsync.targets.errors import Fatal, RecordRejected

log = logging.getLogger(__name__)

TITLES = {
    "d365-to-campaign": "Microsoft Dynamics 365 to Campaign",
    "campaign-to-d365": "Campaign to Microsoft Dynamics 365",
    "opt-in-out": "Opt-in/Opt-out",
}
#: Which target systems each workflow writes to.
SYSTEMS = {
    "d365-to-campaign": ("campaign",),
    "campaign-to-d365": ("d365",),
    "opt-in-out": ("d365", "campaign"),
}


@dataclass
class Planned:
    """What one source record turns into; `commit` runs after all its writes succeeded."""

    writes: list[mapping.Write]
    commit: Any = None  # an awaitable factory, e.g. storing the opt-out state


class Workflow(Protocol):
    """Maps decoded source records of one workflow to target writes."""

    name: str

    def source_topics(self) -> list[str]: ...

    @property
    def schema(self) -> EventSchema: ...

    async def plan(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> list[Planned]:
        """One Planned per (topic, event), in order. Raises nothing for a single record: one
        that cannot be mapped is a `Planned` whose `commit` is the RecordRejected (or Fatal: only a
        configuration fault, never something a record's content provokes)."""
        ...

    def forget_pending(self) -> None:
        """Drops what was decided for records not written yet: they will be read again."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _plan_each(batch: Sequence[tuple[str, dict[str, Any]]], fn: Any) -> list[Planned]:
    planned = []
    for topic, event in batch:
        try:
            planned.append(Planned(fn(topic, event)))
        except (mapping.MappingError, Fatal) as error:
            planned.append(Planned([], commit=error))
        except Exception as error:  # whatever one record provokes is that record's rejection
            planned.append(Planned([], commit=_unplannable(error)))
    return planned


def _unplannable(error: Exception) -> RecordRejected:
    log.warning("event=record_unplannable error=%r", error)
    return RecordRejected(f"cannot be mapped: {type(error).__name__}: {error}")


@dataclass
class D365ToCampaign:
    config: D365ToCampaignConfig
    name: str = "d365-to-campaign"

    def source_topics(self) -> list[str]:
        return self.config.source_topics()

    @property
    def schema(self) -> EventSchema:
        return CHANGE_EVENT

    async def plan(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> list[Planned]:
        return _plan_each(batch, lambda topic, event: mapping.writes_for(event, topic, self.config))

    def forget_pending(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


@dataclass
class CampaignToD365:
    config: CampaignToD365Config
    name: str = "campaign-to-d365"

    def source_topics(self) -> list[str]:
        return self.config.source_topics()

    @property
    def schema(self) -> EventSchema:
        return EMAIL_EVENT

    async def plan(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> list[Planned]:
        return _plan_each(
            batch, lambda _topic, event: mapping.email_event_writes(event, self.config)
        )

    def forget_pending(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


@dataclass
class OptInOut:
    """Opt-out flags either way; the last synced value per contact lives in a compacted topic.

    Every worker of the workflow loads the whole state topic: the state of a contact is tiny
    (a flag, a timestamp, a side), and a rebalance then needs no reload.

    A decision is made against the last decision for the contact, even one whose writes are
    still under way (parked until the profile exists, say): a newer change of the other side
    must win over it, not over the older kept state. Those pending decisions are forgotten
    when the runtime drops its unwritten records (stop, start, rebalance), and the kept state
    only ever moves to a newer source time.
    """

    config: OptInOutConfig
    bootstrap_servers: str
    client_options: Mapping[str, Any] = field(default_factory=dict)
    name: str = "opt-in-out"
    _states: dict[str, optout.OptOutState] = field(default_factory=dict)
    _pending: dict[str, optout.OptOutState] = field(default_factory=dict)
    _follower: TopicFollower | None = None
    _producer: AIOKafkaProducer | None = None

    def source_topics(self) -> list[str]:
        return self.config.source_topics()

    @property
    def schema(self) -> EventSchema:
        return CHANGE_EVENT

    async def start(self) -> None:
        def remember(key: str, value: bytes | None) -> None:
            state = optout.state_from_bytes(value)
            if state is None:
                self._states.pop(key, None)
            else:
                self._states[key] = state

        self._follower = _PartitionedFollower(
            self.bootstrap_servers, topics.OPTOUT_STATE, remember, **self.client_options
        )
        await self._follower.start()
        await self._follower.loaded.wait()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            **self.client_options,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
        if self._producer is not None:
            await self._producer.stop()

    def forget_pending(self) -> None:
        self._pending.clear()

    async def plan(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> list[Planned]:
        # Decisions see the pending ones; the kept state changes only once a decision's
        # writes went through, so an abandoned batch changes nothing once forgotten.
        planned = []
        for topic, event in batch:
            key = str(event["key"])
            side = optout.side_of(topic, self.config)
            state = self._pending.get(key, self._states.get(key))
            try:
                decision = optout.decide(event, side, state, self.config)
            except mapping.MappingError as error:
                planned.append(Planned([], commit=error))
                continue
            except Exception as error:  # whatever one record provokes is that record's rejection
                planned.append(Planned([], commit=_unplannable(error)))
                continue
            commit = None
            if decision.state is not None:
                self._pending[key] = decision.state
                commit = self._store(key, decision.state)
            log.debug("event=optout_decision key=%s side=%s reason=%s", key, side, decision.reason)
            planned.append(Planned(decision.writes, commit=commit))
        return planned

    def _store(self, key: str, state: optout.OptOutState) -> Any:
        async def store() -> None:
            assert self._producer is not None
            if self._pending.get(key) is state:
                del self._pending[key]
            kept = self._states.get(key)
            if kept is not None and kept.ts_ms > state.ts_ms:
                return  # a newer decision for the contact was written first
            await self._producer.send_and_wait(
                topics.OPTOUT_STATE, optout.state_to_bytes(state), key=key.encode()
            )
            self._states[key] = state

        return store


class _PartitionedFollower(TopicFollower):
    """A TopicFollower over every partition of a topic."""

    async def start(self) -> None:
        from aiokafka import TopicPartition

        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self.topic)
        if partitions is None:
            await self._consumer.topics()
            partitions = self._consumer.partitions_for_topic(self.topic) or {0}
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        ends = await self._consumer.end_offsets(tps)
        self._task = asyncio.create_task(self._follow_all(ends), name=f"follow:{self.topic}")

    async def _follow_all(self, ends: Mapping[Any, int]) -> None:
        remaining = {tp for tp, end in ends.items() if end > 0}
        if not remaining:
            self.loaded.set()
        while True:
            batch = await self._consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    key = record.key.decode() if record.key else ""
                    if self._on_record is not None:
                        self._on_record(key, record.value)
                    if record.offset + 1 >= ends.get(tp, 0):
                        remaining.discard(tp)
            if not remaining:
                self.loaded.set()


def build(
    name: str,
    config: WorkflowConfig,
    bootstrap_servers: str,
    client_options: Mapping[str, Any] | None = None,
) -> Workflow:
    if isinstance(config, D365ToCampaignConfig):
        return D365ToCampaign(config)
    if isinstance(config, CampaignToD365Config):
        return CampaignToD365(config)
    if isinstance(config, OptInOutConfig):
        return OptInOut(config, bootstrap_servers, dict(client_options or {}))
    raise ValueError(f"no workflow for config {type(config).__name__} ({name})")
