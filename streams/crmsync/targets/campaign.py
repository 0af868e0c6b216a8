"""Client of the Adobe Campaign Standard REST API: profile and custom-resource upserts by key."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlencode, urljoin, urlsplit

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
from crmsync.targets._transport import Response, Transport
from crmsync.targets._transport import transport as _transport
from crmsync.targets.errors import (
    Fatal,
    NotFound,
    ParentMissing,
    RecordRejected,
    Retryable,
    SinkError,
)
from crmsync.targets.settings import CampaignTarget
from crmsync.targets.writes import WriteMode, when_created, when_existing

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProfileLink:
    """A Campaign field value meaning "the profile whose externalId is ``external_id``".

    The client resolves it to ``{"PKey": ...}`` (a custom resource's link to its profile).
    """

    external_id: str


PROFILE = "profileAndServicesExt/profile"
PROFILE_RESOURCES = ("profileAndServices/profile", "profileAndServicesExt/profile")
Place = Literal["record", "resource"]

# Campaign answers 500 for many things, and its codes do not tell them apart: `RST-360011 An error
# has occurred` is also the generic answer to an unexpected failure, a duplicate key carries no RST
# code, and after the move to Campaign v8 no message carries a code. So a 500 is classified by what
# its text says (custom-resources/troubleshooting pages of the API docs, notes/target-apis.md).
VALIDATION_MARKERS = re.compile(
    r"not valid|isn't valid|read[- ]only|invalid|too long|exceeds|unknown (?:property|field)|"
    r"is unknown|isn't defined|is not defined|must be a link|references no existing",
    re.IGNORECASE,
)
DUPLICATE_MARKERS = re.compile(r"duplicate key|already exists|unique constraint", re.IGNORECASE)
#: Adobe I/O's answer for an org or path it does not know: `{"code":500, "message":"Oops.
#: Something went wrong. Check your URI and try again."}` (API troubleshooting page).
WRONG_URI_MARKER = re.compile(r"check your uri", re.IGNORECASE)


class ServerFault(Retryable):
    """A 500 whose text names no cause: worth a few more tries, then the record is dead-lettered
    with the server's text (a fault that never clears must not block its key forever)."""


class DuplicateKey(RecordRejected):
    """A create refused because a record with its key exists (a concurrent writer won)."""


def error_text(body: str) -> str:
    """The message of a Campaign error body (gateway or application), else the raw text."""
    try:
        data = json.loads(body)
    except ValueError:
        return short(body)
    if isinstance(data, dict):
        parts = [
            str(data[k])
            for k in ("error_code", "code", "title", "message", "detail")
            if data.get(k)
        ]
        if parts:
            return short(" ".join(parts))
    return short(body)


def classify(
    status: int,
    body: str,
    headers: Mapping[str, str],
    *,
    place: Place = "resource",
    delete: bool = False,
) -> SinkError | None:
    """What a Campaign answer means: None = done, else the typed failure.

    ``place`` says what the URL named: a record (``…/<PKey>``), where 404 means the record is gone
    (done, for a delete), or the resource itself (list, filter, POST), where 404 means it does not
    exist: ``Fatal``. ``headers`` must have lower-case names.
    """
    if 200 <= status < 300:
        return None
    message = error_text(body)
    reason = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status >= 500 and WRONG_URI_MARKER.search(message):
        return Fatal(f"wrong org or URI ({status}): {message}")
    if status in TRANSIENT_STATUSES:
        return Retryable(reason, parse_retry_after(headers.get("retry-after")))
    if status == 500:
        if DUPLICATE_MARKERS.search(message):
            return DuplicateKey(reason)
        if VALIDATION_MARKERS.search(message):
            return RecordRejected(reason)
        return ServerFault(reason, parse_retry_after(headers.get("retry-after")))
    if status >= 500:
        return Retryable(reason, parse_retry_after(headers.get("retry-after")))
    if status in (401, 403):
        return Fatal(reason)
    if status == 404:
        if place == "resource":
            return NotFound(reason)
        return None if delete else RecordRejected(reason)
    if 400 <= status < 500:
        return RecordRejected(reason)
    return Fatal(f"unexpected answer: {reason}")


def _transient(response: Response) -> Retryable | None:
    outcome = classify(response.status_code, response.text, response.headers)
    return outcome if isinstance(outcome, Retryable) else None


@dataclass(frozen=True, slots=True)
class Lookup:
    """How records of a resource are found by a business key: ``GET <on>/<filter>?<parameter>=v``.

    Campaign has no upsert: a record is looked up by its key, then PATCHed, or POSTed when absent.
    Defaults follow the custom-filter convention ``by<Field>`` with parameter ``<field>_parameter``
    on the record's own resource (``on`` = None).
    """

    field: str
    filter: str | None = None
    parameter: str | None = None
    on: str | None = None

    def path(self, resource: str) -> str:
        name = self.filter or f"by{self.field[:1].upper()}{self.field[1:]}"
        return f"{self.on or resource}/{name}"

    @property
    def query_parameter(self) -> str:
        return self.parameter or f"{self.field}_parameter"


#: Profiles are matched by externalId (= the Dynamics contactid) through the custom filter that
#: lives on the extension resource (custom filters are defined there).
DEFAULT_LOOKUPS: Mapping[str, Lookup] = {
    name: Lookup("externalId", "byExternalId", "externalId_parameter", on=PROFILE)
    for name in PROFILE_RESOURCES
}


def default_ims_url(target: CampaignTarget) -> str:
    """Adobe IMS for the real API on ``mc.adobe.io``, else the emulator's host."""
    if target.ims_url:
        return target.ims_url.rstrip("/")
    parts = urlsplit(target.url)
    if (parts.hostname or "").endswith("adobe.io"):
        return "https://ims-na1.adobelogin.com"
    return f"{parts.scheme}://{parts.netloc}"


#: Records per page when warming the PKey cache (the emulator's and, in practice, the API's most).
WARM_PAGE_SIZE = 1000
#: Uncached keys written before the resource is counted to decide on a warm-up (two requests).
WARM_MIN_MISSES = 20
#: How long a warm-up's "every record is known" holds: records others create meanwhile are found
#: by the duplicate-key answer to a create, or by a lookup after this time.
WARM_TTL_S = 600.0


@dataclass
class _Warmth:
    """What is known of one lookup's whole resource (resource, key field) for warming."""

    misses: int = 0  # uncached keys written since the last warm-up
    count: int | None = None  # the resource's size, when last counted
    counted_at: float = -math.inf
    complete_at: float | None = None  # when a warm-up last listed every record
    expected: int = 0  # records the resource holds if nobody else wrote: listed + our creates
    #: Casefolded keys that are (or may be) in the resource: from the warm-up, or written since.
    seen: set[str] = field(default_factory=set)


class _PKeys:
    """A bounded LRU of (lookup resource, field, key) → PKey: saves a lookup per known record."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._size = size
        self._entries: OrderedDict[tuple[str, str, str], str] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> str | None:
        pkey = self._entries.get(key)
        if pkey is not None:
            self._entries.move_to_end(key)
        return pkey

    def put(self, key: tuple[str, str, str], pkey: str) -> None:
        self._entries[key] = pkey
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def drop(self, key: tuple[str, str, str]) -> None:
        self._entries.pop(key, None)


class CampaignClient:
    """Campaign Standard REST API over one pooled HTTP client with IMS server-to-server tokens.

    Methods raise ``Retryable`` (after the ``retry`` policy's bounded tries), ``RecordRejected`` or
    ``Fatal``. A 429 pauses every request of the client until ``Retry-After`` has passed.
    ``lookups`` maps a resource (``profileAndServicesExt/profile``, ``customResources/cusX``) to how
    its records are found by key; resources not listed use ``Lookup(key_field)`` defaults.
    """

    def __init__(
        self,
        target: CampaignTarget,
        *,
        retry: RetryPolicy | None = None,
        lookups: Mapping[str, Lookup] | None = None,
        pkey_cache_size: int = 100_000,
        transport: Transport | None = None,
        warm_page_size: int = WARM_PAGE_SIZE,
        warm_min_misses: int = WARM_MIN_MISSES,
    ) -> None:
        self.target = target
        self.retry = retry or RetryPolicy()
        self.lookups = {**DEFAULT_LOOKUPS, **(lookups or {})}
        self.api_url = f"{target.url.rstrip('/')}/{quote(target.org, safe='')}/campaign/"
        self.ims_url = default_ims_url(target)
        self._pkeys = _PKeys(pkey_cache_size)
        self._warmth: dict[tuple[str, str], _Warmth] = {}
        self._count_links: dict[str, str] = {}
        self.warm_ttl_s = WARM_TTL_S
        self.warm_page_size = warm_page_size
        self.warm_min_misses = warm_min_misses
        self._http = transport or _transport(
            target.http_client,
            timeout_s=target.timeout_s,
            max_connections=target.max_concurrency,
            headers={"Accept": "application/json", "X-Api-Key": target.client_id},
        )
        self._throttle = Throttle(target.max_concurrency)
        self._session = Session(
            "campaign",
            self._http,
            TokenCache(self._fetch_token),
            self._throttle,
            self.retry,
            _transient,
        )

    async def __aenter__(self) -> CampaignClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def hold(self) -> None:
        """Start no new request (they raise ``Halted``) until ``release``; sent ones finish."""
        self._throttle.hold()

    def release(self) -> None:
        self._throttle.release()

    async def _fetch_token(self) -> tuple[str, float]:
        """An IMS access token (client credentials); IMS gives no refresh token, so ask again."""
        form = {
            "client_id": self.target.client_id,
            "client_secret": self.target.client_secret.get_secret_value(),
            "grant_type": "client_credentials",
            "scope": self.target.scope,
        }
        response = await self._http.send(
            "POST",
            f"{self.ims_url}/ims/token/v3",
            {"Content-Type": "application/x-www-form-urlencoded"},
            urlencode(form).encode(),
            "campaign token",
        )
        if response.status_code == 200:
            data = response.json()
            lifetime = float(data.get("expires_in", 86399))
            if lifetime > 30 * 86400:  # older IMS endpoints answer in milliseconds
                lifetime /= 1000
            return str(data["access_token"]), lifetime
        outcome = classify(response.status_code, response.text, response.headers)
        reason = f"campaign token: HTTP {response.status_code}: {error_text(response.text)}"
        if isinstance(outcome, Retryable):
            raise Retryable(reason, outcome.retry_after)
        raise Fatal(reason)  # refused credentials or scope: asking again will not help

    # -- requests -----------------------------------------------------------------------------

    def url(self, resource: str, *parts: str) -> str:
        return self.api_url + "/".join([resource, *(quote(p, safe="") for p in parts)])

    async def _call(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        place: Place,
        delete: bool = False,
        what: str,
    ) -> Response | None:
        """A request; its answer when it succeeded, None for an absent record (place="record").

        A 500 that names no cause is tried again within the retry policy; one still there after
        it is ``RecordRejected`` (dead-lettered) with the server's text."""
        try:
            response = await self._session.request(method, url, body=body, what=what)
        except ServerFault as fault:
            raise RecordRejected(
                f"{fault.reason} (still failing after {self.retry.attempts} tries)"
            ) from fault
        outcome = classify(
            response.status_code, response.text, response.headers, place=place, delete=delete
        )
        if response.status_code == 404 and place == "record":
            return None
        if outcome is not None:
            raise prefixed(outcome, what)
        return response

    async def raw_get(self, url: str) -> dict[str, Any]:
        """A GET of a resource or filter URL; a missing one raises ``Fatal`` (404)."""
        response = await self._call("GET", url, place="resource", what=f"GET {url}")
        assert response is not None
        return dict(response.json())

    def lookup_for(self, resource: str, key_field: str | None = None) -> Lookup:
        lookup = self.lookups.get(resource)
        if key_field is None:
            if lookup is None:
                raise Fatal(f"no key field known for {resource}: pass key_field or a Lookup")
            return lookup
        if lookup is not None and lookup.field == key_field:
            return lookup
        return Lookup(key_field)

    async def find(
        self, resource: str, value: str, *, key_field: str | None = None
    ) -> dict[str, Any] | None:
        """The record whose key field equals ``value`` (through the resource's filter), or None."""
        lookup = self.lookup_for(resource, key_field)
        url = self.url(lookup.path(resource)) + "?" + urlencode({lookup.query_parameter: value})
        response = await self._call("GET", url, place="resource", what=f"find {resource}")
        assert response is not None
        content = response.json().get("content", [])
        # A filter may match loosely (prefix search): only the key itself (any case) is the record.
        for record in content:
            if str(record.get(lookup.field)).casefold() == value.casefold():
                found: dict[str, Any] = record
                self._pkeys.put(self._cache_key(resource, lookup, value), str(record["PKey"]))
                return found
        return None

    def _cache_key(self, resource: str, lookup: Lookup, value: str) -> tuple[str, str, str]:
        # Both profile resources address the same profiles: key the cache by the lookup's resource.
        return (lookup.on or resource, lookup.field, value)

    async def _pkey(self, resource: str, lookup: Lookup, value: str) -> str | None:
        cached = self._pkeys.get(self._cache_key(resource, lookup, value))
        if cached is not None:
            return cached
        if self._known_absent(resource, lookup, value):
            return None
        record = await self.find(resource, value, key_field=lookup.field)
        return None if record is None else str(record["PKey"])

    # -- warming the PKey cache ---------------------------------------------------------------

    def _warm_state(self, resource: str, lookup: Lookup) -> _Warmth:
        return self._warmth.setdefault((lookup.on or resource, lookup.field), _Warmth())

    def _fresh(self, warmth: _Warmth) -> bool:
        if warmth.complete_at is None:
            return False
        if time.monotonic() - warmth.complete_at < self.warm_ttl_s:
            return True
        warmth.complete_at, warmth.seen = None, set()  # stale: forget it (and its memory)
        return False

    def _maybe_there(self, resource: str, lookup: Lookup, value: str) -> None:
        """A create of ``value`` is under way: it may exist from now on, whatever we hear."""
        warmth = self._warmth.get((lookup.on or resource, lookup.field))
        if warmth is not None and warmth.complete_at is not None:
            warmth.seen.add(value.casefold())

    def _created(self, resource: str, lookup: Lookup) -> None:
        warmth = self._warmth.get((lookup.on or resource, lookup.field))
        if warmth is not None:
            warmth.expected += 1

    def _forget_warmth(self, resource: str, lookup: Lookup) -> None:
        """Someone else wrote the resource (or we deleted from it): no key is known absent."""
        warmth = self._warmth.get((lookup.on or resource, lookup.field))
        if warmth is not None:
            warmth.complete_at, warmth.seen = None, set()

    def _known_absent(self, resource: str, lookup: Lookup, value: str) -> bool:
        """Whether a fresh warm-up says no record has this key. Said once per key: whatever is
        then tried (a create that may land although its answer is lost) makes the key "maybe
        there", so a retry looks it up, and a create stays idempotent."""
        warmth = self._warmth.get((lookup.on or resource, lookup.field))
        if warmth is None or not self._fresh(warmth):
            return False
        folded = value.casefold()
        if folded in warmth.seen:
            return False
        warmth.seen.add(folded)
        if len(warmth.seen) > self._pkeys.size:  # past what a warm-up is worth keeping
            warmth.complete_at, warmth.seen = None, set()
        return True

    async def expect(
        self, resource: str, values: Collection[str], *, key_field: str | None = None
    ) -> None:
        """Records with these keys are about to be written: warm the PKey cache first when
        that is cheaper than their lookups.

        Paging the resource costs one request per 1,000 records; looking up a key not cached
        costs one each. Once the keys written without a cached PKey (these, and those since the
        last warm-up) reach ``warm_min_misses`` and the pages the resource needs, the resource
        is counted and paged through (``warm``): then a key it does not hold is created without
        a lookup. A resource larger than half the cache is never warmed (it could not hold it).
        """
        lookup = self.lookup_for(resource, key_field)
        warmth = self._warm_state(resource, lookup)
        where = lookup.on or resource
        uncached = [
            v for v in values if self._pkeys.get(self._cache_key(resource, lookup, v)) is None
        ]
        if self._fresh(warmth):
            if all(v.casefold() in warmth.seen for v in uncached):
                return  # nothing would be taken as absent
            # One request says whether anyone else created (or deleted) records since the
            # warm-up (another replica after a rebalance, an import): then nothing is known
            # absent any more, and the keys are looked up (or the resource paged again).
            warmth.count, warmth.counted_at = await self.count(where), time.monotonic()
            if warmth.count == warmth.expected:
                return
            log.info(
                "event=campaign_cache_stale resource=%s expected=%d count=%d",
                where,
                warmth.expected,
                warmth.count,
            )
            self._forget_warmth(resource, lookup)
        warmth.misses += len(uncached)
        if warmth.misses < self.warm_min_misses:
            return
        now = time.monotonic()
        if warmth.count is None or now - warmth.counted_at >= self.warm_ttl_s:
            warmth.count, warmth.counted_at = await self.count(where), now
        if warmth.count > self._pkeys.size // 2:
            return
        if warmth.misses >= math.ceil(warmth.count / self.warm_page_size) + 2:
            await self.warm(resource, key_field=lookup.field)

    async def warm(self, resource: str, *, key_field: str | None = None) -> int:
        """Page through every record of a resource (``warm_page_size`` at a time, following
        ``next``), caching each key's PKey; afterwards, for ``warm_ttl_s``, a key it does not
        hold is taken as absent (created without a lookup). Returns the records listed."""
        lookup = self.lookup_for(resource, key_field)
        where = lookup.on or resource
        started = time.monotonic()
        seen: set[str] = set()
        listed = 0
        async for record in self.list(where, page_size=self.warm_page_size):
            listed += 1
            value = record.get(lookup.field)
            if value is None or record.get("PKey") is None:
                continue
            seen.add(str(value).casefold())
            self._pkeys.put(self._cache_key(resource, lookup, str(value)), str(record["PKey"]))
        warmth = self._warm_state(resource, lookup)
        warmth.seen |= seen
        warmth.misses, warmth.complete_at, warmth.expected = 0, started, listed
        log.info("event=campaign_cache_warmed resource=%s records=%d", where, listed)
        return listed

    async def upsert(
        self,
        resource: str,
        value: str,
        fields: Mapping[str, Any],
        *,
        key_field: str | None = None,
        create_fields: Mapping[str, Any] | None = None,
        mode: WriteMode = "upsert",
    ) -> str:
        """Update the record whose key field is ``value``, or create it; returns its PKey.

        POST is not idempotent, so the record is always looked up first (or known from the PKey
        cache); a cached PKey that has gone stale (404) is looked up again. ``create_fields`` go
        only into a POST. ``mode="update"`` never creates: a missing record is ``ParentMissing``;
        ``mode="create"`` leaves an existing record alone. ``ProfileLink`` values become links
        to that profile (``ParentMissing`` while there is none).
        """
        for attempt in range(2):
            body, linked = await self._resolve_links(fields)
            extra, linked_too = await self._resolve_links(create_fields or {})
            try:
                return await self._upsert(resource, value, body, extra, key_field, mode)
            except RecordRejected:
                # A cached link target may have been deleted meanwhile: look it up once more.
                if attempt or not (linked or linked_too):
                    raise
                for external_id in (*linked, *linked_too):
                    self._pkeys.drop(
                        self._cache_key(PROFILE, self.lookup_for(PROFILE), external_id)
                    )
        raise AssertionError("unreachable")

    async def _resolve_links(self, fields: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``fields`` with each ``ProfileLink`` replaced by ``{"PKey": ...}``; the ids linked."""
        resolved = dict(fields)
        linked: list[str] = []
        for name, link in fields.items():
            if not isinstance(link, ProfileLink):
                continue
            pkey = await self._pkey(PROFILE, self.lookup_for(PROFILE), link.external_id)
            if pkey is None:
                raise ParentMissing(
                    f"{name}: no profile with externalId {link.external_id} yet (link target)"
                )
            resolved[name] = {"PKey": pkey}
            linked.append(link.external_id)
        return resolved, linked

    async def _upsert(
        self,
        resource: str,
        value: str,
        fields: Mapping[str, Any],
        create_fields: Mapping[str, Any],
        key_field: str | None,
        mode: WriteMode,
    ) -> str:
        lookup = self.lookup_for(resource, key_field)
        cache_key = self._cache_key(resource, lookup, value)
        for _ in range(2):
            pkey = await self._pkey(resource, lookup, value)
            if pkey is None:
                if mode == "update":
                    raise ParentMissing(
                        f"update {resource}: no record with {lookup.field}={value} yet "
                        "(update only: not created)"
                    )
                body = {**when_created(fields, create_fields), lookup.field: value}
                # From now on the record may exist (the answer can be lost): never known absent.
                self._maybe_there(resource, lookup, value)
                try:
                    response = await self._call(
                        "POST",
                        self.url(resource),
                        body=body,
                        place="resource",
                        what=f"create {resource}",
                    )
                except DuplicateKey:
                    # Created meanwhile by someone else: look it up again, then update it.
                    log.info("campaign duplicate key, looking up again resource=%s", resource)
                    continue
                assert response is not None
                created = str(response.json()["PKey"])
                self._pkeys.put(cache_key, created)
                self._created(resource, lookup)
                return created
            existing = when_existing(fields, mode)
            if existing is None:
                return pkey
            response = await self._call(
                "PATCH",
                self.url(resource, pkey),
                body=existing,
                place="record",
                what=f"update {resource}",
            )
            if response is not None:
                return pkey
            self._pkeys.drop(cache_key)  # deleted behind our back: look it up again
        raise Retryable(f"update {resource}: record keeps disappearing")

    async def delete(self, resource: str, value: str, *, key_field: str | None = None) -> None:
        """Delete the record whose key field is ``value``; an absent record counts as deleted."""
        lookup = self.lookup_for(resource, key_field)
        pkey = await self._pkey(resource, lookup, value)
        self._pkeys.drop(self._cache_key(resource, lookup, value))
        if pkey is not None:
            self._forget_warmth(resource, lookup)
            await self._call(
                "DELETE",
                self.url(resource, pkey),
                place="record",
                delete=True,
                what=f"delete {resource}",
            )

    async def get(self, resource: str, pkey: str) -> dict[str, Any] | None:
        """One record by PKey, or None."""
        response = await self._call(
            "GET", self.url(resource, pkey), place="record", what=f"get {resource}"
        )
        return None if response is None else dict(response.json())

    def _own_link(self, link: str) -> str:
        """A paging link of this API; one to another host is refused (it would get our token)."""
        ours, theirs = urlsplit(self.api_url), urlsplit(link)
        if (theirs.scheme, theirs.netloc.lower()) != (ours.scheme, ours.netloc.lower()):
            raise Fatal(f"link to another host refused: {link[:200]}")
        return link

    async def list(
        self, resource: str, *, page_size: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every record of a resource (or of a filter path), following ``next.href``."""
        # Lists of tables above 100,000 rows (XtkBigTableThreshold) have no `next` unless asked.
        params: dict[str, Any] = {"_forcePagination": "true"}
        if page_size:
            params["_lineCount"] = page_size
        url: str | None = f"{self.url(resource)}?{urlencode(params)}"
        while url:
            response = await self._call("GET", url, place="resource", what=f"list {resource}")
            assert response is not None
            page = response.json()
            for record in page.get("content", []):
                yield record
            href = (page.get("next") or {}).get("href")
            url = self._own_link(urljoin(self.api_url, href)) if href else None

    async def count(self, resource: str) -> int:
        """How many records a resource (or filter path) holds, through its list's ``count``
        (the link is remembered: one request from the second count on)."""
        href = self._count_links.get(resource)
        if href is None:
            url = f"{self.url(resource)}?{urlencode({'_lineCount': 1})}"
            response = await self._call("GET", url, place="resource", what=f"count {resource}")
            assert response is not None
            href = (response.json().get("count") or {}).get("href")
            if not href:
                raise Fatal(f"count {resource}: the list carries no count link")
            self._count_links[resource] = href
        counted = await self._call(
            "GET",
            self._own_link(urljoin(self.api_url, href)),
            place="resource",
            what=f"count {resource}",
        )
        assert counted is not None
        return int(counted.json()["count"])
