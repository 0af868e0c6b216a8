"""The OpenAPI 3 description of the control plane, generated from api.ENDPOINTS and the models."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from crmsync.control import models
from crmsync.control.api import DEFAULT_LIMIT, ENDPOINTS, MAX_LIMIT, Endpoint
from crmsync.streams.catalog import NAMES, WORKFLOWS

_REF = "#/components/schemas/{model}"
_REASONS = {
    400: "malformed request (not JSON, a bad query parameter)",
    401: "missing or invalid bearer token",
    403: "the token's role does not allow this",
    404: "no such workflow",
    409: "the workflow's state does not allow this now",
    413: "the body is larger than its limit (1 MiB for JSON, 64 KiB for forms), named in detail",
    422: "invalid body: every problem with its place",
    429: "too many failed tokens or sign-ins from this client: wait Retry-After seconds",
    503: "Kafka or the workers did not answer in time",
}


#: The query parameters besides `limit`.
_QUERY: dict[str, dict[str, Any]] = {
    "reason": {"type": "string", "maxLength": 500, "description": "text in the error message"},
    "error_class": {"type": "string", "maxLength": 200},
    "key": {"type": "string", "maxLength": 500},
    "since": {"type": "string", "format": "date-time", "description": "with a zone"},
    "until": {"type": "string", "format": "date-time", "description": "with a zone"},
    "minutes": {"type": "integer", "minimum": 1, "maximum": 120, "default": 60},
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _schemas() -> dict[str, Any]:
    """Every model the API reads or writes, plus `WorkflowConfig`: any workflow's config."""
    answers: list[type[BaseModel]] = [models.ErrorAnswer, models.InvalidAnswer]
    answers += [e.answer for e in ENDPOINTS if e.answer is not None]
    wanted: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (model, "serialization") for model in dict.fromkeys(answers)
    ]
    wanted += [(e.body, "validation") for e in ENDPOINTS if isinstance(e.body, type)]
    wanted += [(spec.config_model, "validation") for spec in WORKFLOWS.values()]
    _, top = models_json_schema(wanted, ref_template=_REF)
    schemas: dict[str, Any] = top.get("$defs", {})
    schemas["WorkflowConfig"] = {
        "description": "the config of the workflow named in the path (see each model)",
        "anyOf": [_ref(model) for model in (spec.config_model for spec in WORKFLOWS.values())],
    }
    return schemas


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": endpoint.handler.__name__.strip("_").replace("_", "-"),
        "summary": endpoint.summary,
        "responses": {},
    }
    if endpoint.answer is not None:
        operation["responses"][str(endpoint.status)] = {
            "description": "OK",
            "content": {"application/json": {"schema": _ref(endpoint.answer)}},
        }
    parameters: list[dict[str, Any]] = []
    if "{name}" in endpoint.path:
        parameters.append(
            {"name": "name", "in": "path", "required": True,
             "schema": {"type": "string", "enum": list(NAMES)}, "description": "the workflow"}
        )  # fmt: skip
    if "{key}" in endpoint.path:
        parameters.append(
            {"name": "key", "in": "path", "required": True,
             "schema": {"type": "string", "minLength": 1, "maxLength": 200},
             "description": "a contact id, an event id, a profile's externalId or a record id"}
        )  # fmt: skip
    if "limit" in endpoint.query:
        parameters.append(
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                        "default": DEFAULT_LIMIT}}
        )  # fmt: skip
    for name in endpoint.query:
        if name in _QUERY:
            parameters.append(
                {"name": name, "in": "query", "required": False, "schema": _QUERY[name]}
            )
    if parameters:
        operation["parameters"] = parameters
    if endpoint.body is not None:
        schema = (
            _ref(endpoint.body)
            if isinstance(endpoint.body, type)
            else {"$ref": _REF.format(model=endpoint.body)}
        )
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    refusals = set(endpoint.refusals)
    if endpoint.role is not None:
        operation["security"] = [{"bearer": []}]
        operation["x-role"] = endpoint.role.name
        refusals |= {401, 403, 429, 503}
    for code in sorted(refusals):
        if code == 503 and endpoint.answer is models.Health:
            schema = _ref(models.Health)
        else:
            schema = _ref(models.InvalidAnswer if code == 422 else models.ErrorAnswer)
        operation["responses"][str(code)] = {
            "description": _REASONS[code],
            "content": {"application/json": {"schema": schema}},
        }
    return operation


def _plain(operation: str, summary: str, media: str, schema: dict[str, Any]) -> dict[str, Any]:
    ok = {"description": "OK", "content": {media: {"schema": schema}}}
    return {"get": {"operationId": operation, "summary": summary, "responses": {"200": ok}}}


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint)
    paths["/metrics"] = _plain(
        "metrics",
        "Prometheus metrics: backlog, status, records written, dead letters",
        "text/plain",
        {"type": "string"},
    )
    paths["/openapi.json"] = _plain(
        "openapi", "This description", "application/json", {"type": "object"}
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "crmsync control plane",
            "version": version("crmsync"),
            "description": "Status, backlog, stop/start, config edits and replay of the three "
            "crmsync workflows. Roles: viewer < operator < admin.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
