"""Confluent framing through a schema registry's REST API, served over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator
from importlib import resources

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from crmsync.schemas.codec import CHANGE_EVENT, EventSchema, UnknownSchema
from crmsync.schemas.registry import RegistryCodec, RegistryUnavailable, SchemaRegistry
from crmsync.streams.kafka.events import change_event


def _registry_app() -> Starlette:
    """The two calls of the Confluent Schema Registry API that producers and consumers make."""
    schemas: list[str] = []

    async def register(request: Request) -> JSONResponse:
        body = await request.json()
        schema = json.dumps(json.loads(body["schema"]), sort_keys=True)
        if schema not in schemas:
            schemas.append(schema)
        return JSONResponse({"id": schemas.index(schema) + 1})

    async def by_id(request: Request) -> JSONResponse:
        index = int(request.path_params["id"]) - 1
        if not 0 <= index < len(schemas):
            return JSONResponse({"error_code": 40403, "message": "Schema not found"}, 404)
        return JSONResponse({"schema": schemas[index]})

    return Starlette(
        routes=[
            Route("/subjects/{subject}/versions", register, methods=["POST"]),
            Route("/schemas/ids/{id:int}", by_id),
        ]
    )


@pytest.fixture
async def registry_url() -> AsyncIterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_registry_app(), port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # uvicorn offers no event for "listening"
        if server.started:
            break
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


_EVENT = change_event("u", "contact", "c-1", after={"firstname": "Ada"}, system="d365")


def _event() -> dict[str, object]:
    return dict(_EVENT)


async def test_registry_framed_events_round_trip(registry_url: str) -> None:
    registry = SchemaRegistry(registry_url)
    codec = RegistryCodec(CHANGE_EVENT, registry)
    try:
        data = await codec.encode(_event(), "d365.contact.changes-value")
        assert data[0] == 0 and struct.unpack(">I", data[1:5]) == (1,)
        assert await codec.decode(data) == _event()
        # a consumer that never saw the id fetches the writer schema by id
        fresh = RegistryCodec(CHANGE_EVENT, SchemaRegistry(registry_url))
        assert await fresh.decode(data) == _event()
        await fresh.registry.aclose()
        # the single-object framing still decodes through the same codec
        assert await codec.decode(CHANGE_EVENT.encode(_event())) == _event()
    finally:
        await registry.aclose()


async def test_an_older_registered_version_reads_into_the_newer_schema(registry_url: str) -> None:
    v1 = json.loads((resources.files("crmsync.schemas") / "ChangeEvent.v1.avsc").read_text())
    v2 = json.loads(json.dumps(v1))
    v2["fields"].append({"name": "region", "type": "string", "default": "emea"})
    old, new = (
        EventSchema.from_versions("ChangeEvent", [v1]),
        EventSchema.from_versions("ChangeEvent", [v1, v2]),
    )
    registry = SchemaRegistry(registry_url)
    try:
        data = await RegistryCodec(old, registry).encode(_event(), "s-value")
        reader = RegistryCodec(new, SchemaRegistry(registry_url))
        decoded = await reader.decode(data)
        await reader.registry.aclose()
        assert decoded["region"] == "emea" and decoded["after"] == {"firstname": "Ada"}
    finally:
        await registry.aclose()


async def test_an_unknown_id_and_an_unreachable_registry_are_told_apart(
    registry_url: str,
) -> None:
    codec = RegistryCodec(CHANGE_EVENT, SchemaRegistry(registry_url))
    with pytest.raises(UnknownSchema, match="schema id 77"):
        await codec.decode(b"\x00" + struct.pack(">I", 77) + b"\x00")
    await codec.registry.aclose()
    # unreachable is not the record's fault: a distinct error the worker waits out
    down = RegistryCodec(CHANGE_EVENT, SchemaRegistry("http://127.0.0.1:1"))
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        await down.decode(b"\x00" + struct.pack(">I", 1) + b"\x00")
    await down.registry.aclose()
