"""What a workflow did with a source record it acknowledged, derived again from the record.

A worker's outcome record names the offset ranges it acknowledged and the config version it ran
under, and tells only what cannot be derived (`crmsync.streams.outcomes`). For any other record
in a range, the trace decodes the source record and plans it with that config version's own
workflow — the pure code the worker ran between decoding and writing — so it shows the same
writes (or why there were none) without the worker building them twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from crmsync.control import models
from crmsync.schemas.codec import CHANGE_EVENT, EventSchema
from crmsync.schemas.registry import RegistryCodec, SchemaRegistry
from crmsync.streams import catalog, mapping, outcomes, workflows
from crmsync.streams.config import ConfigError
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.targets.errors import Fatal

#: Field names kept per event: a trace shows what changed, not a whole row.
MAX_FIELDS = outcomes.MAX_FIELDS
#: The record's key is looked up; ids longer than this are not ids.
MAX_KEY = outcomes.MAX_KEY

DELETE_NOT_PROPAGATED = "a delete, and the config does not propagate deletes"
FILTERED = "filtered out by the config"
NOTHING_MAPPED = "it carries no field the config maps"


@dataclass(frozen=True)
class EventView:
    """What a trace shows of one change event: its key, op, source time, the fields it
    changed (it had a before-image) or carried, and another id it is found by."""

    key: str
    op: str | None = None
    ts_ms: int | None = None
    fields: tuple[str, ...] = ()
    changed: bool = False
    also: str = ""


def event_view(key: bytes | None, event: Mapping[str, Any] | None) -> EventView:
    """The trace's view of a decoded event (`event` None: undecodable or a tombstone)."""
    name = (key or b"").decode("utf-8", "replace")[:MAX_KEY]
    if event is None:
        return EventView(name)
    if "event_id" in event:  # a Campaign email event: no before/after, its own fields
        ts = event.get("ts_ms")
        return EventView(
            str(event["event_id"])[:MAX_KEY],
            event.get("type"),
            ts if isinstance(ts, int) else None,
            tuple(f for f, v in event.items() if v is not None)[:MAX_FIELDS],
            False,
            str(event.get("contact_id") or "")[:MAX_KEY],
        )
    after = event.get("after") or {}
    before = event.get("before")
    if before:
        changed = [f for f, value in after.items() if before.get(f, value) != value]
        fields = tuple(changed + [f for f in before if f not in after])
    else:
        fields = tuple(after)
    source = event.get("source") or {}
    ts = source.get("ts_ms")
    return EventView(
        str(event.get("key") or name)[:MAX_KEY],
        event.get("op"),
        ts if isinstance(ts, int) else None,
        fields[:MAX_FIELDS],
        bool(before),
    )


def trace_write(write: mapping.Write) -> models.TraceWrite:
    record = write.record
    return models.TraceWrite(
        system=write.system,
        target=record.target,
        op=outcomes.write_op(write),
        key=str(record.key)[:MAX_KEY],
        fields=[*record.fields, *record.create_fields][:MAX_FIELDS],
    )


@dataclass(frozen=True)
class Derived:
    """One workflow's outcome of one record, as derived."""

    result: str
    reason: str | None = None
    writes: list[models.TraceWrite] = field(default_factory=list)


#: What a record whose outcome cannot be derived shows (its config version is no longer kept,
#: say): acknowledged by the workflow, nothing more is known.
HANDLED = "handled"

Decode = Callable[[bytes], Awaitable[dict[str, Any]]]


class Planner:
    """Every workflow's configs by version, and the schemas of the topics they read."""

    def __init__(self, kafka: KafkaClients, registry_url: str | None = None) -> None:
        self._kafka = kafka
        self._registry_url = registry_url
        self._configs: dict[tuple[str, int], dict[str, Any]] = {}
        self._flows: dict[tuple[str, int], workflows.Workflow | None] = {}
        self._schemas: dict[str, EventSchema] = {}
        self._codecs: dict[str, RegistryCodec] = {}
        for name in catalog.NAMES:
            self._learn_topics(
                self._build(name, catalog.default_config(name).model_dump(mode="json"))
            )

    def remember(self, workflow: str, version: int, config: dict[str, Any]) -> bool:
        """A config version as the control record names it; True when it is new or changed."""
        if self._configs.get((workflow, version)) == config:
            return False
        self._configs[(workflow, version)] = config
        self._flows.pop((workflow, version), None)
        self._learn_topics(self.flow(workflow, version))
        return True

    def configs(self) -> list[tuple[str, int, dict[str, Any]]]:
        return [(w, v, c) for (w, v), c in self._configs.items()]

    def ids_inside(self, topic: str) -> bool:
        """Whether a record of `topic` is also found by ids inside its event (an email
        event's id and contact), not only by its key."""
        return self._schemas.get(topic, CHANGE_EVENT) is not CHANGE_EVENT

    def source_topics(self) -> set[str]:
        """Every topic a known config version reads."""
        return set(self._schemas)

    def _learn_topics(self, flow: workflows.Workflow | None) -> None:
        if flow is not None:
            for topic in flow.source_topics():
                self._schemas.setdefault(topic, flow.schema)

    def _build(self, workflow: str, raw: Mapping[str, Any]) -> workflows.Workflow | None:
        try:
            spec = catalog.spec(workflow)
            return spec.build(spec.parse_config(raw), self._kafka)
        except (ConfigError, catalog.UnknownWorkflow):
            return None

    def flow(self, workflow: str, version: int) -> workflows.Workflow | None:
        """The workflow object of that config version (None: not known, or not valid)."""
        key = (workflow, version)
        if key not in self._flows:
            raw = self._configs.get(key)
            self._flows[key] = None if raw is None else self._build(workflow, raw)
        return self._flows[key]

    async def decode(self, topic: str, value: bytes) -> dict[str, Any]:
        """The record as the workflows reading `topic` decode it (raises on bytes that are
        not an event)."""
        schema = self._schemas.get(topic, CHANGE_EVENT)
        if not self._registry_url:
            return schema.decode(value)
        codec = self._codecs.get(schema.name)
        if codec is None:
            codec = self._codecs[schema.name] = RegistryCodec(
                schema, SchemaRegistry(self._registry_url)
            )
        return await codec.decode(value)

    async def aclose(self) -> None:
        for codec in self._codecs.values():
            await codec.registry.aclose()

    async def derive(
        self,
        workflow: str,
        version: int,
        topic: str,
        value: bytes | None,
        event: dict[str, Any] | None,
    ) -> Derived:
        """What `workflow` at config `version` did with a record it acknowledged without
        telling more: written (its writes), or skipped and why. `event` is the decoded
        `value` (None: it cannot be decoded here)."""
        if value is None:
            return Derived("skipped", outcomes.TOMBSTONE)
        flow = self.flow(workflow, version)
        if flow is None:
            return Derived(HANDLED, f"config version {version} is no longer known")
        if not isinstance(flow, workflows.StatelessWorkflow):
            # A workflow that keeps state tells every decision in its outcome records.
            return Derived(HANDLED, "its decision was not recorded")
        if event is None:
            return Derived(HANDLED, "it cannot be decoded here")
        (plan,) = await flow.plan([(topic, event)])
        if plan.error is not None:
            kind = "the workflow would fail" if isinstance(plan.error, Fatal) else "refused"
            return Derived(HANDLED, f"planned again, {kind}: {plan.error.reason}")
        if plan.writes:
            return Derived("written", plan.note, [trace_write(w) for w in plan.writes])
        if plan.note:
            return Derived("skipped", plan.note)
        if event.get("op") == "d":
            return Derived("skipped", DELETE_NOT_PROPAGATED)
        if flow.filtered_out(topic, event):
            return Derived("skipped", FILTERED)
        return Derived("skipped", NOTHING_MAPPED)
