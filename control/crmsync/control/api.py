"""The HTTP API: thin routes over the supervisor, one table that also yields /openapi.json.

Every refusal is a typed `ControlError` carrying its HTTP status; `error_response` is the one
place that turns one into an answer, for the page too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from crmsync.control import dead_letters, limits, models
from crmsync.control.auth import Authenticator, Principal, Role, require
from crmsync.control.errors import BadRequest, ControlError, Invalid, Unauthenticated, Unavailable
from crmsync.control.history import CHART_S, KEEP_S, HistoryAnswer
from crmsync.control.sources import SourceList
from crmsync.control.supervisor_protocol import Supervisor
from crmsync.control.throttle import FailureThrottle

log = logging.getLogger(__name__)

DEFAULT_LIMIT, MAX_LIMIT = 50, 1000


def error_response(error: ControlError) -> JSONResponse:
    """The one place a refusal becomes HTTP: the status and headers its class carries."""
    body: dict[str, Any] = {"error": error.message, "detail": error.detail}
    if isinstance(error, Invalid):
        body["errors"] = error.errors
    return JSONResponse(body, error.status, headers=error.headers())


def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (unknown path, wrong method, a body past its limit) in our
    error shape."""
    assert isinstance(exc, HTTPException)
    if isinstance(exc, limits.BodyTooLarge):
        return JSONResponse(limits.too_large_body(exc.limit), 413, headers={"Connection": "close"})
    return JSONResponse(
        {"error": exc.detail or "error", "detail": None}, exc.status_code, headers=exc.headers
    )


def _answer(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json", by_alias=True), status)


@dataclass(frozen=True)
class Call:
    """What a handler gets: the request, the supervisor, and who called (None: open route)."""

    request: Request
    supervisor: Supervisor
    who: Principal | None

    @property
    def principal(self) -> Principal:
        assert self.who is not None
        return self.who

    @property
    def name(self) -> str:
        return str(self.request.path_params["name"])

    def limit(self) -> int:
        raw = self.request.query_params.get("limit")
        if raw is None:
            return DEFAULT_LIMIT
        try:
            limit = int(raw)
        except ValueError:
            raise BadRequest(f"limit must be a whole number, got {raw!r}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        return limit

    async def json(self) -> Any:
        body = await self.request.body()
        try:
            data = json.loads(body)
            too_deep = limits.depth(data) > limits.JSON_MAX_DEPTH
        except (ValueError, UnicodeDecodeError) as error:
            raise BadRequest("the body is not valid JSON", str(error)) from None
        except RecursionError:  # deeper than Python's own limit
            too_deep = True
        if too_deep:
            raise BadRequest(
                f"the JSON body nests deeper than {limits.JSON_MAX_DEPTH} levels",
                {"max_depth": limits.JSON_MAX_DEPTH},
            )
        return data

    async def body(self, model: type[BaseModel]) -> Any:
        data = await self.json()
        try:
            return model.model_validate(data)
        except ValidationError as error:
            errors = [
                {"loc": list(e["loc"]), "msg": e["msg"].removeprefix("Value error, ")}
                for e in error.errors()
            ]
            raise Invalid("invalid body", errors) from None


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """One route: how it is called, who may call it, what it answers (for /openapi.json)."""

    method: str
    path: str
    handler: Handler
    summary: str
    role: Role | None
    answer: type[BaseModel] | None
    status: int = 200
    body: type[BaseModel] | str | None = None  # str: a components schema named so
    query: tuple[str, ...] = ()
    refusals: tuple[int, ...] = ()
    content_type: str = "application/json"
    extra: dict[str, Any] = field(default_factory=dict)


# -- handlers ---------------------------------------------------------------------------------


async def _list(call: Call) -> Response:
    return _answer(models.WorkflowList(workflows=await call.supervisor.summaries()))


async def _show(call: Call) -> Response:
    return _answer(await call.supervisor.detail(call.name))


async def _start(call: Call) -> Response:
    return _answer(await call.supervisor.start_workflow(call.name, call.principal), 202)


async def _stop(call: Call) -> Response:
    return _answer(await call.supervisor.stop_workflow(call.name, call.principal), 202)


async def _get_config(call: Call) -> Response:
    return _answer(call.supervisor.config(call.name))


async def _put_config(call: Call) -> Response:
    call.supervisor.config(call.name)  # an unknown workflow is a 404 before the body is read
    data = await call.json()
    if not isinstance(data, dict):
        raise Invalid("invalid config", [{"loc": [], "msg": "a config is a JSON object"}])
    return _answer(await call.supervisor.edit_config(call.name, data, call.principal))


async def _replay(call: Call) -> Response:
    call.supervisor.config(call.name)
    body: models.ReplayBody = await call.body(models.ReplayBody)
    return _answer(await call.supervisor.replay(call.name, body.from_, call.principal))


async def _preview(call: Call) -> Response:
    call.supervisor.config(call.name)  # an unknown workflow is a 404 before the body is read
    empty = not (await call.request.body()).strip()
    body = models.PreviewBody() if empty else await call.body(models.PreviewBody)
    return _answer(await call.supervisor.preview(call.name, body.config, body.limit))


_FILTER_QUERY = ("reason", "error_class", "key", "since", "until")


def _query_filter(call: Call) -> dead_letters.DeadLetterFilter:
    """The listing's filter from the query string; a bad value is a 400 naming the parameter."""
    given = {k: v for k, v in call.request.query_params.items() if k in _FILTER_QUERY}
    try:
        return dead_letters.DeadLetterFilter.model_validate(given)
    except ValidationError as error:
        errors = [
            {"loc": ["query", *e["loc"]], "msg": e["msg"].removeprefix("Value error, ")}
            for e in error.errors()
        ]
        names = ", ".join(str(e["loc"][-1]) for e in errors)
        raise BadRequest(f"invalid query parameter(s): {names}", errors) from None


async def _dead_letters(call: Call) -> Response:
    limit = call.limit()
    where = _query_filter(call)
    return _answer(await call.supervisor.dead_letter_listing(call.name, where, limit))


async def _redrive(call: Call) -> Response:
    call.supervisor.config(call.name)  # an unknown workflow is a 404 before the body is read
    body: dead_letters.RedriveBody = await call.body(dead_letters.RedriveBody)
    return _answer(await call.supervisor.redrive(call.name, body, call.principal))


async def _sources(call: Call) -> Response:
    return _answer(call.supervisor.sources())


async def _history(call: Call) -> Response:
    raw = call.request.query_params.get("minutes")
    span_s = CHART_S
    if raw is not None:
        most = int(KEEP_S // 60)
        try:
            minutes = int(raw)
        except ValueError:
            raise BadRequest(f"minutes must be a whole number, got {raw!r}") from None
        if not 1 <= minutes <= most:
            raise BadRequest(f"minutes must be between 1 and {most}, got {minutes}")
        span_s = minutes * 60.0
    return _answer(call.supervisor.history(call.name, span_s))


async def _audit(call: Call) -> Response:
    limit = call.limit()
    return _answer(await call.supervisor.audit(limit))


async def _trace(call: Call) -> Response:
    key = str(call.request.path_params["key"])
    if len(key) > 200:
        raise BadRequest(f"a key is at most 200 characters, got {len(key)}")
    return _answer(await call.supervisor.trace(key))


class TargetRequirement(BaseModel):
    """One piece a workflow's active config needs in a target (see docs/targets.md)."""

    workflow: str
    target: str
    kind: str
    name: str
    present: bool
    fix: str


class TargetsAnswer(BaseModel):
    requirements: list[TargetRequirement]
    missing: int


async def _targets(call: Call) -> Response:
    from crmsync.streams import preflight

    found = await call.supervisor.targets()
    return _answer(
        TargetsAnswer(
            requirements=[TargetRequirement(**r.as_dict()) for r in found],
            missing=len(preflight.missing(found)),
        )
    )


async def _healthz(call: Call) -> Response:
    return _answer(models.Health(status="ok"))


async def _readyz(call: Call) -> Response:
    try:
        await call.supervisor.ready()
    except Unavailable as error:
        # an open route: why (Kafka's error text, addresses) goes to the log, not to anyone asking
        log.warning("event=not_ready reason=%r", error.message)
        return _answer(models.Health(status="unavailable"), 503)
    return _answer(models.Health(status="ok"))


_W = "/api/v1/workflows/{name}"
ENDPOINTS: list[Endpoint] = [
    Endpoint(
        "GET", "/api/v1/workflows", _list, "Every workflow's status and backlog",
        Role.viewer, models.WorkflowList,
    ),
    Endpoint(
        "GET", _W, _show, "One workflow: partitions, configs, workers",
        Role.viewer, models.WorkflowDetail, refusals=(404,),
    ),
    Endpoint(
        "POST", f"{_W}/start", _start, "Start (pending config changes become active)",
        Role.operator, models.StatusAnswer, 202, refusals=(404, 409),
    ),
    Endpoint(
        "POST", f"{_W}/stop", _stop, "Stop: nothing more is written once STOPPED",
        Role.operator, models.StatusAnswer, 202, refusals=(404, 409),
    ),
    Endpoint(
        "GET", f"{_W}/config", _get_config, "The active and pending config (secrets redacted)",
        Role.viewer, models.ConfigAnswer, refusals=(404,),
    ),
    Endpoint(
        "PUT", f"{_W}/config", _put_config, "Validate a config and store it as pending",
        Role.admin, models.PendingAnswer, body="WorkflowConfig", refusals=(400, 404, 413, 422),
    ),
    Endpoint(
        "POST", f"{_W}/replay", _replay, "Move the committed offsets back (only while STOPPED)",
        Role.operator, models.ReplayAnswer, body=models.ReplayBody,
        refusals=(400, 404, 409, 413, 422),
    ),
    Endpoint(
        "POST", f"{_W}/preview", _preview,
        "Dry run: what the active and the given (else the pending) config would write for the "
        "newest source records; writes nothing",
        Role.viewer, models.PreviewAnswer, body=models.PreviewBody,
        refusals=(400, 404, 409, 413, 422),
    ),
    Endpoint(
        "GET", f"{_W}/dead-letters", _dead_letters, "The newest dead letters with their reasons",
        Role.viewer, models.DeadLetterList, query=("limit", *_FILTER_QUERY), refusals=(400, 404),
    ),
    Endpoint(
        "POST", f"{_W}/dead-letters/redrive", _redrive,
        "Send the matching dead letters through the workflow again, once each (audited)",
        Role.operator, dead_letters.RedriveAnswer, body=dead_letters.RedriveBody,
        refusals=(400, 404, 413, 422),
    ),
    Endpoint(
        "GET", f"{_W}/history", _history,
        "Backlog and records written per second, sampled over the last hour",
        Role.viewer, HistoryAnswer, query=("minutes",), refusals=(400, 404),
    ),
    Endpoint(
        "GET", "/api/v1/sources", _sources,
        "The change sources (the Dynamics source): state, last poll, lag, per entity",
        Role.viewer, SourceList,
    ),
    Endpoint(
        "GET", "/api/v1/audit", _audit, "The newest audit entries",
        Role.viewer, models.AuditList, query=("limit",), refusals=(400,),
    ),
    Endpoint(
        "GET", "/api/v1/trace/{key}", _trace,
        "Every change event that carried a key and what each workflow did with it, newest first",
        Role.viewer, models.TraceAnswer, refusals=(400,),
    ),
    Endpoint(
        "GET", "/api/v1/targets", _targets,
        "What the active configs need in Dynamics and Campaign: present, or missing with a fix",
        Role.viewer, TargetsAnswer,
    ),
    Endpoint("GET", "/healthz", _healthz, "Liveness", None, models.Health),
    Endpoint(
        "GET", "/readyz", _readyz, "Readiness: Kafka reachable, control topics read",
        None, models.Health, refusals=(503,),
    ),
]  # fmt: skip


def _route(
    path: str, endpoints: list[Endpoint], authenticator: Authenticator, throttle: FailureThrottle
) -> Route:
    """One route per path (so a 405 names every allowed method), dispatching on the method."""
    by_method = {endpoint.method: endpoint for endpoint in endpoints}

    async def run(request: Request) -> Response:
        endpoint = by_method["GET" if request.method == "HEAD" else request.method]
        try:
            who = None
            if endpoint.role is not None:
                client = request.client.host if request.client else "unknown"
                throttle.check(client)
                try:
                    who = authenticator.authenticate(request.headers.get("authorization"))
                except Unauthenticated as error:
                    if error.invalid_token:  # a guess, not a missing header
                        throttle.failed(client)
                    raise
                require(who, endpoint.role)
            supervisor: Supervisor = request.app.state.supervisor
            return await endpoint.handler(Call(request, supervisor, who))
        except ControlError as error:
            return error_response(error)

    return Route(path, run, methods=list(by_method), name=endpoints[0].handler.__name__)


def routes(authenticator: Authenticator, throttle: FailureThrottle | None = None) -> list[Route]:
    throttle = throttle or FailureThrottle()
    paths: dict[str, list[Endpoint]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, []).append(endpoint)
    return [_route(path, endpoints, authenticator, throttle) for path, endpoints in paths.items()]
