"""The control plane's ASGI app (API, page, metrics, OpenAPI) and `crmsync control`, on uvicorn."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from crmsync.control import api, metrics, openapi, pages
from crmsync.control.auth import Authenticator, resolve_admin_token, token_whereabouts
from crmsync.control.limits import RequestLimits
from crmsync.control.supervisor import KafkaSupervisor
from crmsync.control.supervisor_protocol import Supervisor
from crmsync.control.throttle import FailureThrottle
from crmsync.streams.settings import Settings

log = logging.getLogger(__name__)

SupervisorFactory = Callable[[Settings], contextlib.AbstractAsyncContextManager[Supervisor]]


class ControlPlaneFailed(RuntimeError):
    """uvicorn or the supervisor did not start."""


def create_app(
    settings: Settings,
    authenticator: Authenticator,
    supervisor_factory: SupervisorFactory = KafkaSupervisor,
    throttle: FailureThrottle | None = None,
) -> Starlette:
    """The app; its lifespan starts the supervisor (and so needs Kafka)."""
    document = openapi.document()
    # one count of failures per client, for the API and the page
    throttle = throttle or FailureThrottle()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with supervisor_factory(settings) as supervisor:
            app.state.supervisor = supervisor
            app.state.registry = metrics.registry(supervisor)
            yield

    async def scrape(request: Request) -> Response:
        return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

    async def describe(request: Request) -> Response:
        return JSONResponse(document)

    async def crashed(request: Request, exc: Exception) -> Response:
        log.exception("event=internal_error path=%s", request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error", "detail": type(exc).__name__}, 500)

    return Starlette(
        routes=[
            *api.routes(authenticator, throttle),
            Route("/metrics", scrape, methods=["GET"]),
            Route("/openapi.json", describe, methods=["GET"]),
            *pages.routes(authenticator, throttle=throttle, public_url=settings.public_url),
        ],
        exception_handlers={HTTPException: api.http_error, Exception: crashed},
        middleware=[Middleware(RequestLimits)],
        lifespan=lifespan,
    )


def banner(settings: Settings) -> str:
    """Where the control plane listens and where its admin token is kept, never the token:
    stdout ends up in pod logs and log pipelines."""
    url = f"http://{settings.http_host}:{settings.http_port}"
    return (
        f"control plane: {url}  (API {url}/api/v1/workflows, OpenAPI {url}/openapi.json)\n"
        f"admin token:   {token_whereabouts(settings)}"
    )


async def serve(settings: Settings) -> None:
    """Runs the control plane until SIGINT/SIGTERM (uvicorn's own handlers)."""
    token = resolve_admin_token(settings)
    app = create_app(settings, Authenticator.from_settings(settings, token))
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        lifespan="on",
        access_log=False,
        log_config=None,
    )
    print(banner(settings), flush=True)
    server = uvicorn.Server(config)
    await server.serve()
    if not server.started:
        raise ControlPlaneFailed("the control plane did not start (is Kafka reachable?)")
