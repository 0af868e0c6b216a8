"""The workflow objects: which topics each reads and how source records become target writes.

Which workflows exist, and how each is built from its config: ``crmsync.streams.catalog``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from crmsync.schemas.codec import CHANGE_EVENT, EventSchema
from crmsync.streams import mapping, optout
from crmsync.streams.config import OptInOutConfig, WorkflowConfig
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.follower import CompactedTopicFollower
from crmsync.targets.errors import Fatal, RecordRejected, SinkError

log = logging.getLogger(__name__)


#: Runs once every write of a record succeeded (storing the opt-out state, say).
AfterWritten = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Planned:
    """What one source record turns into: its writes, or the error that refused it."""

    writes: list[mapping.Write]
    #: Why the record cannot be written: RecordRejected → the DLQ, Fatal → the workflow FAILED.
    error: SinkError | None = None
    after_written: AfterWritten | None = None
    #: Why a record writes what it writes, when the workflow says (an opt-out decision's reason).
    note: str | None = None


class Workflow(Protocol):
    """Maps decoded source records of one workflow to target writes."""

    name: str
    #: Batches written side by side: above one only where no record's plan depends on the
    #: writes of an earlier batch (keys in flight never overlap either way).
    writes_in_flight: int

    def source_topics(self) -> list[str]: ...

    @property
    def schema(self) -> EventSchema: ...

    async def plan(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> list[Planned]:
        """One Planned per (topic, event), in order. Raises nothing for a single record: one
        that cannot be mapped is a `Planned` whose `error` is the RecordRejected (or Fatal: only a
        configuration fault, never something a record's content provokes)."""
        ...

    def forget_pending(self) -> None:
        """Drops what was decided for records not written yet: they will be read again."""
        ...

    def filtered_out(self, topic: str, event: dict[str, Any]) -> bool:
        """Whether the config's filters (or a disabled event type) leave this event out."""
        ...

    async def load_state(self) -> None:
        """Reads what the workflow keeps between records, read-only and without writing
        anything (a dry run plans against it); ``start`` does this and more."""
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
    filtered: Callable[[str, dict[str, Any]], bool] = lambda _topic, _event: False
    #: Batches written side by side (never two on one target record): more than one lets the
    #: next batch go while the target answers the one before.
    writes_in_flight: int = 1

    def source_topics(self) -> list[str]:
        return self.config.source_topics()

    def filtered_out(self, topic: str, event: dict[str, Any]) -> bool:
        return self.filtered(topic, event)

    async def load_state(self) -> None:
        return None

    async def plan(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> list[Planned]:
        planned = []
        for topic, event in batch:
            try:
                planned.append(Planned(self.writes(topic, event)))
            except (mapping.MappingError, Fatal) as error:
                planned.append(Planned([], error=error))
            except Exception as error:  # whatever one record provokes is that record's rejection
                planned.append(Planned([], error=_unplannable(error)))
        return planned

    def forget_pending(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


@dataclass(eq=False)  # one decision: found in its chain by identity
class _Pending:
    """A decision whose writes are not acknowledged yet."""

    decision: optout.OptOutDecision
    done: bool = False


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class OptInOut:
    """Opt-out flags either way; per contact, what each side held and the winning change live
    in a compacted topic.

    Every worker of the workflow loads the whole state topic: the state of a contact is tiny
    (a few flags and timestamps), and a rebalance then needs no reload.

    A decision is made against the last decision for the contact, even one whose writes are
    still under way (parked until the profile exists, say): a newer change of the other side
    must win over it, not over the older kept state. Those pending decisions are forgotten
    when the runtime drops its unwritten records (stop, start, rebalance). A decision stored
    once acknowledged never carries a pending one that may still be forgotten: one without
    writes is applied to the kept state (``optout.observe``), and one with writes, when an
    older one is still pending, waits for it (the chain below).
    """

    config: OptInOutConfig
    kafka: KafkaClients
    name: str = "opt-in-out"
    clock: Callable[[], int] = _now_ms
    #: One: a contact's decision reads what the writes before it left in the state.
    writes_in_flight: int = 1
    _states: dict[str, optout.OptOutState] = field(default_factory=dict)
    _pending: dict[str, list[_Pending]] = field(default_factory=dict)
    _follower: CompactedTopicFollower | None = None
    _producer: AIOKafkaProducer | None = None

    def source_topics(self) -> list[str]:
        return self.config.source_topics()

    @property
    def schema(self) -> EventSchema:
        return CHANGE_EVENT

    async def start(self) -> None:
        self._follower = CompactedTopicFollower(
            self.kafka, topics.OPTOUT_STATE, on_timed_record=self.remember, partitions=None
        )
        await self._follower.start()
        await self._follower.loaded.wait()
        self._producer = self.kafka.producer()
        await self._producer.start()

    async def load_state(self) -> None:
        """The kept state as it is now, read once outside any group (no producer: a dry run's
        decisions are never stored)."""
        follower = CompactedTopicFollower(
            self.kafka, topics.OPTOUT_STATE, on_timed_record=self.remember, partitions=None
        )
        await follower.start()
        try:
            await follower.loaded.wait()
        finally:
            await follower.stop()

    def filtered_out(self, topic: str, event: dict[str, Any]) -> bool:
        return False

    def remember(self, key: str, value: bytes | None, stored_ms: int | None = None) -> None:
        """One record of the state topic; a malformed one is logged and changes nothing."""
        try:
            state = optout.state_from_bytes(
                value, stored_ms if stored_ms and stored_ms > 0 else None
            )
        except optout.MalformedState as error:
            log.warning("event=optout_state_malformed key=%s error=%s", key, error)
            return
        if state is None:
            self._states.pop(key, None)
        else:
            self._states[key] = state

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
            chain = self._pending.get(key)
            state = chain[-1].decision.state if chain else self._states.get(key)
            try:
                decision = optout.decide(event, side, state, self.config)
            except mapping.MappingError as error:
                planned.append(Planned([], error=error))
                continue
            except Exception as error:  # whatever one record provokes is that record's rejection
                planned.append(Planned([], error=_unplannable(error)))
                continue
            store = None
            if decision.state is not None:
                pending = _Pending(decision)
                self._pending.setdefault(key, []).append(pending)
                store = self._store(key, pending)
            log.debug("event=optout_decision key=%s side=%s reason=%s", key, side, decision.reason)
            planned.append(Planned(decision.writes, after_written=store, note=decision.reason))
        return planned

    def _store(self, key: str, pending: _Pending) -> AfterWritten:
        async def store() -> None:
            assert self._producer is not None
            chain = self._pending.get(key, [])
            if pending not in chain:
                return  # forgotten: its record is read again
            pending.done = True
            state = self._settled(key, chain, pending)
            while chain and chain[0].done:
                chain.pop(0)
            if not chain:
                self._pending.pop(key, None)
            if state is None:
                return
            await self._producer.send_and_wait(
                topics.OPTOUT_STATE, optout.state_to_bytes(state), key=key.encode()
            )
            self._states[key] = state

        return store

    def _settled(
        self, key: str, chain: list[_Pending], pending: _Pending
    ) -> optout.OptOutState | None:
        """What to keep once ``pending`` is acknowledged (None: nothing new to store)."""
        decision = pending.decision
        if decision.observed is not None:
            kept = self._states.get(key)
            return None if kept is None else optout.observe(kept, *decision.observed)
        later = chain[chain.index(pending) + 1 :]
        if any(p.done and p.decision.observed is None for p in later):
            return None  # a newer decision with writes, made on top of this one, is stored
        assert decision.state is not None
        state = decision.state.acknowledged(self.clock())
        for p in later:  # learnt meanwhile, stored already on the older kept state
            if p.done and p.decision.observed is not None:
                state = optout.observe(state, *p.decision.observed)
        return state
