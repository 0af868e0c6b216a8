"""Client of the Dynamics 365 / Dataverse Web API: upserts, deletes, queries and `$batch` writes."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import httpx
import msal

from crmsync.targets._http import (
    TRANSIENT_STATUSES,
    RetryPolicy,
    Session,
    Throttle,
    TokenCache,
    parse_retry_after,
    prefixed,
    short,
)
from crmsync.targets._multipart import (
    BatchRequest,
    BatchResponse,
    ChangeSet,
    count_requests,
    decode_batch,
    encode_batch,
)
from crmsync.targets._transport import Response, Transport, tls_context, transport_error
from crmsync.targets._transport import transport as _transport
from crmsync.targets.errors import Fatal, ParentMissing, RecordRejected, Retryable, SinkError
from crmsync.targets.settings import DynamicsTarget
from crmsync.targets.writes import WriteMode, creates_first, when_created, when_existing

log = logging.getLogger(__name__)

#: A value of a key column (alternate keys may be strings, numbers, booleans or GUIDs).
KeyValue = str | int | float | bool | uuid.UUID
#: A record's identity: its primary id (a GUID) or an alternate key (column → value).
Key = str | uuid.UUID | Mapping[str, KeyValue]
Operation = Literal["write", "delete", "read"]

MAX_BATCH_REQUESTS = 1000  # the documented limit of one $batch
_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
# Dataverse answers 404 0x8006088a "Resource not found for the segment 'x'." for an unknown
# entity set, and "No HTTP resource was found that matches the request URI" for an unknown path.
_MISSING_SET_CODES = frozenset({"0x8006088a"})
_MISSING_SET_TEXTS = ("resource not found for the segment", "no http resource was found")
# Dataverse: "Version stamp associated with the client has expired. Please perform a full sync."
_EXPIRED_CODE = "0x80044352"


#: Characters Dataverse cannot take in an alternate key value in a URL: GET and PATCH by such a key
#: do not work ("Work with alternate keys", define-alternate-keys-entity.md). The client then
#: finds the record's id with a $filter query and writes by id, or creates it with a POST.
URL_REFUSED_KEY_CHARACTERS = frozenset("/<>*%&:\\?+")


def unsafe_key(key: Key | None) -> bool:
    """Whether an alternate key holds a value a URL cannot carry to Dataverse."""
    if not isinstance(key, Mapping):
        return False
    return any(isinstance(v, str) and URL_REFUSED_KEY_CHARACTERS & set(v) for v in key.values())


class NotModified(dict[str, Any]):
    """What ``get`` answers when the record is still the version of the ``etag`` given (304)."""


NOT_MODIFIED = NotModified()


def odata_literal(value: KeyValue) -> str:
    """A key value as an OData URL literal: strings quoted with ``'`` doubled, then URL-encoded."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, int | float):
        return repr(value)
    # Quotes are doubled (the OData escape); everything that would end the path segment or the
    # query (/, ?, #, %, spaces, non-ASCII…) is percent-encoded.
    return "'" + quote(value.replace("'", "''"), safe="'") + "'"


def _filter_literal(value: KeyValue) -> str:
    """A value in a ``$filter`` expression (the query string is encoded as a whole later)."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return odata_literal(value)


def key_segment(key: Key) -> str:
    """``(<guid>)`` for a primary id, ``(k1='x',k2='y')`` for an alternate key."""
    if isinstance(key, uuid.UUID):
        return f"({key})"
    if isinstance(key, str):
        if not _GUID.match(key):
            raise RecordRejected(f"not a GUID: {key!r} (use an alternate key for other ids)")
        return f"({key.lower()})"
    if not key:
        raise RecordRejected("empty alternate key")
    return "(" + ",".join(f"{name}={odata_literal(value)}" for name, value in key.items()) + ")"


def error_message(body: str) -> tuple[str, str]:
    """``(code, message)`` of an OData error body; the raw text when it is not one."""
    try:
        error = json.loads(body).get("error", {})
        return str(error.get("code", "")), str(error.get("message", "")) or short(body)
    except (ValueError, AttributeError):
        return "", short(body)


def classify(
    status: int,
    body: str,
    headers: Mapping[str, str],
    *,
    operation: Operation = "write",
    mode: WriteMode = "upsert",
) -> SinkError | None:
    """What a Dataverse answer means for the record: None = done, else the typed failure.

    ``headers`` must have lower-case names (as the transports and the batch parser give them).
    """
    if 200 <= status < 300:
        return None
    code, message = error_message(body)
    reason = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if status in TRANSIENT_STATUSES or status == 500:
        # A Dataverse 500 is an unhandled platform fault (SQL timeouts, deadlocks): transient.
        return Retryable(reason, parse_retry_after(headers.get("retry-after")))
    if status in (401, 403):
        return Fatal(reason)
    if status == 404:
        if code in _MISSING_SET_CODES or any(t in message.lower() for t in _MISSING_SET_TEXTS):
            return Fatal(reason)  # the table is missing: no record of it can ever be written
        if operation == "delete":
            return None  # already gone: what a delete wants
        return RecordRejected(reason)
    if status == 424:
        return Retryable(reason)  # not executed because another request of its set failed
    if status == 412 and mode == "create":
        # The record exists: a redelivered create-only write was already done.
        return None
    if 400 <= status < 500:
        return RecordRejected(reason)
    return Fatal(f"unexpected answer: {reason}")


def parent_missing(
    status: int,
    body: str,
    fields: Mapping[str, Any] | None,
    mode: WriteMode,
    *,
    update_missing: bool = True,
) -> ParentMissing | None:
    """A 404 "does not exist" for a write that needs another record to exist first, else None.

    Dataverse answers 404 (0x80040217) when an ``@odata.bind`` names a missing record, and when an
    update-only write (``If-Match: *``) finds no record: both usually arrive soon (the contact
    through another workflow), so the runtime parks them instead of dead-lettering them.
    """
    if status != 404 or fields is None:
        return None
    code, message = error_message(body)
    if code in _MISSING_SET_CODES or any(t in message.lower() for t in _MISSING_SET_TEXTS):
        return None
    binds = {k: v for k, v in fields.items() if k.endswith("@odata.bind")}
    if binds:
        named = ", ".join(f"{k[: -len('@odata.bind')]} → {v}" for k, v in binds.items())
        return ParentMissing(f"linked record missing ({named}): HTTP 404 {code}: {message}")
    if mode == "update" and update_missing:
        return ParentMissing(f"the record to update does not exist yet: HTTP 404 {code}: {message}")
    return None


def _transient(response: Response) -> Retryable | None:
    outcome = classify(response.status_code, response.text, response.headers)
    return outcome if isinstance(outcome, Retryable) else None


@dataclass(frozen=True, slots=True)
class Write:
    """One record write as a `$batch` request: an upsert/create/update (PATCH) or a DELETE."""

    entity_set: str
    key: Key | None  # None → a create (POST to the entity set) with the key in the body
    fields: Mapping[str, Any] | None = None  # None → delete
    mode: WriteMode = "upsert"

    @property
    def operation(self) -> Operation:
        return "delete" if self.fields is None else "write"


class BulkUnsupported(RecordRejected):
    """The table does not take a bulk message (``UpsertMultiple``...): write through $batch."""


def _bulk_unsupported(response: Response) -> bool:
    if response.status_code == 501:
        return True
    if response.status_code not in (400, 404):
        return False
    code, message = error_message(response.text)
    text = message.lower()
    return code.lower() in _MISSING_SET_CODES or "not supported" in text


def _json_value(value: KeyValue) -> Any:
    return str(value) if isinstance(value, uuid.UUID) else value


class FullSyncRequired(RecordRejected):
    """The delta token expired or is unknown (0x80044352): only a fresh initial load helps."""


@dataclass(frozen=True, slots=True)
class ChangesPage:
    """One page of change tracking: rows and ``$deletedEntity`` entries, in the server's order,
    and either the next page's link or the delta link to poll next (relative to the API root)."""

    value: list[dict[str, Any]]
    next_link: str | None
    delta_link: str | None


class _MsalHttp:
    """The requests-like HTTP client MSAL calls (synchronously, from a worker thread).

    MSAL (1.39) accepts only https authorities, for any combination of ``validate_authority`` and
    ``instance_discovery``. The local emulator speaks plain http on loopback, so for an ``http://``
    authority MSAL is given its https spelling and this transport sends it over http (rewriting the
    discovery document back), so the emulator exercises the very MSAL code path used in production.
    """

    def __init__(self, timeout_s: float, plain_origin: str | None) -> None:
        self._client = httpx.Client(timeout=timeout_s, verify=tls_context())
        self._plain = plain_origin  # "host:port" served over plain http, or None

    def _wire_url(self, url: str) -> str:
        if self._plain and url.startswith(f"https://{self._plain}/"):
            return "http://" + url[len("https://") :]
        return url

    def _from_wire(self, response: httpx.Response) -> httpx.Response:
        if not self._plain:
            return response
        text = response.text.replace(f"http://{self._plain}/", f"https://{self._plain}/")
        return httpx.Response(
            response.status_code,
            headers={k: v for k, v in response.headers.items() if k.lower() != "content-length"},
            content=text.encode("utf-8"),
            request=response.request,
        )

    def get(
        self,
        url: str,
        params: Any = None,
        headers: Any = None,
        **_: Any,
    ) -> httpx.Response:
        return self._from_wire(
            self._client.get(self._wire_url(url), params=params, headers=headers)
        )

    def post(
        self,
        url: str,
        params: Any = None,
        data: Any = None,
        headers: Any = None,
        **_: Any,
    ) -> httpx.Response:
        content = data if isinstance(data, str | bytes) else None
        form = None if content is not None else data
        response = self._client.post(
            self._wire_url(url), params=params, data=form, content=content, headers=headers
        )
        return self._from_wire(response)

    def close(self) -> None:
        self._client.close()


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_authority(target: DynamicsTarget) -> str:
    """Entra ID for a commercial-cloud ``*.dynamics.com`` org, the emulator's own token endpoint
    for a loopback or plain-http URL (Dataverse itself is https only); any other https host
    (sovereign clouds such as ``*.crm.microsoftdynamics.us``, ``*.crm.dynamics.cn``, or a proxy)
    signs in elsewhere, so its authority must be configured."""
    if target.authority:
        return target.authority.rstrip("/")
    parts = urlsplit(target.url)
    host = parts.hostname or ""
    if host.endswith(".dynamics.com"):
        return f"https://login.microsoftonline.com/{target.tenant}"
    if host in _LOOPBACK or parts.scheme == "http":
        return f"{target.url.rstrip('/')}/{target.tenant}"
    raise Fatal(
        f"no Entra authority known for {host!r}: set the target's authority (sovereign clouds "
        "use their own, e.g. https://login.microsoftonline.us/<tenant>)"
    )


class _EntraTokens:
    """OAuth2 client-credentials tokens from Microsoft Entra ID through MSAL."""

    def __init__(self, target: DynamicsTarget) -> None:
        self._target = target
        authority = default_authority(target)
        parts = urlsplit(authority)
        plain = parts.netloc if parts.scheme == "http" else None
        if plain and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("dynamics authority over plain http authority=%s", authority)
        self._authority = authority.replace("http://", "https://", 1) if plain else authority
        self._scope = target.scope or f"{target.url.rstrip('/')}/.default"
        self._http = _MsalHttp(target.timeout_s, plain)
        self._app: Any = None  # built lazily: MSAL fetches the discovery document on creation

    def _acquire(self) -> dict[str, Any]:
        if self._app is None:
            self._app = msal.ConfidentialClientApplication(
                self._target.client_id,
                client_credential=self._target.client_secret.get_secret_value(),
                authority=self._authority,
                http_client=self._http,
                # The authority is trusted configuration; discovery would call
                # login.microsoftonline.com even for the emulator.
                instance_discovery=False,
            )
        # Our TokenCache decides when a new token is due (also after a 401), so MSAL's own cache
        # must not hand back the token the API just refused.
        cache = self._app.token_cache
        for entry in list(cache.search(cache.CredentialType.ACCESS_TOKEN)):
            cache.remove_at(entry)
        result: dict[str, Any] = self._app.acquire_token_for_client(scopes=[self._scope])
        return result

    async def fetch(self) -> tuple[str, float]:
        try:
            result = await asyncio.to_thread(self._acquire)
        except httpx.HTTPError as error:
            raise transport_error(error, "dynamics token") from error
        except ValueError as error:
            # MSAL raises ValueError when the authority's discovery document is unreachable/absent.
            raise Retryable(f"dynamics token: {short(str(error))}") from error
        if "access_token" in result:
            return str(result["access_token"]), float(result.get("expires_in", 3600))
        error_code = str(result.get("error", ""))
        reason = f"dynamics token: {error_code}: {short(str(result.get('error_description', '')))}"
        # OAuth2 errors meaning the credentials or the request are wrong (asking again won't help).
        if error_code in (
            "invalid_client",
            "unauthorized_client",
            "invalid_scope",
            "invalid_grant",
        ):
            raise Fatal(reason)
        raise Retryable(reason)

    def close(self) -> None:
        self._http.close()


class DynamicsClient:
    """Dataverse Web API v9.2 over one pool of HTTP/1.1 connections.

    Every method raises ``Retryable`` (after the ``retry`` policy's bounded tries),
    ``RecordRejected`` or ``Fatal``; ``batch`` answers one response per request instead. A 429
    pauses every request of the client until ``Retry-After`` has passed; ``x-ms-dop-hint`` lowers
    the concurrency cap.
    """

    def __init__(
        self,
        target: DynamicsTarget,
        *,
        retry: RetryPolicy | None = None,
        max_batch_requests: int = MAX_BATCH_REQUESTS,
        transport: Transport | None = None,
    ) -> None:
        self.target = target
        self.retry = retry or RetryPolicy()
        self.max_batch_requests = min(max_batch_requests, MAX_BATCH_REQUESTS)
        self.api_url = f"{target.url.rstrip('/')}/api/data/{target.api_version}"
        self._api_path = urlsplit(self.api_url).path
        self._origin = self.api_url[: len(self.api_url) - len(self._api_path)]
        self._throttle = Throttle(target.max_concurrency)
        self._http = transport or _transport(
            target.http_client,
            timeout_s=target.timeout_s,
            max_connections=target.max_concurrency,
            headers={
                "Accept": "application/json",
                "OData-MaxVersion": "4.0",
                "OData-Version": "4.0",
            },
        )
        self._entra = _EntraTokens(target)
        self._tables: dict[str, tuple[str, str]] = {}
        self._session = Session(
            "dynamics",
            self._http,
            TokenCache(self._entra.fetch),
            self._throttle,
            self.retry,
            _transient,
        )

    async def __aenter__(self) -> DynamicsClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        self._entra.close()

    def pause(self, seconds: float | None) -> None:
        """Hold every request of this client (a 429 heard inside a `$batch` answer)."""
        self._throttle.pause(self.retry.backoff_base_s if seconds is None else seconds)

    def hold(self) -> None:
        """Start no new request (they raise ``Halted``) until ``release``; sent ones finish."""
        self._throttle.hold()

    def release(self) -> None:
        self._throttle.release()

    @property
    def concurrency(self) -> int:
        """The current concurrency cap (the configured maximum, or lower after a dop hint)."""
        return self._throttle.cap

    # -- requests -----------------------------------------------------------------------------

    def url(self, entity_set: str, key: Key | None = None) -> str:
        """The absolute path of an entity set or of one record in it."""
        path = f"{self._api_path}/{quote(entity_set, safe='')}"
        return path if key is None else path + key_segment(key)

    async def _request(
        self,
        method: str,
        url: str,
        *,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        what: str,
    ) -> Response:
        full = url if url.startswith("http") else self._origin + url
        return await self._session.request(method, full, body=body, headers=headers, what=what)

    async def raw(
        self,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Response:
        """One request with retries and the token, its answer unclassified (metadata)."""
        return await self._request(method, url, body=body, headers=headers, what=what)

    @staticmethod
    def _raise_for(response: Response, what: str, **how: Any) -> None:
        outcome = classify(response.status_code, response.text, response.headers, **how)
        if outcome is not None:
            raise prefixed(outcome, what)

    # -- single-record operations -------------------------------------------------------------

    def write_request(self, write: Write, content_id: str | None = None) -> BatchRequest:
        """The request performing ``write``: PATCH with the mode's condition, or DELETE."""
        if write.key is None:
            assert write.fields is not None, "a create needs fields"
            return BatchRequest("POST", self.url(write.entity_set), {}, write.fields, content_id)
        if unsafe_key(write.key):
            raise ValueError("resolve a key URLs cannot carry first (DynamicsClient.addressable)")
        url = self.url(write.entity_set, write.key)
        if write.fields is None:
            return BatchRequest("DELETE", url, content_id=content_id)
        condition = {"create": {"If-None-Match": "*"}, "update": {"If-Match": "*"}}.get(write.mode)
        return BatchRequest("PATCH", url, condition or {}, write.fields, content_id)

    def first_write(
        self,
        entity_set: str,
        key: Key,
        fields: Mapping[str, Any] | None,
        *,
        mode: WriteMode = "upsert",
        create_fields: Mapping[str, Any] | None = None,
    ) -> Write:
        """The first request of a write (``fields`` None: a delete). With ``create_fields``, a
        create-only write carrying them; ``then_write`` says what follows when it answered 412."""
        if fields is not None and creates_first(create_fields or {}, mode):
            return Write(entity_set, key, when_created(fields, create_fields or {}), "create")
        return Write(entity_set, key, fields, mode)

    @staticmethod
    def then_write(
        entity_set: str, key: Key, fields: Mapping[str, Any], mode: WriteMode
    ) -> Write | None:
        """The second request of a write whose create-only first found the record (412)."""
        existing = when_existing(fields, mode)
        return None if existing is None else Write(entity_set, key, existing, "upsert")

    async def upsert(
        self,
        entity_set: str,
        key: Key,
        fields: Mapping[str, Any],
        *,
        mode: WriteMode = "upsert",
        create_fields: Mapping[str, Any] | None = None,
    ) -> None:
        """Create or update (``mode="create"``/``"update"``: only create / only update).

        ``create_fields`` are written only if the record is created (``crmsync.targets.writes``):
        a create-only PATCH with them, then (when the record existed) an update of ``fields``. A
        bind to a missing record raises ``ParentMissing``; an update-only write of a missing
        record ``RecordRejected`` (the sink reports it ``ParentMissing``).
        """
        first = self.first_write(entity_set, key, fields, mode=mode, create_fields=create_fields)
        resolved = await self.addressable(first)
        if isinstance(resolved, SinkError):
            raise resolved
        if resolved is None or await self._patch(resolved):
            return
        then = await self.addressable(self.then_write(entity_set, key, fields, mode))
        if isinstance(then, SinkError):
            raise then
        if then is not None:
            await self._patch(then)

    async def addressable(self, write: Write | None) -> Write | SinkError | None:
        """``write`` as Dataverse can take it: a key whose values a URL cannot carry is replaced
        by the record's id (found with a ``$filter`` query), or the write becomes a create (POST
        with the key in the body) when there is no such record. None: nothing to write (a
        delete of a record already gone); ``ParentMissing``: an update of a missing record."""
        if write is None or not unsafe_key(write.key):
            return write
        assert isinstance(write.key, Mapping)
        found = await self._find_id(write.entity_set, write.key)
        if found is not None:
            return Write(write.entity_set, found, write.fields, write.mode)
        if write.fields is None:
            return None
        if write.mode == "update":
            return ParentMissing(f"the record to update does not exist yet: {write.entity_set}")
        return Write(write.entity_set, None, {**write.fields, **write.key}, "create")

    async def _addressable(self, write: Write) -> Write | None:
        resolved = await self.addressable(write)
        if isinstance(resolved, SinkError):
            raise resolved
        return resolved

    async def primary_id(self, entity_set: str) -> str:
        """The primary id column of a table (``activityid`` for activities)."""
        return (await self.table(entity_set))[1]

    async def table(self, entity_set: str) -> tuple[str, str]:
        """``(LogicalName, PrimaryIdAttribute)`` of the table behind an entity set, from its
        ``EntityDefinitions`` (read once per entity set)."""
        known = self._tables.get(entity_set)
        if known is not None:
            return known
        params = {
            "$filter": f"EntitySetName eq {_filter_literal(entity_set)}",
            "$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
        }
        url = f"{self._api_path}/EntityDefinitions?" + urlencode(params, safe="$,'")
        what = f"GET EntityDefinitions {entity_set}"
        response = await self._request("GET", url, what=what)
        self._raise_for(response, what, operation="read")
        found = response.json().get("value") or []
        if not found or not found[0].get("PrimaryIdAttribute"):
            raise Fatal(f"{what}: no table has the entity set {entity_set!r}")
        table = (str(found[0]["LogicalName"]), str(found[0]["PrimaryIdAttribute"]))
        self._tables[entity_set] = table
        return table

    async def upsert_multiple(
        self, entity_set: str, items: Sequence[tuple[Key, Mapping[str, Any]]]
    ) -> None:
        """Create or update up to 1,000 records in one ``UpsertMultiple`` call (all or none).

        Each record is named by its primary id or its alternate key values, carried in the body
        (so key values URLs cannot carry are fine here). Raises ``BulkUnsupported`` when the
        table does not take the message (use ``batch``), else as ``upsert`` does, for the call.
        """
        if not items:
            return
        if len(items) > self.max_batch_requests:
            raise ValueError(f"UpsertMultiple takes at most {self.max_batch_requests} records")
        logical, primary = await self.table(entity_set)
        targets = []
        for key, fields in items:
            if isinstance(key, Mapping):
                key_fields: dict[str, Any] = {k: _json_value(v) for k, v in key.items()}
            else:
                key_segment(key)  # refuses what is not a GUID
                key_fields = {primary: str(key).lower()}
            targets.append(
                {"@odata.type": f"Microsoft.Dynamics.CRM.{logical}", **fields, **key_fields}
            )
        what = f"UpsertMultiple {entity_set} of {len(items)}"
        url = f"{self.url(entity_set)}/Microsoft.Dynamics.CRM.UpsertMultiple"
        response = await self._request("POST", url, body={"Targets": targets}, what=what)
        if _bulk_unsupported(response):
            raise BulkUnsupported(f"{what}: HTTP {response.status_code}: {short(response.text)}")
        missing = (
            parent_missing(
                response.status_code, response.text, targets[0], "upsert", update_missing=False
            )
            if any(k.endswith("@odata.bind") for t in targets for k in t)
            else None
        )
        if missing is not None:
            raise prefixed(missing, what)
        self._raise_for(response, what, operation="write")

    async def _find_id(self, entity_set: str, key: Mapping[str, KeyValue]) -> str | None:
        """The id of the record with these key values, through a ``$filter`` query."""
        primary = await self.primary_id(entity_set)
        condition = " and ".join(
            f"{name} eq {_filter_literal(value)}" for name, value in key.items()
        )
        async for record in self.query(entity_set, filter=condition, select=[primary], page_size=2):
            return str(record[primary])
        return None

    async def _patch(self, write: Write) -> bool:
        """One PATCH (a POST for a create with the key in the body); False when a create-only
        write found the record already there."""
        assert write.fields is not None
        request = self.write_request(write)
        what = f"{request.method} {write.entity_set}"
        response = await self._request(
            request.method, request.url, body=write.fields, headers=request.headers, what=what
        )
        missing = parent_missing(
            response.status_code, response.text, write.fields, write.mode, update_missing=False
        )
        if missing is not None:
            raise prefixed(missing, what)
        self._raise_for(response, what, operation="write", mode=write.mode)
        return response.status_code != 412

    async def delete(self, entity_set: str, key: Key, *, etag: str | None = None) -> None:
        """Delete a record; one already gone counts as deleted. With ``etag`` (the
        ``@odata.etag`` read), only that version: a record changed since raises
        ``RecordRejected`` (412)."""
        what = f"DELETE {entity_set}"
        resolved = await self._addressable(Write(entity_set, key, None))
        if resolved is None:
            return
        headers = {"If-Match": etag} if etag else None
        response = await self._request(
            "DELETE", self.url(entity_set, resolved.key), headers=headers, what=what
        )
        self._raise_for(response, what, operation="delete")

    async def get(
        self,
        entity_set: str,
        key: Key,
        *,
        select: Sequence[str] | None = None,
        etag: str | None = None,
    ) -> dict[str, Any] | None:
        """One record, or None when there is none with that key. With ``etag`` (an
        ``@odata.etag`` read before), ``NOT_MODIFIED`` when the record is still that version."""
        if unsafe_key(key):
            resolved = await self._find_id(entity_set, key)  # type: ignore[arg-type]
            if resolved is None:
                return None
            key = resolved
        url = self.url(entity_set, key)
        if select:
            url += "?" + urlencode({"$select": ",".join(select)}, safe="$,")
        what = f"GET {entity_set}"
        headers = {"If-None-Match": etag} if etag else None
        response = await self._request("GET", url, headers=headers, what=what)
        if response.status_code == 304:
            return NOT_MODIFIED
        outcome = classify(response.status_code, response.text, response.headers, operation="read")
        if isinstance(outcome, RecordRejected) and response.status_code == 404:
            return None
        self._raise_for(response, what, operation="read")
        record: dict[str, Any] = response.json()
        return record

    async def query(
        self,
        entity_set: str,
        *,
        filter: str | None = None,
        select: Sequence[str] | None = None,
        top: int | None = None,
        orderby: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every matching record, following ``@odata.nextLink`` page after page."""
        params: dict[str, str] = {}
        if filter:
            params["$filter"] = filter
        if select:
            params["$select"] = ",".join(select)
        if top is not None:
            params["$top"] = str(top)
        if orderby:
            params["$orderby"] = orderby
        headers = {"Prefer": f"odata.maxpagesize={page_size}"} if page_size else {}
        url: str | None = self.url(entity_set) + ("?" + urlencode(params) if params else "")
        what = f"GET {entity_set}"
        # The service ignores $top when odata.maxpagesize is sent: the client stops at top itself.
        remaining = top
        while url:
            response = await self._request("GET", url, headers=headers, what=what)
            self._raise_for(response, what, operation="read")
            page = response.json()
            for record in page.get("value", []):
                if remaining is not None:
                    if remaining <= 0:
                        return
                    remaining -= 1
                yield record
            if remaining is not None and remaining <= 0:
                return
            next_link = page.get("@odata.nextLink")
            url = self._own_link(next_link) if next_link else None  # never our token elsewhere

    # -- change tracking ---------------------------------------------------------------------

    async def read_changes(
        self,
        entity_set: str | None = None,
        *,
        link: str | None = None,
        select: Sequence[str] | None = None,
        page_size: int | None = None,
    ) -> ChangesPage:
        """One page of change tracking (``Prefer: odata.track-changes``).

        Without ``link``: the first page of an initial load of ``entity_set``. With ``link``: the
        page at a ``@odata.nextLink`` or ``@odata.deltaLink`` this client returned (absolute, or
        relative to the API root as ``relative_link`` spells it). A token the server no longer
        knows raises ``FullSyncRequired``; other refusals are classified as for any read.
        """
        if link is not None:
            url = self._own_link(link)
            what = f"GET {link.split('?', 1)[0].rsplit('/', 1)[-1]} changes"
        elif entity_set is not None:
            url = self.url(entity_set)
            if select:
                url += "?" + urlencode({"$select": ",".join(select)}, safe="$,")
            what = f"GET {entity_set} changes"
        else:
            raise ValueError("read_changes needs an entity set or a link")
        prefer = "odata.track-changes" + (f",odata.maxpagesize={page_size}" if page_size else "")
        response = await self._request("GET", url, headers={"Prefer": prefer}, what=what)
        if response.status_code == 400:
            code, message = error_message(response.text)
            if code.lower() == _EXPIRED_CODE or "perform a full sync" in message.lower():
                raise FullSyncRequired(f"{what}: HTTP 400 {code}: {message}")
        self._raise_for(response, what, operation="read")
        page = response.json()
        next_link, delta_link = page.get("@odata.nextLink"), page.get("@odata.deltaLink")
        return ChangesPage(
            list(page.get("value", [])),
            self.relative_link(next_link) if next_link else None,
            self.relative_link(delta_link) if delta_link else None,
        )

    def relative_link(self, link: str) -> str:
        """A link of this API without its origin and root (``contacts?$deltatoken=...``), so a
        stored link survives a change of host name or port."""
        path = link
        if link.startswith(("http://", "https://")):
            parts = urlsplit(link)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        prefix = self._api_path.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise Fatal(f"link outside the Web API {self.api_url}: {short(link)}")
        return path[len(prefix) :]

    def _own_link(self, link: str) -> str:
        """The absolute path of a link; a link to another host is refused (it would get our
        bearer token)."""
        if link.startswith(("http://", "https://")):
            origin = urlsplit(link)
            if f"{origin.scheme}://{origin.netloc}".lower() != self._origin.lower():
                raise Fatal(f"link to another host refused: {short(link)}")
            return self._api_path.rstrip("/") + "/" + self.relative_link(link)
        return self._api_path.rstrip("/") + "/" + link.lstrip("/")

    # -- $batch -------------------------------------------------------------------------------

    async def batch(
        self, items: Sequence[BatchRequest | ChangeSet], *, continue_on_error: bool = True
    ) -> list[BatchResponse]:
        """Send requests through `$batch`: one response per request, in order.

        More than ``max_batch_requests`` requests are split into several batches (a change set is
        never split). Requests the server did not answer (a batch that stopped at a failure
        without ``continue_on_error``) come back as a synthetic 424 response.
        """
        chunks: list[list[BatchRequest | ChangeSet]] = [[]]
        for item in items:
            size = count_requests([item])
            if size > self.max_batch_requests:
                raise ValueError(f"a change set of {size} requests exceeds the batch limit")
            if count_requests(chunks[-1]) + size > self.max_batch_requests:
                chunks.append([])
            chunks[-1].append(item)
        chunks = [chunk for chunk in chunks if chunk]
        if continue_on_error:
            # Independent requests (one per key, see DynamicsSink): the chunks may run side by side.
            answers = await asyncio.gather(*(self._batch_once(c, True) for c in chunks))
        else:
            answers = [await self._batch_once(c, False) for c in chunks]
        return [response for answer in answers for response in answer]

    async def _batch_once(
        self, items: Sequence[BatchRequest | ChangeSet], continue_on_error: bool
    ) -> list[BatchResponse]:
        requests = [r for i in items for r in (i.requests if isinstance(i, ChangeSet) else [i])]
        content_type, body = encode_batch(items)
        headers = {"Content-Type": content_type}
        if continue_on_error:
            headers["Prefer"] = "odata.continue-on-error"
        what = f"$batch of {len(requests)}"
        response = await self._session.request(
            "POST", f"{self.api_url}/$batch", content=body, headers=headers, what=what
        )
        content_type = response.headers.get("content-type", "")
        if response.status_code == 400 and content_type.startswith("multipart/"):
            # Without continue-on-error the batch stopped at a failure and says so with an outer
            # 400 whose body holds the answers up to it; the rest were not run (424). A change
            # set in it is never split: it was not committed, so it is sent again as it is.
            answers = decode_batch(content_type, response.content)
            return _match(requests, answers)
        if response.status_code in (400, 413) and len(items) > 1:
            # The whole batch was refused (one unparsable request, or too large): isolate the
            # culprit by sending each item on its own (a change set stays whole, so atomic).
            log.warning(
                "dynamics batch refused, sending its items one by one status=%d",
                response.status_code,
                extra={"status": response.status_code},
            )
            answers_by_item = [await self._item_alone(item, continue_on_error) for item in items]
            return [answer for answered in answers_by_item for answer in answered]
        self._raise_for(response, what, operation="write")
        answers = decode_batch(content_type, response.content)
        return _match(requests, answers)

    async def _item_alone(
        self, item: BatchRequest | ChangeSet, continue_on_error: bool
    ) -> list[BatchResponse]:
        if isinstance(item, ChangeSet):
            return await self._batch_once([item], continue_on_error)
        return [await self._single(item)]

    async def _single(self, request: BatchRequest) -> BatchResponse:
        """A batch request sent on its own, its answer in batch form."""
        what = f"{request.method} {request.url}"
        try:
            response = await self._request(
                request.method, request.url, body=request.body, headers=request.headers, what=what
            )
        except Retryable as error:
            headers_out = (
                {} if error.retry_after is None else {"retry-after": str(error.retry_after)}
            )
            body = json.dumps({"error": {"code": "", "message": error.reason}})
            return BatchResponse(503, headers_out, body, request.content_id)
        return BatchResponse(
            response.status_code, dict(response.headers), response.text, request.content_id
        )


def _match(
    requests: Sequence[BatchRequest], answers: Sequence[BatchResponse]
) -> list[BatchResponse]:
    """Line answers up with requests: by Content-ID where echoed, else by position.

    A failed change set is answered by a single response (carrying the failing request's
    Content-ID): its other members are reported as 424 Failed Dependency.
    """
    by_id = {a.content_id: a for a in answers if a.content_id}
    ids = [r.content_id or str(n) for n, r in enumerate(requests, 1)]
    if by_id and all(i in by_id for i in ids):
        return [by_id[i] for i in ids]
    if len(answers) == len(requests) and not by_id:
        return list(answers)
    matched: list[BatchResponse] = []
    positional = iter(a for a in answers if not a.content_id)
    for content_id in ids:
        answer = by_id.get(content_id) or next(positional, None)
        if answer is None:
            body = json.dumps({"error": {"code": "", "message": "not executed (no answer)"}})
            answer = BatchResponse(424, {}, body, content_id)
        matched.append(answer)
    return matched
