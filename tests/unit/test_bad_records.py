"""One crafted record is that record's rejection (dead-lettered with the reason), never a FAILED
workflow: each case here once escaped as an exception that stopped the workflow."""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any

import httpx
import pytest

from crmsync.schemas.codec import CHANGE_EVENT, DecodeError
from crmsync.schemas.registry import RegistryCodec, SchemaRegistry
from crmsync.streams import mapping, optout
from crmsync.streams.catalog import default_config, parse_config, spec
from crmsync.streams.config import ConfigError
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.events import change_event
from crmsync.streams.sinks.base import SinkRecord
from crmsync.streams.sinks.dynamics import DynamicsSink
from crmsync.streams.workflows import Planned, Workflow
from crmsync.targets.dynamics import key_segment
from crmsync.targets.errors import RecordRejected
from tests.unit.test_mapping import c2d, email_event
from tests.unit.test_optout import config as optout_config
from tests.unit.test_optout import flip
from tests.unit.test_sink_batching import ScriptedDynamics, contact, ok

GUID = str(uuid.UUID(int=42))


def _built(name: str, config: Any) -> Workflow:
    return spec(name).build(config, KafkaClients("127.0.0.1:9"))


def _rejected(planned: list[Planned]) -> str:
    (plan,) = planned
    assert plan.writes == []
    assert isinstance(plan.error, RecordRejected), plan.error
    return plan.error.reason


@pytest.mark.parametrize("ts_ms", [2**62, -(2**62), 253_402_300_800_000])
async def test_an_email_event_with_an_impossible_time_is_rejected_not_fatal(ts_ms: int) -> None:
    workflow = _built("campaign-to-d365", c2d())
    planned = await workflow.plan([(topics.EMAIL_EVENTS, email_event("open", ts_ms=ts_ms))])
    assert "ts_ms" in _rejected(planned)


async def test_an_email_event_at_the_edges_of_the_range_still_maps() -> None:
    workflow = _built("campaign-to-d365", c2d())
    (plan,) = await workflow.plan([(topics.EMAIL_EVENTS, email_event("open", ts_ms=0))])
    assert plan.writes[0].record.fields["crmsync_eventtime"] == "1970-01-01T00:00:00.000Z"


async def test_any_exception_planning_one_record_rejects_only_that_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mapping bug that only one odd record reaches is that record's rejection, not a stop."""
    real = mapping.compile_writes

    def compile_writes(config: Any) -> Any:
        compiled = real(config)

        def writes(topic: str, event: dict[str, Any]) -> list[mapping.Write]:
            if event["key"] == "odd":
                raise ZeroDivisionError("division by zero")
            return compiled(topic, event)

        return writes

    monkeypatch.setattr(mapping, "compile_writes", compile_writes)
    workflow = _built("d365-to-campaign", default_config("d365-to-campaign"))
    odd = change_event("u", "contact", "odd", after={"firstname": "A"}, system="d365")
    good = change_event("u", "contact", GUID, after={"firstname": "B"}, system="d365")
    planned = await workflow.plan([(topics.CONTACT_CHANGES, odd), (topics.CONTACT_CHANGES, good)])
    assert isinstance(planned[0].error, RecordRejected)
    assert "ZeroDivisionError" in planned[0].error.reason
    assert planned[1].error is None and len(planned[1].writes) == 1


# -- a registry-framed record whose writer schema is not a usable record schema --------------


def _registry(schema_text: str) -> SchemaRegistry:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"schema": schema_text})

    return SchemaRegistry("http://registry", transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(
    "schema_text",
    [
        '"string"',  # primitive: valid Avro, not a record
        '{"type": "array", "items": "long"}',
        "{not json",
        '{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}',
        "null",
    ],
    ids=["primitive", "array", "unparseable", "unknown-type", "null"],
)
async def test_a_registry_schema_that_is_not_a_record_makes_the_record_undecodable(
    schema_text: str,
) -> None:
    registry = _registry(schema_text)
    codec = RegistryCodec(CHANGE_EVENT, registry)
    framed = struct.pack(">bI", 0, 77) + b"\x06abc"
    with pytest.raises(DecodeError):
        await codec.decode(framed)
    await registry.aclose()


# -- a GUID followed by a newline --------------------------------------------------------------


def test_a_guid_followed_by_a_newline_is_not_a_guid() -> None:
    event = flip("campaign", True, 100)
    event["key"] = GUID + "\n"
    with pytest.raises(mapping.MappingError, match="not a Dynamics contactid"):
        optout.decide(event, "campaign", None, optout_config())
    with pytest.raises(mapping.MappingError, match="not a GUID"):
        mapping.email_event_writes(email_event("open", contact_id=GUID + "\n"), c2d())
    with pytest.raises(RecordRejected, match="not a GUID"):
        key_segment(GUID + "\n")


async def test_a_campaign_opt_out_keyed_guid_newline_is_rejected_alone() -> None:
    workflow = _built("opt-in-out", default_config("opt-in-out"))
    event = flip("campaign", True, 100)
    event["key"] = GUID + "\n"
    planned = await workflow.plan([(topics.PROFILE_CHANGES, event)])
    assert "not a Dynamics contactid" in _rejected(planned)


async def test_a_dynamics_batch_with_a_guid_newline_key_rejects_that_record_only() -> None:
    client = ScriptedDynamics(ok)
    sink = DynamicsSink(client)
    outcomes = await sink.write_batch([SinkRecord("contacts", GUID + "\n"), contact(1)])
    await sink.aclose()
    assert isinstance(outcomes[0], RecordRejected) and outcomes[1] is None
    assert all("\n" not in request.url for request in client.batches[0])  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"mappings": [{"source": "firstname\n", "target": "firstName"}]}, "mappings"),
        ({"contact_topic": "d365.contact.changes\n"}, "contact_topic"),
        ({"profile_resource": "profile\n"}, "profile_resource"),
    ],
)
def test_config_names_with_a_trailing_newline_are_refused(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config("d365-to-campaign", data)
    assert where in json.dumps(refused.value.errors)


@pytest.mark.parametrize("ts_ms", [2**62, -1])
def test_an_opt_out_change_with_an_impossible_time_is_rejected(ts_ms: int) -> None:
    """Kept, a time past 9999 would win against every later change of the contact."""
    with pytest.raises(mapping.MappingError, match="not epoch milliseconds"):
        optout.decide(flip("d365", True, ts_ms), "d365", None, optout_config())


@pytest.mark.parametrize(
    "topic",
    [
        topics.CONTROL,
        topics.AUDIT,
        topics.OPTOUT_STATE,
        topics.STATUS,
        topics.dead_letters("opt-in-out"),
        "crmsync.anything",
        "CRMSYNC.control",
        "__consumer_offsets",
        "d365.contact\x07changes",
    ],
)
def test_a_config_cannot_aim_a_workflow_or_the_source_at_internal_topics(topic: str) -> None:
    """The source would publish into them, workers consume and dead-letter them."""
    entity = {"logical_name": "new_purchase", "resource": "cusPurchase", "key_field": "id"}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("d365-to-campaign", {"contact_topic": topic}),
        ("d365-to-campaign", {"custom_entities": [{**entity, "topic": topic}]}),
        ("campaign-to-d365", {"email_topic": topic}),
        ("opt-in-out", {"profile_topic": topic}),
    ]
    for workflow, data in cases:
        with pytest.raises(ConfigError) as refused:
            parse_config(workflow, data)
        assert "topic" in json.dumps(refused.value.errors), refused.value.errors
