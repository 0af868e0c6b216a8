"""A dry run: what two configs of one workflow would write for the same source records.

It builds each config's workflow with the registry's own builder and plans the records with the
workflow's own ``plan``, the code a worker runs between decoding and writing; it stops there, so
nothing reaches a target, Kafka or the kept state. Opt-in-out decides against the opt-out state
kept now, read once outside any group (``Workflow.load_state``): for records already synced,
that shows what reading them again would do (usually nothing: their change was seen).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from crmsync.schemas.codec import EventSchema
from crmsync.schemas.registry import RegistryCodec, SchemaRegistry
from crmsync.streams import catalog, mapping, workflows
from crmsync.streams.config import WorkflowConfig
from crmsync.streams.delivery import SourceRecord
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.targets.campaign import ProfileLink
from crmsync.targets.errors import Fatal

#: Records one dry run may take (and how many it takes when not told).
MAX_RECORDS, DEFAULT_RECORDS = 500, 20

Outcome = Literal["writes", "filtered", "nothing", "dead_letter", "fails", "not_read"]

#: What a dry run of opt-in-out says of itself: its decisions depend on kept state.
STATEFUL_NOTE = (
    "opt-in-out decides each record against the opt-out state it keeps per contact "
    "(crmsync.opt-in-out.state): both configs were planned against that state as it is now, "
    "read without changing it, so a record already synced usually shows no write"
)


@dataclass(frozen=True)
class PlannedWrite:
    """One write a config would send (JSON-ready)."""

    system: str
    target: str
    operation: str  # upsert, create, update or delete
    key: str
    key_field: str | None
    fields: dict[str, Any]
    create_fields: dict[str, Any]


@dataclass(frozen=True)
class Side:
    """What one config does with one record."""

    outcome: Outcome
    writes: list[PlannedWrite] = field(default_factory=list)
    reason: str | None = None


@dataclass(frozen=True)
class Row:
    """One source record, and what the active and the pending config would do with it."""

    topic: str
    partition: int
    offset: int
    key: str | None
    timestamp_ms: int
    event: dict[str, Any] | None
    active: Side
    pending: Side

    @property
    def differences(self) -> list[str]:
        """What differs between the sides: ``outcome``, ``writes`` (their number), or for a
        write both have, ``system``/``target``/``operation``/``key`` or the field's name."""
        return differences(self.active, self.pending)

    @property
    def filter_change(self) -> Literal["dropped", "kept"] | None:
        """``dropped``: the pending config's filters leave out what the active one writes;
        ``kept``: the other way round."""
        was, now = self.active.outcome == "filtered", self.pending.outcome == "filtered"
        if was == now:
            return None
        return "dropped" if now else "kept"


def differences(active: Side, pending: Side) -> list[str]:
    found: list[str] = []
    if active.outcome != pending.outcome:
        found.append("outcome")
    if len(active.writes) != len(pending.writes):
        found.append("writes")
    for was, now in zip(active.writes, pending.writes, strict=False):
        for part in ("system", "target", "operation", "key"):
            if getattr(was, part) != getattr(now, part) and part not in found:
                found.append(part)
        before, after = {**was.create_fields, **was.fields}, {**now.create_fields, **now.fields}
        for name in [*before, *(n for n in after if n not in before)]:
            if (name not in before or name not in after or before[name] != after[name]) and (
                name not in found
            ):
                found.append(name)
    return found


Decode = Callable[[bytes], Awaitable[dict[str, Any]]]


async def dry_run(
    name: str,
    active: WorkflowConfig,
    pending: WorkflowConfig,
    records: Sequence[SourceRecord],
    kafka: KafkaClients,
    *,
    timestamps: Sequence[int] | None = None,
    registry_url: str | None = None,
) -> list[Row]:
    """One Row per record, in the order given (give them oldest first: the order a worker
    plans them in, which opt-in-out's decisions depend on)."""
    spec = catalog.spec(name)
    flows = spec.build(active, kafka), spec.build(pending, kafka)
    await asyncio.gather(*(flow.load_state() for flow in flows))
    decode, close = _codec(flows[0].schema, registry_url)
    try:
        events: list[dict[str, Any] | None] = []
        undecodable: dict[int, str] = {}
        for index, record in enumerate(records):
            if record.value is None:
                events.append(None)
                continue
            try:
                events.append(await decode(record.value))
            except Exception as error:  # as the worker: bytes that trip the decoder → DLQ
                events.append(None)
                undecodable[index] = f"undecodable: {type(error).__name__}: {error}"
    finally:
        await close()
    sides = [await _plan(flow, records, events, undecodable) for flow in flows]
    stamps = list(timestamps) if timestamps is not None else [-1] * len(records)
    return [
        Row(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=None if record.key is None else record.key.decode(errors="replace"),
            timestamp_ms=stamp,
            event=event,
            active=was,
            pending=now,
        )
        for record, event, stamp, was, now in zip(
            records, events, stamps, sides[0], sides[1], strict=True
        )
    ]


def _codec(schema: EventSchema, registry_url: str | None) -> tuple[Decode, Callable[[], Any]]:
    """The worker's codec: the packaged schemas, and the registry when one is configured."""
    if registry_url:
        codec = RegistryCodec(schema, SchemaRegistry(registry_url))
        return codec.decode, codec.registry.aclose

    async def decode(data: bytes) -> dict[str, Any]:
        return schema.decode(data)

    async def close() -> None:
        return None

    return decode, close


async def _plan(
    flow: workflows.Workflow,
    records: Sequence[SourceRecord],
    events: list[dict[str, Any] | None],
    undecodable: dict[int, str],
) -> list[Side]:
    read = set(flow.source_topics())
    sides: list[Side | None] = [None] * len(records)
    batch: list[tuple[int, str, dict[str, Any]]] = []
    for index, (record, event) in enumerate(zip(records, events, strict=True)):
        if record.topic not in read:
            sides[index] = Side("not_read", reason=f"this config does not read {record.topic}")
        elif index in undecodable:
            sides[index] = Side("dead_letter", reason=undecodable[index])
        elif event is None:
            sides[index] = Side("nothing", reason="a tombstone: nothing to write")
        else:
            batch.append((index, record.topic, event))
    planned = await flow.plan([(topic, event) for _, topic, event in batch])
    flow.forget_pending()
    for (index, topic, event), plan in zip(batch, planned, strict=True):
        sides[index] = _side(flow, topic, event, plan)
    return [side for side in sides if side is not None]


def _side(
    flow: workflows.Workflow, topic: str, event: dict[str, Any], plan: workflows.Planned
) -> Side:
    if isinstance(plan.error, Fatal):
        return Side("fails", reason=f"the workflow would turn FAILED: {plan.error.reason}")
    if plan.error is not None:
        return Side("dead_letter", reason=plan.error.reason)
    writes = [_write(w) for w in plan.writes]
    if flow.filtered_out(topic, event):
        return Side("filtered", writes, _LEFT_OUT.get(flow.name, _LEFT_OUT[""]))
    if writes:
        return Side("writes", writes, plan.note)
    return Side("nothing", reason=plan.note or "nothing this config maps is in the event")


_LEFT_OUT = {
    "campaign-to-d365": "left out: this config does not sync events of its type",
    "": "left out by this config's filters",
}


def _write(write: mapping.Write) -> PlannedWrite:
    record = write.record
    return PlannedWrite(
        system=write.system,
        target=record.target,
        operation="delete" if record.op == "delete" else record.mode,
        key=record.key,
        key_field=record.key_field,
        fields={k: _plain(v) for k, v in record.fields.items()} if record.op != "delete" else {},
        create_fields={k: _plain(v) for k, v in record.create_fields.items()},
    )


def _plain(value: Any) -> Any:
    """A field value as JSON: a link to a profile names the profile's externalId."""
    if isinstance(value, ProfileLink):
        return {"profile": value.external_id}
    return value
