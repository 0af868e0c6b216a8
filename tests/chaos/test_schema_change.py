"""Scenario 7: producers change schema while the workers run.

- Single-object framing (the default): a worker decodes only the ChangeEvent versions packaged
  with it, so a v2 writer (a compatible change: a field added with a default) it does not know
  is dead-lettered as "unknown writer schema fingerprint", byte for byte. Nothing is lost: the
  DLQ holds every v2 record, and a reader that knows v2 decodes them all.
- Confluent framing with a schema registry (CRMSYNC_SCHEMA_REGISTRY_URL): the worker fetches the
  writer schema by id and resolves it into its own, so the compatible v2 is written with no
  interruption; an incompatible writer (here a key that became a long) is dead-lettered with the
  resolution error. A real registry would refuse to register that schema under the default
  BACKWARD compatibility; the stub here accepts anything, to show what a worker does with it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from crmsync.schemas.codec import CHANGE_EVENT, EventSchema
from crmsync.schemas.registry import RegistryCodec, SchemaRegistry
from crmsync.streams.kafka import topics
from tests.chaos.conftest import pick, record
from tests.chaos.ledger import Outcome, Stopwatch
from tests.chaos.traffic import D2C, ContactTraffic, Record, publish
from tests.chaos.workers import wait_drained, wait_worker
from tests.conftest import free_port
from tests.integration.harness import Cluster, wait_for
from tests.integration.workflow_helpers import dead_letters, status_of

pytestmark = pytest.mark.timeout(pick(180, 900, 400))

V1 = json.loads(CHANGE_EVENT.latest.source)
V2 = {
    **V1,
    "fields": [
        *V1["fields"],
        {"name": "origin_app", "type": ["null", "string"], "default": None},
    ],
}
V3_INCOMPATIBLE = {
    **V1,
    "fields": [{**f, "type": "long"} if f["name"] == "key" else f for f in V1["fields"]],
}
WITH_V2 = EventSchema.from_versions("ChangeEvent", [V1, V2])
ONLY_V3 = EventSchema.from_versions("ChangeEvent", [V3_INCOMPATIBLE])


def _v2(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "origin_app": "crm-mobile"}


async def test_compatible_v2_unknown_to_the_workers_is_dead_lettered_not_lost(
    cluster: Cluster,
) -> None:
    clock = Stopwatch()
    traffic = ContactTraffic()
    people = pick(300, 5000)
    first = traffic.versions(people, 1)
    ids = [str(key) for key, _ in first]
    worker = await _running_worker(cluster)
    await publish(cluster, topics.CONTACT_CHANGES, first)
    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES])

    # The producers switch to v2: updates of every contact and new contacts.
    expected_before = {k: dict(v) for k, v in traffic.expected.rows.items()}
    v2_events = [traffic.event(k, 1) for k in ids] + [
        traffic.event(str(k), 0, "n") for k, _ in ContactTraffic().versions(people // 5, 1)
    ]
    v2: list[Record] = [(e["key"], WITH_V2.encode(_v2(e))) for e in v2_events]
    await publish(cluster, topics.CONTACT_CHANGES, v2)
    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES])
    (status,) = await status_of(cluster, D2C)
    assert status.state == "RUNNING" and worker.process.poll() is None

    # What the target holds is what the v1 events said; every v2 event is in the DLQ.
    traffic.expected.rows = expected_before
    found = await traffic.compare(cluster)
    letters = await dead_letters(cluster, D2C)
    problems = _not_dead_lettered(v2, letters, "unknown writer schema fingerprint")
    decoded = [WITH_V2.decode(letter.value) for letter, _ in letters]
    assert [e["origin_app"] for e in decoded] == ["crm-mobile"] * len(v2), "recoverable"
    record(
        Outcome(
            "7a. compatible schema v2, single-object framing, workers not upgraded",
            sent=traffic.sent,
            written=found.written,
            lost=found.lost + len(problems),
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=len(letters),
            expected_dlq=len(v2),
            seconds=clock.seconds,
            samples=[*problems, *found.samples],
        )
    )


async def test_with_a_schema_registry_v2_flows_and_an_incompatible_writer_is_dead_lettered(
    cluster: Cluster, registry: RegistryStandIn
) -> None:
    registry_url = registry.url
    clock = Stopwatch()
    traffic = ContactTraffic()
    people = pick(300, 5000)
    client = SchemaRegistry(registry_url)
    v1_codec = RegistryCodec(CHANGE_EVENT, client)
    v2_codec = RegistryCodec(WITH_V2, client)
    v3_codec = RegistryCodec(ONLY_V3, client)
    subject = f"{topics.CONTACT_CHANGES}-value"
    try:
        await _running_worker(cluster, CRMSYNC_SCHEMA_REGISTRY_URL=registry_url)
        ids = [str(k) for k, _ in ContactTraffic().versions(people, 1)]
        first = [(k, await v1_codec.encode(traffic.event(k, 0), subject)) for k in ids]
        await publish(cluster, topics.CONTACT_CHANGES, first)
        # The switch to v2 mid-stream: no interruption, nothing dead-lettered.
        second = [(k, await v2_codec.encode(_v2(traffic.event(k, 1)), subject)) for k in ids]
        await publish(cluster, topics.CONTACT_CHANGES, second)
        await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES])
        assert await dead_letters(cluster, D2C) == [], "a compatible v2 flows through"
        # Then an incompatible writer for a few contacts: dead-lettered, the rest unaffected.
        expected_before = {k: dict(v) for k, v in traffic.expected.rows.items()}
        bad_ids = ids[: max(3, people // 20)]
        third = []
        for k in bad_ids:
            event = traffic.event(k, 2)
            third.append((k, await v3_codec.encode({**event, "key": 42}, subject)))
        await publish(cluster, topics.CONTACT_CHANGES, third)
        await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES])
    finally:
        await client.aclose()
    traffic.expected.rows = expected_before
    found = await traffic.compare(cluster)
    letters = await dead_letters(cluster, D2C)
    problems = _not_dead_lettered(third, letters, "corrupt Avro body")
    (status,) = await status_of(cluster, D2C)
    assert status.state == "RUNNING"
    record(
        Outcome(
            "7b. schema registry: v2 mid-stream, then an incompatible writer",
            sent=traffic.sent,
            written=found.written,
            lost=found.lost + len(problems),
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=len(letters),
            expected_dlq=len(third),
            seconds=clock.seconds,
            samples=[*problems, *found.samples],
        )
    )


async def _running_worker(cluster: Cluster, **env: str) -> Any:
    await cluster.control(D2C, "running")
    worker = cluster.start_worker(D2C, **env)
    await wait_worker(cluster, worker, "RUNNING")
    return worker


async def test_a_registry_outage_holds_records_back_instead_of_dead_lettering_them(
    cluster: Cluster, registry: RegistryStandIn
) -> None:
    """A registry that cannot answer is a retryable failure (DESIGN: connection errors and 503s
    are retried while the workflow runs): the records wait, none goes to the DLQ."""
    clock = Stopwatch()
    traffic = ContactTraffic()
    client = SchemaRegistry(registry.url)
    subject = f"{topics.CONTACT_CHANGES}-value"
    try:
        codec = RegistryCodec(WITH_V2, client)
        ids = [str(k) for k, _ in ContactTraffic().versions(pick(200, 2000), 1)]
        records = [(k, await codec.encode(_v2(traffic.event(k, 0)), subject)) for k in ids]
    finally:
        await client.aclose()
    await _running_worker(cluster, CRMSYNC_SCHEMA_REGISTRY_URL=registry.url)
    registry.down = True  # the worker has not fetched the v2 writer schema yet
    await publish(cluster, topics.CONTACT_CHANGES, records)
    await asyncio.sleep(pick(8, 60, 20))
    registry.down = False
    try:
        await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES], within=120)
    finally:
        found = await traffic.compare(cluster)
        letters = await dead_letters(cluster, D2C)
        record(
            Outcome(
                "7c. schema registry unavailable for a while",
                sent=traffic.sent,
                written=found.written,
                lost=found.lost,
                duplicated=found.duplicated,
                unexpected=found.unexpected,
                dlq=len(letters),
                seconds=clock.seconds,
                samples=[h["crmsync.error.message"][:200] for _, h in letters[:3]] + found.samples,
            )
        )


def _not_dead_lettered(
    sent: Sequence[Record], letters: list[tuple[Any, dict[str, str]]], reason: str
) -> list[str]:
    found = {(r.key.decode(), r.value): h for r, h in letters}
    problems = []
    for key, value in sent:
        headers = found.get((str(key), value))
        if headers is None:
            problems.append(f"{key}: not in the DLQ")
        elif reason not in headers["crmsync.error.message"]:
            problems.append(f"{key}: reason {headers['crmsync.error.message'][:200]!r}")
    return problems


# -- a schema registry stand-in (the Confluent REST calls the workers and producers make) --------


class RegistryStandIn:
    def __init__(self) -> None:
        self.url = ""
        self.down = False  # answers 503 to every lookup while set


@pytest.fixture
async def registry() -> AsyncIterator[RegistryStandIn]:
    schemas: dict[int, str] = {}
    ids: dict[str, int] = {}
    handle = RegistryStandIn()

    async def register(request: Request) -> JSONResponse:
        schema = (await request.json())["schema"]
        canonical = json.dumps(json.loads(schema), sort_keys=True)
        if canonical not in ids:
            ids[canonical] = len(ids) + 1
            schemas[ids[canonical]] = schema
        return JSONResponse({"id": ids[canonical]})

    async def by_id(request: Request) -> JSONResponse:
        if handle.down:
            return JSONResponse({"error_code": 50302, "message": "unavailable"}, 503)
        found = schemas.get(int(request.path_params["id"]))
        if found is None:
            return JSONResponse({"error_code": 40403, "message": "Schema not found"}, 404)
        return JSONResponse({"schema": found})

    app = Starlette(
        routes=[
            Route("/subjects/{subject}/versions", register, methods=["POST"]),
            Route("/schemas/ids/{id:int}", by_id, methods=["GET"]),
        ]
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return bool(server.started)

    await wait_for(started, 30, "the registry stand-in", 0.05)
    handle.url = f"http://127.0.0.1:{port}"
    yield handle
    server.should_exit = True
    await task
