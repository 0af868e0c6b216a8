"""The `/_admin` endpoints both emulators serve: stats, fault injection and reset."""

from __future__ import annotations

import json
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from crmsync.deploy.emulators.faults import Faults, FaultSpec
from crmsync.deploy.emulators.limits import InFlight
from crmsync.deploy.emulators.model import FieldDef, FieldType


class Administered(Protocol):
    """What an emulator exposes to its admin endpoints."""

    faults: Faults
    requests: int
    in_flight: InFlight

    async def counts(self) -> dict[str, int]: ...

    async def reset(self) -> None: ...

    def revoke_tokens(self) -> None: ...

    def set_token_lifetime(self, seconds: float | None) -> None: ...


def _json_only(endpoint: Any) -> Any:
    """A POST must say `Content-Type: application/json`: a cross-site form (urlencoded,
    multipart, text/plain) cannot, and a JSON body from another origin needs CORS we never grant."""

    async def checked(request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return JSONResponse(
                {"error": "send the body as JSON (Content-Type: application/json)"}, 415
            )
        response: Response = await endpoint(request)
        return response

    return checked


class FieldChange(BaseModel):
    """What an admin changes of a column or field in the vendor's UI: its type, its length, its
    decimal places. Omitted keys keep what the column has."""

    model_config = ConfigDict(extra="forbid")

    type: FieldType | None = None
    max_length: int | None = Field(default=None, ge=1, le=1_048_576)
    precision: int | None = Field(default=None, ge=0, le=10)

    def applied(self, field: FieldDef) -> FieldDef:
        changes = self.model_dump(exclude_unset=True)
        return FieldDef.model_validate({**field.model_dump(), **changes})


async def field_change(request: Request) -> FieldChange | Response:
    """The body of a ``PATCH /_admin/.../{column|field}``, or the 422 answer."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        return JSONResponse(
            {"error": "send the body as JSON (Content-Type: application/json)"}, 415
        )
    try:
        return FieldChange.model_validate_json(await request.body() or b"{}")
    except ValidationError as e:
        errors = [
            {"loc": list(err["loc"]), "msg": err["msg"]}
            for err in json.loads(e.json(include_url=False, include_context=False))
        ]
        return JSONResponse({"error": "invalid change", "errors": errors}, status_code=422)


def admin_routes(emulator: Administered) -> list[Route]:
    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "counts": await emulator.counts(),
                "requests": emulator.requests,
                "in_flight_peak": emulator.in_flight.peak,
            }
        )

    async def set_faults(request: Request) -> Response:
        body = await request.body()
        try:
            spec = FaultSpec.model_validate_json(body or b"{}")
        except ValidationError as e:
            errors = [
                {"loc": list(err["loc"]), "msg": err["msg"]}
                for err in json.loads(e.json(include_url=False, include_context=False))
            ]
            return JSONResponse({"error": "invalid faults", "errors": errors}, status_code=422)
        emulator.faults.apply(spec)
        emulator.set_token_lifetime(spec.token_lifetime_s)
        if spec.revoke_tokens:
            emulator.revoke_tokens()
        return JSONResponse({"faults": emulator.faults.describe()})

    async def get_faults(request: Request) -> Response:
        return JSONResponse({"faults": emulator.faults.describe()})

    async def clear_faults(request: Request) -> Response:
        emulator.faults.clear()
        emulator.set_token_lifetime(None)
        return JSONResponse({"faults": emulator.faults.describe()})

    async def reset(request: Request) -> Response:
        await emulator.reset()
        return JSONResponse({"reset": True})

    return [
        Route("/_admin/stats", stats, methods=["GET"]),
        Route("/_admin/faults", get_faults, methods=["GET"]),
        Route("/_admin/faults", _json_only(set_faults), methods=["POST"]),
        Route("/_admin/faults", clear_faults, methods=["DELETE"]),
        Route("/_admin/reset", _json_only(reset), methods=["POST"]),
    ]
