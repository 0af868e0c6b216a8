"""The Campaign Standard REST API emulator: IMS token endpoint, profiles, custom resources.

Lookups: `GET .../profile/byEmail?email=...`,
`GET .../profile/byExternalId?externalId_parameter=...` and, for a custom resource with a key,
`GET .../<root>/<name>/by<Key>?<key>_parameter=...` (e.g.
`profileAndServicesExt/cusPurchase/byPurchaseId?purchaseId_parameter=...`). A custom resource
linked to the profile is served only under `profileAndServicesExt/`, an unlinked one only under
`customResources/`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from crmsync.deploy.emulators.admin import FieldChange, admin_routes, field_change
from crmsync.deploy.emulators.asgi import ApiFirst, JSONResponse, origin
from crmsync.deploy.emulators.faults import Faults, Injected, retry_after_header
from crmsync.deploy.emulators.limits import InFlight, SlidingWindow
from crmsync.deploy.emulators.model import (
    CAMPAIGN_DATETIME,
    FieldDef,
    FieldType,
    InvalidValue,
    Resource,
    campaign_model,
    now_text,
)
from crmsync.deploy.emulators.store import (
    DuplicateKey,
    Records,
    Row,
    Store,
    folded,
    key_value,
    signing_key,
)
from crmsync.deploy.emulators.tokens import Grant, TokenIssuer

#: The metadata mechanism's high-level "type" and technical "resType" of each field type.
_RESOURCE_TYPES = {
    FieldType.STRING: ("string", "string"),
    FieldType.BOOL: ("boolean", "boolean"),
    FieldType.INT: ("long", "int32"),
    FieldType.DECIMAL: ("double", "double"),
    FieldType.DATETIME: ("datetime", "datetime"),
    FieldType.GUID: ("string", "uuid"),
    FieldType.LOOKUP: ("link", "link"),
    FieldType.LINK: ("link", "link"),
}
_WRONG_URI = "Oops. Something went wrong. Check your URI and try again."
_DEFAULT_LINES = 25
_MAX_LINES = 1000


@dataclass(frozen=True)
class CampaignOptions:
    """Knobs of the Campaign emulator (pass as `campaign_<name>=` to running_emulators)."""

    token_lifetime_s: float = 86_399
    requests_per_window: int = 60_000
    window_s: float = 60
    #: Campaign's XtkBigTableThreshold: lists of larger tables have no `next` without
    #: `_forcePagination=true` (pagination docs).
    big_table_threshold: int = 100_000
    model: Path | None = None
    extra_resources: tuple[Resource, ...] = ()


class CampaignError(Exception):
    """An answer other than success, already in the Campaign error shape."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message", ""))
        self.status = status
        self.body = body


def _rst(status: int, code: str, detail: str) -> CampaignError:
    return CampaignError(
        status,
        {
            "code": status,
            "error_code": code,
            "message": f"{code} An error has occurred - please contact your administrator. "
            f"{detail}",
        },
    )


def _rejected(detail: str) -> CampaignError:
    # The real API answers 500 for invalid or read-only properties; the RST code marks it as a
    # rejected record rather than a server fault.
    return _rst(500, "RST-360011", detail)


def _not_found(what: str) -> CampaignError:
    return _rst(404, "RST-360003", f"{what} not found.")


def _gateway(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


def _new_pkey() -> str:
    return "@" + base64.urlsafe_b64encode(secrets.token_bytes(48)).decode().rstrip("=")


def _page_token(rid: int) -> str:
    return "@" + base64.urlsafe_b64encode(f"rid:{rid}".encode()).decode().rstrip("=")


def _read_page_token(text: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(text[1:] + "=" * (-len(text[1:]) % 4)).decode()
        kind, _, rid = raw.partition(":")
        if not text.startswith("@") or kind != "rid" or not rid.isdigit():
            raise ValueError
        return int(rid)
    except (ValueError, UnicodeDecodeError):
        raise _rst(400, "RST-360012", f"Invalid _lineStart value '{text[:100]}'.") from None


@dataclass(frozen=True)
class _Target:
    """What a URL names: a resource (through one of its paths), maybe one record or a filter."""

    resource: Resource
    collection_path: str
    extension: bool
    pkey: str | None = None
    filter_name: str | None = None
    counting: bool = False  # `.../_count`: the number of records of the list
    metadata: bool = False  # `<root>/resourceType/<name>`: the resource's description


class CampaignEmulator:
    """One Campaign Standard instance: its store, tokens, throttling and faults, served by `app`."""

    def __init__(
        self,
        db_path: Path,
        *,
        org: str = "local",
        client_id: str = "crmsync-local",
        client_secret: str = "crmsync-local",
        options: CampaignOptions | None = None,
    ) -> None:
        self.options = options or CampaignOptions()
        self.org = org
        self.client_id = client_id
        self.client_secret = client_secret
        self.resources = campaign_model(self.options.model, list(self.options.extra_resources))
        indexes = [
            f"CREATE INDEX IF NOT EXISTS ix_{r.name}_{field} ON records (kind, {folded(field)})"
            for r in self.resources.values()
            for field, _ in r.all_filters().values()
        ]
        self.store = Store(db_path, indexes)
        self.faults = Faults()
        self.requests = 0
        self.in_flight = InFlight()
        self.tokens = TokenIssuer(b"", "", "campaign", self.options.token_lifetime_s)
        self._window = SlidingWindow(self.options.requests_per_window, self.options.window_s)
        api = Route(
            "/{org}/campaign/{path:path}",
            self._api,
            methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
        )
        self.starlette = Starlette(
            routes=[
                Route("/ims/token/v3", self._token, methods=["POST"]),
                *admin_routes(self),
                Route(
                    "/_admin/resources/{name}/filters/{filter}",
                    self._drop_filter,
                    methods=["DELETE"],
                ),
                Route(
                    "/_admin/resources/{name}/filters/{filter}",
                    self._define_filter,
                    methods=["PUT"],
                ),
                Route(
                    "/_admin/resources/{name}/fields/{field}",
                    self._drop_field,
                    methods=["DELETE"],
                ),
                Route(
                    "/_admin/resources/{name}/fields/{field}",
                    self._change_field,
                    methods=["PATCH", "PUT"],
                ),
                api,
            ]
        )
        self.app = ApiFirst(self.starlette, api)

    async def open(self) -> None:
        await self.store.open()
        key = await self.store.run(lambda records: signing_key(records, TokenIssuer.new_key))
        self.tokens = TokenIssuer(
            key.encode(), f"ims/{self.org}", "campaign", self.options.token_lifetime_s
        )

    async def close(self) -> None:
        await self.store.close()

    # --- admin -----------------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        stored = await self.store.run(lambda records: records.counts())
        return {name: stored.get(name, 0) for name in self.resources}

    async def reset(self) -> None:
        await self.store.run(lambda records: records.wipe())
        self._window.reset()
        self.requests = 0
        self.in_flight.reset()

    async def _drop_filter(self, request: Request) -> Response:
        """Drift for tests: a resource loses a custom filter (as if removed in Campaign's UI)."""
        resource = self.resources.get(request.path_params["name"])
        name = request.path_params["filter"]
        if resource is None or name not in resource.all_filters():
            return JSONResponse({"error": "no such resource or filter"}, status_code=404)
        filters = {k: v for k, v in resource.filters.items() if k != name}
        key_filter = resource.key_filter()
        key = None if key_filter is not None and key_filter[0] == name else resource.key
        self.resources[resource.name] = Resource.model_validate(
            {**resource.model_dump(), "filters": filters, "key": key}
        )
        return JSONResponse({"resource": resource.name, "filters": sorted(filters)})

    def revoke_tokens(self) -> None:
        self.tokens.revoke_all()

    def set_token_lifetime(self, seconds: float | None) -> None:
        self.tokens.lifetime_s = seconds or self.options.token_lifetime_s

    # --- IMS -------------------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        try:
            form = await request.form()
        except Exception:  # python-multipart raises several types on garbage bodies
            return JSONResponse(
                {"error": "invalid_request", "error_description": "malformed request body"}, 400
            )
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        await form.close()
        for required in ("grant_type", "client_id", "client_secret", "scope"):
            if not fields.get(required):
                return JSONResponse(
                    {"error": "invalid_request", "error_description": f"missing {required}"},
                    400,
                )
        if fields["grant_type"] != "client_credentials":
            return JSONResponse(
                {"error": "unsupported_grant_type", "error_description": "unsupported grant"}, 400
            )
        if fields["client_id"] != self.client_id:
            return JSONResponse(
                {"error": "invalid_client", "error_description": "invalid client_id parameter"},
                400,
            )
        if fields["client_secret"] != self.client_secret:
            return JSONResponse(
                {"error": "invalid_client", "error_description": "invalid client_secret parameter"},
                401,
            )
        token, lifetime = self.tokens.issue(self.client_id)
        return JSONResponse(
            {"access_token": token, "token_type": "bearer", "expires_in": lifetime},
            headers={"Cache-Control": "no-store"},
        )

    # --- API -------------------------------------------------------------------------------

    def _injected(self, injected: Injected) -> Response:
        headers = {}
        if injected.retry_after_s is not None:
            headers["Retry-After"] = retry_after_header(injected.retry_after_s)
        if injected.status == 429:
            return JSONResponse(
                {"error_code": "429050", "message": "Too many requests"}, 429, headers
            )
        if injected.status == 500:
            # Campaign's generic answer to an unexpected failure carries an RST code and no cause.
            return JSONResponse(
                {
                    "code": 500,
                    "error_code": "RST-360011",
                    "message": "RST-360011 An error has occurred - please contact your "
                    f"administrator. ({injected.reason})",
                },
                500,
                headers,
            )
        return JSONResponse(
            {"code": injected.status, "message": f"Service error ({injected.reason})"},
            injected.status,
            headers,
        )

    async def _api(self, request: Request) -> Response:
        with self.in_flight:
            return await self._serve(request)

    async def _serve(self, request: Request) -> Response:
        self.requests += 1
        injected = self.faults.failure()
        if injected is not None:
            return self._injected(injected)
        api_key = request.headers.get("x-api-key")
        if not api_key:
            return _gateway(403, "403000", "Api Key is required")
        if api_key != self.client_id:
            return _gateway(403, "403003", "Api Key is invalid")
        grant = self.tokens.check(request.headers.get("authorization"))
        if not isinstance(grant, Grant):
            return _gateway(401, "401013", "Oauth token is not valid")
        retry = self._window.retry_after(grant.client_id)
        if retry is not None:
            return JSONResponse(
                {"error_code": "429050", "message": "Too many requests"},
                429,
                {"Retry-After": retry_after_header(retry)},
            )
        self._window.add(grant.client_id, 1)
        if request.path_params["org"] != self.org:
            # What Adobe I/O answers for an org it does not route (API troubleshooting page).
            return JSONResponse(
                {
                    "code": 500,
                    "message": "Oops. Something went wrong. Check your URI and try again.",
                },
                500,
            )
        arrived = time.monotonic()
        response = await self._answer(request)
        await self.faults.delay(since=arrived)  # the answer leaves latency_ms after arrival
        return response

    async def _answer(self, request: Request) -> Response:
        body = await request.body()
        base = f"{origin(request)}/{self.org}/campaign"
        query = list(request.query_params.multi_items())
        try:
            target = self._route(request.path_params["path"])
            status, payload = await self.store.run(
                lambda records: self._execute(records, request.method, target, query, body, base)
            )
        except CampaignError as e:
            return JSONResponse(e.body, e.status)
        if payload is None:
            return Response(status_code=status)
        return JSONResponse(payload, status)

    def _route(self, path: str) -> _Target:
        segments = [s for s in path.split("/") if s]
        roots = ("profileAndServices", "profileAndServicesExt", "customResources")
        if len(segments) == 3 and segments[0] in roots and segments[1] == "resourceType":
            # The metadata mechanism: served where the resource itself is served.
            return dataclasses.replace(self._route(f"{segments[0]}/{segments[2]}"), metadata=True)
        if len(segments) < 2 or segments[0] not in roots:
            raise _not_found(f"Resource '{path[:100]}'")
        root, name = segments[0], segments[1]
        resource_or_none = self.resources.get(name)
        # The profile lives under both profileAndServices roots; a custom resource linked to the
        # profile only under profileAndServicesExt, an unlinked one only under customResources.
        if resource_or_none is None:
            served = False
        elif name == "profile":
            served = root != "customResources"
        elif resource_or_none.linked_to_profile:
            served = root == "profileAndServicesExt"
        else:
            served = root == "customResources"
        if resource_or_none is None or not served:
            raise _not_found(f"Resource '{root}/{name[:100]}'")
        resource, collection = resource_or_none, f"{root}/{name}"
        extension = root != "profileAndServices"
        rest = segments[2:]
        counting = bool(rest) and rest[-1] == "_count"
        if counting:
            rest = rest[:-1]
        if not rest:
            return _Target(resource, collection, extension, counting=counting)
        if len(rest) == 1 and rest[0] in resource.all_filters():
            return _Target(resource, collection, extension, filter_name=rest[0], counting=counting)
        if len(rest) == 1 and rest[0].startswith("@"):
            return _Target(resource, collection, extension, pkey=rest[0])
        raise _not_found(f"Resource '{path[:100]}'")

    def _execute(
        self,
        records: Records,
        method: str,
        target: _Target,
        query: list[tuple[str, str]],
        body: bytes,
        base: str,
    ) -> tuple[int, Any]:
        resource = target.resource
        if target.metadata:
            if method == "GET":
                return 200, self._resource_type(target, base)
        elif target.pkey is None and target.filter_name is None:
            if method == "GET":
                return 200, self._list(records, target, query, base, "1", [])
            if method == "POST":
                row = self._save(records, target, _new_pkey(), {}, self._parse(target, body))
                return 201, self._render(records, target, row, base)
        elif target.filter_name is not None:
            if method == "GET":
                field, parameter = resource.all_filters()[target.filter_name]
                value = dict(query).get(parameter)
                if value is None:
                    raise _rst(400, "RST-360012", f"Missing filter parameter '{parameter}'.")
                return 200, self._list(
                    records, target, query, base, f"{folded(field)} = ?", [value.lower()]
                )
        elif target.pkey is not None:
            existing = records.get(resource.name, target.pkey)
            if existing is None:
                raise _not_found(f"{resource.name} '{target.pkey[:100]}'")
            if method == "GET":
                return 200, self._render(records, target, existing, base)
            if method in ("PATCH", "PUT"):
                self._save(records, target, existing.id, existing.doc, self._parse(target, body))
                return 200, {
                    "PKey": existing.id,
                    "href": f"{base}/{target.collection_path}/{existing.id}",
                }
            if method == "DELETE":
                records.delete(resource.name, existing.id)
                return 200, None
        raise _rst(405, "RST-360013", f"Method {method} is not allowed here.")

    def _parse(self, target: _Target, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise _rst(400, "RST-360012", "The request body is not valid JSON.") from None
        if not isinstance(payload, dict):
            raise _rst(400, "RST-360012", "The request body must be a JSON object.")
        resource = target.resource
        changes: dict[str, Any] = {}
        for name, value in payload.items():
            field = resource.by_name.get(name)
            if field is None or (field.extension and not target.extension):
                raise _rejected(
                    f"Property '{name[:100]}' is unknown for resource '{resource.name}'."
                )
            if field.read_only:
                raise _rejected(f"Property '{name}' of resource '{resource.name}' is read-only.")
            if field.type is FieldType.LINK:
                changes[field.name] = self._link_pkey(field.name, value)
                continue
            try:
                changes[field.name] = field.coerce(value, CAMPAIGN_DATETIME)
            except InvalidValue as e:
                raise _rejected(f"Invalid value for property '{name}': {e.detail}") from None
        return changes

    @staticmethod
    def _link_pkey(name: str, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, dict) and isinstance(value.get("PKey"), str) and len(value) <= 2:
            return str(value["PKey"])
        raise _rejected(f'Property \'{name}\' must be a link {{"PKey": "..."}}.')

    def _save(
        self,
        records: Records,
        target: _Target,
        pkey: str,
        existing: dict[str, Any],
        changes: dict[str, Any],
    ) -> Row:
        resource = target.resource
        for field in resource.fields:
            if field.type is FieldType.LINK and changes.get(field.name) is not None:
                linked = records.get(field.target or "", changes[field.name])
                if linked is None:
                    raise _rejected(
                        f"The link '{field.name}' references no existing '{field.target}'."
                    )
        now = now_text(CAMPAIGN_DATETIME)
        doc = {**existing, **changes, "lastModified": now}
        doc.setdefault("created", now)
        keys = {}
        if resource.key and doc.get(resource.key) is not None:
            keys[resource.key] = key_value([doc[resource.key]])
        try:
            return records.save(resource.name, pkey, doc, keys)
        except DuplicateKey:
            # A duplicate key is a 500 without any RST code.
            raise CampaignError(
                500,
                {
                    "code": 500,
                    "message": "PGS-220000 PostgreSQL error: ERROR:  duplicate key value violates "
                    f'unique constraint "{resource.name.lower()}_{resource.key}"',
                },
            ) from None

    def _render(self, records: Records, target: _Target, row: Row, base: str) -> dict[str, Any]:
        out: dict[str, Any] = {"PKey": row.id, "href": f"{base}/{target.collection_path}/{row.id}"}
        for field in target.resource.fields:
            if field.extension and not target.extension:
                continue
            value = row.doc.get(field.name)
            if field.type is FieldType.LINK:
                value = (
                    None
                    if value is None
                    else {
                        "PKey": value,
                        "href": f"{base}/{self._collection_of(field.target or '')}/{value}",
                    }
                )
            out[field.name] = value
            for alias in field.aliases:
                out[alias] = value
        return out

    def _resource_type(self, target: _Target, base: str) -> dict[str, Any]:
        """``GET <root>/resourceType/<name>``: the resource's fields under ``content`` (each with
        its ``apiName``, ``type``, ``resType``, ``category``; ``resTarget`` for a link), as the
        metadata mechanism documents it. The profile's extension fields are in it only under
        ``profileAndServicesExt``, like in the records."""
        resource = target.resource
        content: dict[str, Any] = {}
        for field in resource.fields:
            if field.extension and not target.extension:
                continue
            kind, res_type = _RESOURCE_TYPES[field.type]
            described: dict[str, Any] = {
                "apiName": field.name,
                "label": field.name,
                "type": kind,
                "resType": res_type,
                "category": "Extension" if field.extension else "General",
                "readOnly": field.read_only,
            }
            if field.max_length is not None:
                described["length"] = field.max_length
            if field.type is FieldType.LINK:
                described["resTarget"] = field.target
            content[field.name] = described
        return {
            "content": content,
            "data": f"/{target.collection_path}/",
            "href": f"{base}/{target.collection_path}/metadata",
            "label": resource.name,
            "mandatory": False,
            "name": resource.name,
            "readOnly": False,
            "type": "item",
        }

    async def _drop_field(self, request: Request) -> Response:
        """Drift for tests: a resource loses a field (as if removed from its extension)."""
        resource = self.resources.get(request.path_params["name"])
        name = request.path_params["field"]
        if resource is None or name not in {f.name for f in resource.fields}:
            return JSONResponse({"error": "no such resource or field"}, status_code=404)
        fields = [f.model_dump() for f in resource.fields if f.name != name]
        key = None if resource.key == name else resource.key
        filters = {k: v for k, v in resource.filters.items() if v[0] != name}
        self.resources[resource.name] = Resource.model_validate(
            {**resource.model_dump(), "fields": fields, "key": key, "filters": filters}
        )
        return JSONResponse({"resource": resource.name, "fields": [f["name"] for f in fields]})

    async def _change_field(self, request: Request) -> Response:
        """Drift for tests: ``PATCH`` changes a field's type or length, ``PUT`` adds it (back)
        with the body's type and length, as an admin does in the resource's Data structure
        before publishing."""
        change = await field_change(request)
        if isinstance(change, Response):
            return change
        resource = self.resources.get(request.path_params["name"])
        name = request.path_params["field"]
        present = resource is not None and name in {f.name for f in resource.fields}
        if resource is None or (request.method == "PATCH") != present:
            what = "no such resource or field" if request.method == "PATCH" else "field exists"
            return JSONResponse({"error": what}, status_code=404 if not present else 409)
        if present:
            fields = [change.applied(f) if f.name == name else f for f in resource.fields]
        else:
            added = FieldChange(
                **{"type": FieldType.STRING, **change.model_dump(exclude_unset=True)}
            )
            fields = [*resource.fields, added.applied(FieldDef(name=name, type=FieldType.STRING))]
        self.resources[resource.name] = Resource.model_validate(
            {**resource.model_dump(), "fields": [f.model_dump() for f in fields]}
        )
        (field,) = [f for f in fields if f.name == name]
        return JSONResponse({"resource": resource.name, "field": field.model_dump(mode="json")})

    async def _define_filter(self, request: Request) -> Response:
        """Drift for tests: a custom filter (back) on a resource, body ``{"field": ...,
        "parameter": ...}``."""
        resource = self.resources.get(request.path_params["name"])
        try:
            body = json.loads(await request.body() or b"{}")
            field, parameter = str(body["field"]), str(body["parameter"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'send {"field": ..., "parameter": ...}'}, 422)
        if resource is None or field not in {f.name for f in resource.fields}:
            return JSONResponse({"error": "no such resource or field"}, status_code=404)
        filters = {**resource.filters, request.path_params["filter"]: (field, parameter)}
        self.resources[resource.name] = Resource.model_validate(
            {**resource.model_dump(), "filters": filters}
        )
        return JSONResponse({"resource": resource.name, "filters": sorted(filters)})

    def _collection_of(self, resource_name: str) -> str:
        if resource_name == "profile":
            return "profileAndServices/profile"
        resource = self.resources.get(resource_name)
        linked = resource is not None and resource.linked_to_profile
        root = "profileAndServicesExt" if linked else "customResources"
        return f"{root}/{resource_name}"

    def _list(
        self,
        records: Records,
        target: _Target,
        query: list[tuple[str, str]],
        base: str,
        where: str,
        params: list[Any],
    ) -> dict[str, Any]:
        options = dict(query)
        if target.counting:
            return {"count": records.count(target.resource.name, where, params)}
        count_text = options.get("_lineCount", str(_DEFAULT_LINES))
        if not count_text.isdigit() or not 1 <= int(count_text) <= _MAX_LINES:
            raise _rst(400, "RST-360012", f"Invalid _lineCount value '{count_text[:50]}'.")
        count = int(count_text)
        if "_lineStart" in options:
            where = f"({where}) AND rid >= ?"
            params = [*params, _read_page_token(options["_lineStart"])]
        rows = records.query(target.resource.name, where, params, limit=count + 1)
        page: dict[str, Any] = {
            "content": [self._render(records, target, r, base) for r in rows[:count]]
        }
        path = target.collection_path
        if target.filter_name:
            path = f"{path}/{target.filter_name}"
        big = records.count(target.resource.name) > self.options.big_table_threshold
        forced = options.get("_forcePagination", "").lower() == "true"
        if len(rows) > count and (forced or not big):
            next_query = [(k, v) for k, v in query if k not in ("_lineCount", "_lineStart")]
            next_query += [("_lineCount", str(count)), ("_lineStart", _page_token(rows[count].rid))]
            page["next"] = {
                "href": f"{base}/{path}?{urlencode(next_query, quote_via=quote, safe='@')}"
            }
        count_query = [(k, v) for k, v in query if k not in ("_lineCount", "_forcePagination")]
        count_href = f"{base}/{path}/_count"
        if count_query:
            count_href += "?" + urlencode(count_query, quote_via=quote, safe="@")
        page["count"] = {"href": count_href}
        page["serverSidePagination"] = True
        return page
