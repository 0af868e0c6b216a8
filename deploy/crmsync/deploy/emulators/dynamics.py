"""The Dynamics 365 Web API emulator: Entra-style token endpoint, entity sets, $batch, limits."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from crmsync.deploy.emulators.admin import admin_routes, field_change
from crmsync.deploy.emulators.asgi import ApiFirst, JSONResponse, origin, query_string
from crmsync.deploy.emulators.batch import (
    BatchError,
    BatchItem,
    ChangeSet,
    PartResponse,
    parse_batch,
    render_batch,
)
from crmsync.deploy.emulators.faults import Faults, Injected, retry_after_header
from crmsync.deploy.emulators.limits import Concurrency, InFlight, SlidingWindow
from crmsync.deploy.emulators.model import EntitySet, dynamics_model
from crmsync.deploy.emulators.store import Records, Store, signing_key
from crmsync.deploy.emulators.tokens import Grant, TokenIssuer, TokenProblem
from crmsync.deploy.emulators.webapi import ApiRequest, ApiResponse, WebApi, error_response

API_PREFIX = "/api/data/v9.2"


@dataclass(frozen=True)
class DynamicsOptions:
    """Knobs of the Dynamics emulator (pass as `dynamics_<name>=` to running_emulators)."""

    token_lifetime_s: float = 3599
    requests_per_window: int = 6000
    execution_ms_per_window: float = 1_200_000
    window_s: float = 300
    max_concurrent: int = 52
    dop_hint: int = 8
    delta_token_ttl_s: float = 7 * 86_400
    key_index_delay_s: float = 0.0
    model: Path | None = None
    extra_entity_sets: tuple[EntitySet, ...] = ()


def _aad_error(status: int, error: str, code: int, description: str) -> JSONResponse:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return JSONResponse(
        {
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {uuid.uuid4()} "
            f"Correlation ID: {uuid.uuid4()} Timestamp: {now}",
            "error_codes": [code],
            "timestamp": now,
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
        },
        status_code=status,
    )


def _to_response(api: ApiResponse, extra: list[tuple[str, str]]) -> Response:
    response = Response(api.body, status_code=api.status)
    response.raw_headers.extend(
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in [*api.headers, *extra]
    )
    return response


def _failed(result: PartResponse | list[PartResponse]) -> bool:
    return isinstance(result, PartResponse) and result.status >= 400


class DynamicsEmulator:
    """One Dataverse org: its store, tokens, limits and faults, served by `app`."""

    def __init__(
        self,
        db_path: Path,
        *,
        tenant: str = "local",
        client_id: str = "crmsync-local",
        client_secret: str = "crmsync-local",
        options: DynamicsOptions | None = None,
    ) -> None:
        self.options = options or DynamicsOptions()
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        entity_sets = dynamics_model(self.options.model, list(self.options.extra_entity_sets))
        self.webapi = WebApi(
            entity_sets, self.options.delta_token_ttl_s, self.options.key_index_delay_s
        )
        self.store = Store(db_path, self.webapi.index_statements())
        self.faults = Faults()
        self.requests = 0
        self.in_flight = InFlight()
        self.tokens = TokenIssuer(b"", "", "dynamics", self.options.token_lifetime_s)
        self._request_window = SlidingWindow(
            self.options.requests_per_window, self.options.window_s
        )
        self._time_window = SlidingWindow(
            self.options.execution_ms_per_window, self.options.window_s
        )
        self._concurrency = Concurrency(self.options.max_concurrent)
        api = Route(
            API_PREFIX + "/{path:path}",
            self._api,
            methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
        )
        self.starlette = Starlette(
            routes=[
                Route("/{tenant}/oauth2/v2.0/token", self._token, methods=["POST"]),
                Route(
                    "/{tenant}/v2.0/.well-known/openid-configuration",
                    self._openid_configuration,
                    methods=["GET"],
                ),
                Route("/{tenant}/discovery/v2.0/keys", self._keys, methods=["GET"]),
                *admin_routes(self),
                Route(
                    "/_admin/entity-sets/{name}/keys/{columns}", self._drop_key, methods=["DELETE"]
                ),
                Route(
                    "/_admin/entity-sets/{name}/columns/{column}",
                    self._drop_column,
                    methods=["DELETE"],
                ),
                Route(
                    "/_admin/entity-sets/{name}/columns/{column}",
                    self._change_column,
                    methods=["PATCH"],
                ),
                api,
            ]
        )
        self.app = ApiFirst(self.starlette, api)

    async def open(self) -> None:
        await self.store.open()
        await self.store.run(self.webapi.load_model)
        key = await self.store.run(lambda records: signing_key(records, TokenIssuer.new_key))
        self.tokens = TokenIssuer(
            key.encode(), f"emulator/{self.tenant}", "dynamics", self.options.token_lifetime_s
        )

    async def close(self) -> None:
        await self.store.close()

    # --- admin -----------------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        stored = await self.store.run(lambda records: records.counts())
        return {name: stored.get(name, 0) for name in self.webapi.entity_sets}

    async def reset(self) -> None:
        await self.store.run(lambda records: records.wipe())
        self._request_window.reset()
        self._time_window.reset()
        self.requests = 0
        self.in_flight.reset()

    async def _drop_key(self, request: Request) -> Response:
        """Drift for tests: the table loses an alternate key (``columns`` comma-separated)."""
        entity = self.webapi.entity_sets.get(request.path_params["name"])
        columns = tuple(sorted(request.path_params["columns"].split(",")))
        if entity is None or columns not in {tuple(sorted(k)) for k in entity.alternate_keys}:
            return JSONResponse({"error": "no such table or key"}, status_code=404)
        kept = tuple(k for k in entity.alternate_keys if tuple(sorted(k)) != columns)
        dropped = [k for k in entity.alternate_keys if tuple(sorted(k)) == columns]
        # Rebuilt, not model_copy'd: the copy would keep the old cached lookups.
        changed = EntitySet.model_validate({**entity.model_dump(), "alternate_keys": kept})

        def drop(records: Records) -> None:
            for key in dropped:
                records.drop_key(entity.name, ",".join(key))
            self.webapi.define(records, changed)

        await self.store.run(drop)
        return JSONResponse({"entity_set": entity.name, "alternate_keys": [list(k) for k in kept]})

    async def _drop_column(self, request: Request) -> Response:
        """Drift for tests: the table loses a column (and any key using it)."""
        entity = self.webapi.entity_sets.get(request.path_params["name"])
        column = request.path_params["column"]
        if entity is None or column not in entity.by_name or column == entity.primary_id:
            return JSONResponse({"error": "no such table or column"}, status_code=404)
        fields = tuple(f for f in entity.fields if f.name != column)
        keys = tuple(k for k in entity.alternate_keys if column not in k)
        changed = EntitySet.model_validate(
            {
                **entity.model_dump(),
                "fields": [f.model_dump() for f in fields],
                "alternate_keys": keys,
            }
        )

        def drop(records: Records) -> None:
            for key in entity.alternate_keys:
                if column in key:
                    records.drop_key(entity.name, ",".join(key))
            self.webapi.define(records, changed)

        await self.store.run(drop)
        return JSONResponse({"entity_set": entity.name, "columns": [f.name for f in fields]})

    async def _change_column(self, request: Request) -> Response:
        """Drift for tests: a column's type, length or decimal places change (an admin editing
        the column in the maker portal); the rows keep their values."""
        change = await field_change(request)
        if isinstance(change, Response):
            return change
        entity = self.webapi.entity_sets.get(request.path_params["name"])
        column = request.path_params["column"]
        if entity is None or column not in entity.by_name or column == entity.primary_id:
            return JSONResponse({"error": "no such table or column"}, status_code=404)
        fields = [
            (change.applied(f) if f.name == column else f).model_dump() for f in entity.fields
        ]
        changed = EntitySet.model_validate({**entity.model_dump(), "fields": fields})
        await self.store.run(lambda records: self.webapi.define(records, changed))
        return JSONResponse(
            {"entity_set": entity.name, "column": changed.by_name[column].model_dump(mode="json")}
        )

    def revoke_tokens(self) -> None:
        self.tokens.revoke_all()

    def set_token_lifetime(self, seconds: float | None) -> None:
        self.tokens.lifetime_s = seconds or self.options.token_lifetime_s

    # --- Entra ID --------------------------------------------------------------------------

    def _advertised_base(self, request: Request) -> str:
        # MSAL only accepts https authorities and endpoints, so the discovery document names
        # https://<this host>; a client maps that back to http in its transport.
        return f"https://{request.url.netloc}"

    async def _openid_configuration(self, request: Request) -> Response:
        tenant = request.path_params["tenant"]
        if tenant != self.tenant:
            return _aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        base = f"{self._advertised_base(request)}/{tenant}"
        return JSONResponse(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/v2.0",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": ["client_secret_post"],
                "response_types_supported": ["code", "id_token", "token"],
                "grant_types_supported": ["client_credentials"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "tenant_region_scope": "EU",
            }
        )

    async def _keys(self, request: Request) -> Response:
        return JSONResponse({"keys": []})

    async def _token(self, request: Request) -> Response:
        tenant = request.path_params["tenant"]
        if tenant != self.tenant:
            return _aad_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        try:
            form = await request.form()
        except Exception:  # python-multipart raises several types on garbage bodies
            return _aad_error(400, "invalid_request", 900144, "The request body is malformed.")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        await form.close()
        for required in ("grant_type", "client_id", "scope"):
            if not fields.get(required):
                return _aad_error(
                    400,
                    "invalid_request",
                    900144,
                    f"The request body must contain the following parameter: '{required}'.",
                )
        if fields["grant_type"] != "client_credentials":
            return _aad_error(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{fields['grant_type'][:50]}'.",
            )
        if fields["client_id"] != self.client_id:
            return _aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{fields['client_id'][:100]}' was not found in "
                f"the directory '{tenant}'.",
            )
        if fields.get("client_secret") != self.client_secret:
            return _aad_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is "
                "the client secret value, not the client secret ID, for a secret added to app "
                f"'{self.client_id}'.",
            )
        if not fields["scope"].strip().endswith("/.default"):
            return _aad_error(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {fields['scope'][:100]} is not valid. Client "
                "credential flows must have a scope value with /.default suffixed to the "
                "resource identifier (application ID URI).",
            )
        token, lifetime = self.tokens.issue(self.client_id)
        return JSONResponse(
            {
                "token_type": "Bearer",
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": token,
            },
            headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"},
        )

    # --- Web API ---------------------------------------------------------------------------

    def _unauthorized(self, request: Request, problem: TokenProblem) -> Response:
        base = origin(request)
        message = {
            TokenProblem.MISSING: "Bearer token is missing in the Authorization header.",
            TokenProblem.INVALID: "The access token is invalid.",
            TokenProblem.EXPIRED: "The access token has expired.",
            TokenProblem.REVOKED: "The access token has been revoked.",
        }[problem]
        return _to_response(
            error_response(401, "0x80072560", message),
            [
                (
                    "WWW-Authenticate",
                    f"Bearer authorization_uri={base}/{self.tenant}/oauth2/authorize, "
                    f"resource_id={base}/",
                )
            ],
        )

    def _limit_headers(self, client: str) -> list[tuple[str, str]]:
        used = self._request_window.spent(client)
        return [
            ("x-ms-dop-hint", str(self.options.dop_hint)),
            (
                "x-ms-ratelimit-burst-remaining-xrm-requests",
                str(max(0, int(self.options.requests_per_window - used))),
            ),
        ]

    def _injected(self, injected: Injected) -> Response:
        codes = {
            429: ("0x80072322", "Number of requests exceeded the limit (injected fault)."),
            503: ("0x80040265", "The service is temporarily unavailable (injected fault)."),
        }
        code, message = codes.get(
            injected.status, ("0x80040216", f"An unexpected error occurred ({injected.reason}).")
        )
        extra = []
        if injected.retry_after_s is not None:
            extra.append(("Retry-After", retry_after_header(injected.retry_after_s)))
        return _to_response(error_response(injected.status, code, message), extra)

    def _throttled(self, client: str) -> Response | None:
        retry = self._request_window.retry_after(client)
        if retry is not None:
            code, message = (
                "0x80072322",
                f"Number of requests exceeded the limit of {self.options.requests_per_window} "
                f"over time window of {int(self.options.window_s)} seconds.",
            )
        elif (retry := self._time_window.retry_after(client)) is not None:
            code, message = (
                "0x80072321",
                "Combined execution time of incoming requests exceeded limit of "
                f"{int(self.options.execution_ms_per_window):,} milliseconds over time window "
                f"of {int(self.options.window_s)} seconds. Decrease number of concurrent requests "
                "or reduce the duration of requests and try again later.",
            )
        else:
            return None
        return _to_response(
            error_response(429, code, message),
            [("Retry-After", retry_after_header(retry)), *self._limit_headers(client)],
        )

    async def _api(self, request: Request) -> Response:
        with self.in_flight:
            return await self._serve(request)

    async def _serve(self, request: Request) -> Response:
        self.requests += 1
        injected = self.faults.failure()
        if injected is not None:
            return self._injected(injected)
        grant = self.tokens.check(request.headers.get("authorization"))
        if not isinstance(grant, Grant):
            return self._unauthorized(request, grant)
        client = grant.client_id
        throttled = self._throttled(client)
        if throttled is not None:
            return throttled
        if not self._concurrency.try_enter(client):
            return _to_response(
                error_response(
                    429,
                    "0x80072326",
                    "Number of concurrent requests exceeded the limit of "
                    f"{self.options.max_concurrent}.",
                ),
                [("Retry-After", "1"), *self._limit_headers(client)],
            )
        started = time.monotonic()
        try:
            response = await self._answer(request, client)
            await self.faults.delay(since=started)  # the answer leaves latency_ms after arrival
            return response
        finally:
            self._concurrency.leave(client)
            self._time_window.add(client, (time.monotonic() - started) * 1000)

    async def _answer(self, request: Request, client: str) -> Response:
        body = await request.body()
        service_root = f"{origin(request)}{API_PREFIX}"
        if request.path_params["path"] == "$batch" and request.method == "POST":
            return await self._batch(request, body, service_root, client)
        self._request_window.add(client, 1)
        api_request = ApiRequest(
            method=request.method,
            # The ASGI server already percent-decoded the path: decoding it again would turn a
            # key value's "%2541" into "A".
            path=request.path_params["path"],
            query=parse_qsl(query_string(request), keep_blank_values=True),
            headers=dict(request.headers.items()),
            body=body,
            service_root=service_root,
        )
        result = await self.store.run(lambda records: self.webapi.execute(records, api_request))
        return _to_response(result, self._limit_headers(client))

    # --- $batch ----------------------------------------------------------------------------

    async def _batch(
        self, request: Request, body: bytes, service_root: str, client: str
    ) -> Response:
        try:
            items = parse_batch(request.headers.get("content-type", ""), body)
        except BatchError as e:
            self._request_window.add(client, 1)
            return _to_response(error_response(400, "0x80060888", str(e)), [])
        # Service protection counts a $batch as one request (its execution time counts in full).
        self._request_window.add(client, 1)
        continue_on_error = "odata.continue-on-error" in request.headers.get("prefer", "").lower()
        results = await self.store.run(
            lambda records: self._run_batch(records, items, service_root, continue_on_error)
        )
        boundary, payload = render_batch(results)
        headers = self._limit_headers(client)
        if continue_on_error:
            headers.append(("Preference-Applied", "odata.continue-on-error"))
        # Without continue-on-error a batch that stopped at a failure answers 400 as a whole,
        # its body the multipart answers up to and including the failing one.
        stopped = not continue_on_error and any(_failed(r) for r in results)
        return _to_response(
            ApiResponse(
                400 if stopped else 200,
                [
                    ("Content-Type", f"multipart/mixed; boundary={boundary}"),
                    ("OData-Version", "4.0"),
                ],
                payload,
            ),
            headers,
        )

    def _part_request(
        self, part: Any, service_root: str, references: dict[str, str]
    ) -> ApiRequest | ApiResponse:
        url = urlsplit(part.url)
        path = url.path
        root_path = urlsplit(service_root).path
        if path.startswith(root_path + "/"):
            path = path[len(root_path) + 1 :]
        elif path.startswith("/") or url.scheme:
            return error_response(
                404, "0x8006088a", f"Resource not found for the segment '{path[:100]}'."
            )
        return ApiRequest(
            method=part.method,
            path=unquote(path),
            query=parse_qsl(url.query, keep_blank_values=True),
            headers=part.headers,
            body=part.body,
            service_root=service_root,
            references=references,
        )

    def _run_one(
        self, records: Records, part: Any, service_root: str, references: dict[str, str]
    ) -> PartResponse:
        api_request = self._part_request(part, service_root, references)
        result = (
            api_request
            if isinstance(api_request, ApiResponse)
            else self.webapi.execute(records, api_request)
        )
        if part.content_id is not None and result.status < 300:
            location = dict(result.headers).get("OData-EntityId")
            if location:
                references[part.content_id] = location.removeprefix(service_root + "/")
        return PartResponse(result.status, result.headers, result.body, part.content_id)

    def _run_batch(
        self,
        records: Records,
        items: list[BatchItem],
        service_root: str,
        continue_on_error: bool,
    ) -> list[PartResponse | list[PartResponse]]:
        results: list[PartResponse | list[PartResponse]] = []
        for item in items:
            if isinstance(item, ChangeSet):
                failed = self._run_change_set(records, item, service_root)
                results.append(failed)
                ok = isinstance(failed, list)
            else:
                response = self._run_one(records, item, service_root, {})
                results.append(response)
                ok = response.status < 400
            if not ok and not continue_on_error:
                break
        return results

    def _run_change_set(
        self, records: Records, change_set: ChangeSet, service_root: str
    ) -> PartResponse | list[PartResponse]:
        """The responses of a change set that committed, or the one error that rolled it back."""
        references: dict[str, str] = {}
        responses: list[PartResponse] = []

        class _RolledBack(Exception):
            def __init__(self, response: PartResponse) -> None:
                self.response = response

        try:
            with records.atomic():
                for part in change_set.requests:
                    response = self._run_one(records, part, service_root, references)
                    if response.status >= 400:
                        raise _RolledBack(response)
                    responses.append(response)
        except _RolledBack as e:
            return e.response
        return responses
