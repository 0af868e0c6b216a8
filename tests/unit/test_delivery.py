"""The at-least-once rules without Kafka: order, acks from the head, parking, stop and abandon."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from crmsync.streams.consumer import Fetched
from crmsync.streams.delivery import Delivery, Item, Pending
from crmsync.streams.mapping import Write
from crmsync.streams.runtime import merge
from crmsync.streams.sinks.base import Outcome, SinkRecord
from crmsync.streams.workflows import Planned
from crmsync.targets.errors import Fatal, Halted, ParentMissing, RecordRejected, Retryable


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    value: bytes | None = b"x"


@dataclass
class _Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Sink:
    """Answers each key from a script (default: written) and records what was written."""

    answers: dict[str, list[Outcome]] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    delay: float = 0.0

    async def write_batch(self, records: Sequence[SinkRecord]) -> list[Outcome]:
        if self.delay:
            await asyncio.sleep(self.delay)
        outcomes: list[Outcome] = []
        for record in records:
            script = self.answers.get(record.key, [])
            outcome = script.pop(0) if script else None
            if outcome is None:
                self.written.append(record.key)
            outcomes.append(outcome)
        return outcomes

    async def aclose(self) -> None:
        return None


def _delivery(sink: _Sink, clock: _Clock | None = None) -> Delivery:
    return Delivery(
        {"campaign": sink}, asyncio.Event(), parent_wait_s=60.0, clock=clock or _Clock()
    )


def _planned(delivery: Delivery, *keys: tuple[int, int, str]) -> list[Pending]:
    """Queues records (partition, offset, key) with one write each; returns their writes."""
    records = [_Record("t", partition, offset) for partition, offset, _ in keys]
    items = delivery.enqueue(records)
    pending: list[Pending] = []
    for item, (_, _, key) in zip(items, keys, strict=True):
        write = Write("campaign", SinkRecord("profile", key))
        item.planned = Planned([write])
        item.remaining = 1
        pending.append((item, write))
    return pending


def _acked(delivery: Delivery) -> dict[int, list[int]]:
    return {p: [i.record.offset for i in done] for _, p, done in delivery.acked()}


async def test_written_records_are_acked_from_the_head_in_offset_order() -> None:
    sink = _Sink(answers={"b": [Retryable("busy", retry_after=0.01)]})
    delivery = _delivery(sink)
    pending = _planned(delivery, (0, 10, "a"), (0, 11, "b"), (0, 12, "c"), (1, 5, "d"))
    assert await delivery.write(pending) is None
    assert _acked(delivery) == {0: [10, 11, 12], 1: [5]}
    assert sink.written == ["a", "c", "d", "b"]  # b retried; its offset still acked in order


async def test_a_record_not_written_holds_back_only_its_own_partition() -> None:
    delivery = _delivery(_Sink())
    pending = _planned(delivery, (0, 1, "a"), (0, 2, "b"), (1, 7, "c"))
    first, *rest = pending
    await delivery.write(rest)  # offset 1 of partition 0 is not written yet
    assert _acked(delivery) == {1: [7]}
    await delivery.write([first])
    assert _acked(delivery) == {0: [1, 2]}


async def test_a_missing_parent_parks_the_key_and_later_writes_of_it_wait_behind() -> None:
    clock = _Clock()
    sink = _Sink(answers={"child": [ParentMissing("no profile yet")]})
    delivery = _delivery(sink, clock)
    pending = _planned(delivery, (0, 1, "child"), (0, 2, "other"))
    await delivery.write(pending)
    assert delivery.parked == 1 and sink.written == ["other"]
    assert _acked(delivery) == {}  # the parked head holds its partition's commit
    later = _planned(delivery, (0, 3, "child"))
    await delivery.write(later)  # same key: parked behind, never written before it
    assert sink.written == ["other"] and delivery.due() == []
    clock.now += 1.0
    due = delivery.due()
    assert [w.record.key for _, w in due] == ["child", "child"]
    await delivery.write(due)
    assert sink.written == ["other", "child", "child"]
    assert _acked(delivery) == {0: [1, 2, 3]}


async def test_a_parent_that_never_comes_sends_the_record_to_the_dlq_after_the_wait() -> None:
    clock = _Clock()
    sink = _Sink(answers={"child": [ParentMissing("none")] * 3})
    delivery = _delivery(sink, clock)
    await delivery.write(_planned(delivery, (0, 1, "child")))
    clock.now += 61.0
    await delivery.write(delivery.due())
    ((_, _, (item,)),) = delivery.acked()
    assert isinstance(item.error, RecordRejected) and "parent never arrived" in item.error.reason


async def test_a_refused_record_is_acked_with_its_error_and_a_fatal_answer_is_returned() -> None:
    sink = _Sink(answers={"bad": [RecordRejected("invalid email")], "x": [Fatal("403")]})
    delivery = _delivery(sink)
    await delivery.write(_planned(delivery, (0, 1, "bad")))
    ((_, _, (item,)),) = delivery.acked()
    assert isinstance(item.error, RecordRejected)
    assert await delivery.write(_planned(delivery, (0, 2, "x"))) == "campaign: 403"
    assert _acked(delivery) == {}


async def test_a_stop_gives_the_write_in_flight_a_grace_then_abandons_it_unacked() -> None:
    sink = _Sink(delay=5.0)
    delivery = _delivery(sink)
    delivery.grace_s = 0.05
    pending = _planned(delivery, (0, 1, "a"))
    writing = asyncio.create_task(delivery.write(pending))
    await asyncio.sleep(0.01)
    delivery.stopping.set()
    assert await asyncio.wait_for(writing, 1.0) is None
    assert sink.written == [] and _acked(delivery) == {}


async def test_a_write_ending_within_the_grace_is_kept_and_no_retry_starts_after_a_stop() -> None:
    sink = _Sink(answers={"b": [Retryable("busy")]}, delay=0.05)
    delivery = _delivery(sink)
    writing = asyncio.create_task(delivery.write(_planned(delivery, (0, 1, "a"), (0, 2, "b"))))
    await asyncio.sleep(0.01)
    delivery.stopping.set()
    await asyncio.wait_for(writing, 1.0)
    assert sink.written == ["a"]  # the request under way ended; b's retry never started
    assert _acked(delivery) == {0: [1]}


@dataclass
class _HoldableSink:
    """Sends each record as its own request, `concurrency` at a time, each answered after
    `latency`; once held, a record not sent yet comes back Halted."""

    concurrency: int = 2
    latency: float = 0.05
    written: list[str] = field(default_factory=list)
    held: bool = False
    holds: int = 0

    async def write_batch(self, records: Sequence[SinkRecord]) -> list[Outcome]:
        slots = asyncio.Semaphore(self.concurrency)

        async def send(record: SinkRecord) -> Outcome:
            async with slots:
                if self.held:
                    return Halted("not sent: the workflow is stopping")
                await asyncio.sleep(self.latency)
                self.written.append(record.key)
                return None

        return list(await asyncio.gather(*(send(r) for r in records)))

    def hold(self) -> None:
        self.held = True
        self.holds += 1

    def release(self) -> None:
        self.held = False

    async def aclose(self) -> None:
        return None


async def test_a_stop_mid_batch_keeps_what_the_requests_in_flight_wrote_and_sends_no_more() -> None:
    sink = _HoldableSink(concurrency=2, latency=0.05)
    delivery = Delivery({"campaign": sink}, asyncio.Event(), clock=_Clock())
    delivery.grace_s = 5.0  # the held write ends long before: only the sent requests are waited
    pending = _planned(delivery, *((0, n, f"k{n}") for n in range(10)))
    writing = asyncio.create_task(delivery.write(pending))
    await asyncio.sleep(0.07)  # k0, k1 answered; k2, k3 sent
    delivery.stopping.set()
    assert await asyncio.wait_for(writing, 1.0) is None
    assert sink.written == ["k0", "k1", "k2", "k3"] and sink.holds == 1
    assert _acked(delivery) == {0: [0, 1, 2, 3]}  # what was written is acked: an exact backlog
    assert not sink.held  # released: the next start writes again


async def test_forget_drops_queued_and_parked_records() -> None:
    delivery = _delivery(_Sink(answers={"a": [ParentMissing("x")]}))
    await delivery.write(_planned(delivery, (0, 1, "a"), (0, 2, "b")))
    delivery.forget()
    assert delivery.parked == 0 and delivery.acked() == [] and delivery.due() == []


def test_batches_of_one_fetch_epoch_merge_up_to_the_batch_size_in_fetch_order() -> None:
    def fetched(epoch: int, *offsets: int) -> Fetched:
        records = {("t", 0): [_Record("t", 0, o) for o in offsets]}
        return Fetched(epoch, records, len(offsets))  # type: ignore[arg-type]

    groups = merge([fetched(1, 1, 2), fetched(1, 3), fetched(1, 4, 5), fetched(2, 6)], 3)
    assert [(e, [r.offset for r in rs]) for e, rs in groups] == [
        (1, [1, 2, 3]),
        (1, [4, 5]),
        (2, [6]),
    ]


def test_an_item_is_done_once_every_write_is_confirmed() -> None:
    item = Item(_Record("t", 0, 1), remaining=2)
    assert not item.done
    item.remaining = 0
    assert item.done
