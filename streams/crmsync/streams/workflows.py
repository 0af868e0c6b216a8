"""The workflow objects: which topics each reads and how source records become target writes.

Which workflows exist, and how each is built from its config: ``crmsync.streams.catalog``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from crmsync.schemas.codec import CHANGE_EVENT, EventSchema
from crmsync.streams import mapping, optout
from crmsync.streams.config import OptInOutConfig, WorkflowConfig
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.follower import CompactedTopicFollower
from crmsync.targets.errors import Fatal, RecordRejected

log = logging.getLogger(__name__)


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


def _unplannable(error: Exception) -> RecordRejected:
    log.warning("event=record_unplannable error=%r", error)
    return RecordRejected(f"cannot be mapped: {type(error).__name__}: {error}")


@dataclass
class StatelessWorkflow:
    """A workflow whose every record maps on its own, keeping nothing between records
    (d365-to-campaign, campaign-to-d365): ``writes`` turns one (topic, event) into its writes."""

    name: str
    config: WorkflowConfig
    schema: EventSchema
    writes: Callable[[str, dict[str, Any]], list[mapping.Write]]

    def source_topics(self) -> list[str]:
        return self.config.source_topics()

    async def plan(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> list[Planned]:
        planned = []
        for topic, event in batch:
            try:
                planned.append(Planned(self.writes(topic, event)))
            except (mapping.MappingError, Fatal) as error:
                planned.append(Planned([], commit=error))
            except Exception as error:  # whatever one record provokes is that record's rejection
                planned.append(Planned([], commit=_unplannable(error)))
        return planned

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
    kafka: KafkaClients
    name: str = "opt-in-out"
    _states: dict[str, optout.OptOutState] = field(default_factory=dict)
    _pending: dict[str, optout.OptOutState] = field(default_factory=dict)
    _follower: CompactedTopicFollower | None = None
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

        self._follower = CompactedTopicFollower(
            self.kafka, topics.OPTOUT_STATE, remember, partitions=None
        )
        await self._follower.start()
        await self._follower.loaded.wait()
        self._producer = self.kafka.producer()
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
