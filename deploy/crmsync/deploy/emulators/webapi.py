"""Dataverse Web API operations on entity sets, run synchronously inside one store transaction."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from crmsync.deploy.emulators.metadata import (
    BULK_ACTIONS,
    MetadataRefused,
    csdl,
    entity_definition,
    new_table,
    service_document,
    with_column,
    with_key,
)
from crmsync.deploy.emulators.model import (
    DYNAMICS_DATETIME,
    EntitySet,
    FieldDef,
    FieldType,
    InvalidValue,
    Problem,
    new_guid,
    now_text,
)
from crmsync.deploy.emulators.odata import (
    ENTITY_TYPE,
    KeyPredicate,
    ODataError,
    bad_query,
    compile_filter,
    compile_orderby,
    literal_for,
    parse_key,
    parse_select,
)
from crmsync.deploy.emulators.store import DuplicateKey, Records, Row, folded, key_value

#: The store's meta entry holding the tables created or changed since the fresh org.
MODEL_META = "entity_sets"
#: Dataverse operations a client may send that the emulator does not implement (answered 501).
_KNOWN_UNSUPPORTED = frozenset({"$ref", "$count", "Merge", "Associate", "Disassociate"})
_MAX_BULK_TARGETS = 1000
EMULATOR_USER_ID = "9f3a2b1c-0000-4000-8000-00000000e5e5"
_MAX_PAGE = 5000
_GUID_TEXT = re.compile(r"^[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}\Z")
_PATH = re.compile(r"^(?P<set>[A-Za-z_][A-Za-z0-9_]*)(?:\((?P<key>.*)\))?\Z", re.DOTALL)


@dataclass
class ApiRequest:
    """One Web API call, from HTTP or from a $batch part; `path` is relative to the service root."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    service_root: str
    references: dict[str, str] = field(default_factory=dict)

    def prefers(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for item in self.headers.get("prefer", "").split(","):
            name, _, value = item.strip().partition("=")
            if name:
                found[name.strip().lower()] = value.strip().strip('"')
        return found


@dataclass
class ApiResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def error_response(status: int, code: str, message: str) -> ApiResponse:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return ApiResponse(status, [("Content-Type", "application/json; odata.metadata=minimal")], body)


def _json_response(status: int, payload: Any, *headers: tuple[str, str]) -> ApiResponse:
    return ApiResponse(
        status,
        [
            ("Content-Type", "application/json; odata.metadata=minimal"),
            ("OData-Version", "4.0"),
            *headers,
        ],
        orjson.dumps(payload),
    )


def _not_found(entity: EntitySet, key: KeyPredicate) -> ODataError:
    if isinstance(key, str):
        return ODataError(
            404, "0x80040217", f"{entity.logical_name} With Id = {key} Does Not Exist"
        )
    return ODataError(
        404,
        "0x80040217",
        f"A record with the specified key values does not exist in {entity.logical_name} entity",
    )


def _payload_error(entity: EntitySet, detail: str) -> ODataError:
    return ODataError(
        400,
        "0x80048d19",
        f"Error identified in Payload provided by the user for Entity :'{entity.name}', "
        f"For more information on this error please follow this help link "
        f"https://go.microsoft.com/fwlink/?linkid=2195293  ---->  InnerException : "
        f"Microsoft.OData.ODataException: {detail}",
    )


def _invalid_key(entity: EntitySet) -> ODataError:
    kind = f"{ENTITY_TYPE}.{entity.logical_name}"
    return bad_query(
        f"The key in the request URI is not valid for resource '{kind}'. Ensure that the names "
        f"and number of key properties match the declared or alternate key properties for the "
        f"resource '{kind}'."
    )


#: Characters an alternate key value may hold but a URL may not carry: GET and PATCH by such a key
#: do not work on the real service ("Work with alternate keys", define-alternate-keys-entity.md).
URL_REFUSED_KEY_CHARACTERS = frozenset("/<>*%&:\\?+")


def _refused_key_value(entity: EntitySet, value: Any) -> ODataError:
    return bad_query(
        f"The key value '{str(value)[:100]}' of '{entity.logical_name}' contains a character "
        "that is not supported in an alternate key value in a URL (/ < > * % & : \\ ? +)."
    )


def _url_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not _GUID_TEXT.match(value):
        return "'" + quote(value.replace("'", "''"), safe="'@") + "'"
    return str(value)


_DEFINITION_KEY = re.compile(
    r"^EntityDefinitions\((?:LogicalName='(?P<logical>[^']*)'|(?P<id>[0-9a-fA-F-]{36}))\)$"
)
_DEFINITION_TERM = re.compile(r"^\s*(LogicalName|EntitySetName|SchemaName)\s+eq\s+'([^']*)'\s*$")


def _definition_matches(definition: dict[str, Any], segment: str) -> bool:
    match = _DEFINITION_KEY.match(segment)
    if match is None:
        raise bad_query(f"The key in '{segment[:100]}' is not valid for EntityDefinitions.")
    if match["logical"] is not None:
        return bool(definition["LogicalName"] == match["logical"])
    return bool(definition["MetadataId"] == match["id"].lower())


def _filter_definition(definition: dict[str, Any], text: str) -> bool:
    """``$filter`` on EntityDefinitions: ``Name eq 'x'`` terms joined by ``or`` / ``and``."""
    for alternative in re.split(r"\s+or\s+", text.strip()):
        terms = re.split(r"\s+and\s+", alternative)
        matched = True
        for term in terms:
            found = _DEFINITION_TERM.match(term.strip("() "))
            if found is None:
                raise bad_query(
                    f"The $filter '{text[:200]}' is not supported on EntityDefinitions."
                )
            matched &= str(definition.get(found[1])) == found[2]
        if matched:
            return True
    return False


def _shaped(definition: dict[str, Any], options: dict[str, str]) -> dict[str, Any]:
    """A definition with only the $select'ed properties and the $expand'ed collections."""
    expanded = {part.split("(")[0].strip() for part in options.get("$expand", "").split(",")}
    collections = {"Attributes", "Keys"}
    if "$select" in options:
        names = {n.strip() for n in options["$select"].split(",")} | {"MetadataId"}
    else:
        names = set(definition) - collections
    return {
        k: v
        for k, v in definition.items()
        if (k in names and k not in collections) or (k in collections and k in expanded)
    }


def delta_token(seq: int, issued: float) -> str:
    stamp = datetime.fromtimestamp(issued, UTC).strftime("%m/%d/%Y %H:%M:%S")
    return f"{seq}!{stamp}"


def _skiptoken(offset: int, snapshot: int | None) -> str:
    state = json.dumps({"o": offset, "s": snapshot}).encode()
    return base64.urlsafe_b64encode(state).decode().rstrip("=")


def _read_skiptoken(text: str) -> tuple[int, int | None]:
    try:
        state = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        offset, snapshot = state["o"], state["s"]
        if not isinstance(offset, int) or offset < 0:
            raise ValueError
        if snapshot is not None and not isinstance(snapshot, int):
            raise ValueError
        return offset, snapshot
    except (ValueError, KeyError, TypeError):
        raise bad_query("The $skiptoken is not valid.") from None


class WebApi:
    """Answers Web API requests against the records of a store."""

    def __init__(
        self,
        entity_sets: dict[str, EntitySet],
        delta_token_ttl_s: float,
        key_index_delay_s: float = 0.0,
    ) -> None:
        self.entity_sets = entity_sets
        self.delta_token_ttl_s = delta_token_ttl_s
        #: A new alternate key reports "Pending" this long, as while Dataverse's index job runs.
        self.key_index_delay_s = key_index_delay_s
        self._key_active_at: dict[tuple[str, tuple[str, ...]], float] = {}
        self._defined: set[str] = set()  # tables created or changed since the fresh org

    # --- the model, kept in the store like the data ----------------------------------------

    def load_model(self, records: Records) -> None:
        """Tables created or changed by metadata writes (or admin drift) in earlier runs."""
        text = records.meta(MODEL_META)
        for name, doc in (json.loads(text) if text else {}).items():
            self.entity_sets[name] = EntitySet.model_validate(doc)
            self._defined.add(name)

    def define(self, records: Records, entity: EntitySet) -> None:
        """Replaces (or adds) a table's definition and persists it in the same transaction."""
        self.entity_sets[entity.name] = entity
        self._defined.add(entity.name)
        kept = {
            n: self.entity_sets[n].model_dump(mode="json")
            for n in sorted(self._defined)
            if n in self.entity_sets
        }
        records.set_meta(MODEL_META, json.dumps(kept, separators=(",", ":")))

    def key_status(self, entity_set: str, columns: tuple[str, ...]) -> str:
        active_at = self._key_active_at.get((entity_set, tuple(columns)), 0.0)
        return "Active" if time.monotonic() >= active_at else "Pending"

    def index_new_key(self, records: Records, entity: EntitySet, columns: tuple[str, ...]) -> None:
        """Indexes the existing records under a new alternate key (refused on duplicates)."""
        values = {}
        for row in records.query(entity.name):
            found = [row.doc.get(n) for n in columns]
            if all(v is not None for v in found):
                values[row.id] = key_value(found)
        try:
            records.index_key(entity.name, ",".join(columns), values)
        except DuplicateKey:
            raise ODataError(
                400,
                "0x80060892",
                "The key cannot be activated: existing records have duplicate values for "
                f"{', '.join(columns)[:200]}.",
            ) from None

    def execute(self, records: Records, request: ApiRequest) -> ApiResponse:
        try:
            with records.atomic():
                return self._dispatch(records, request)
        except ODataError as e:
            return error_response(e.status, e.code, e.message)

    def _dispatch(self, records: Records, request: ApiRequest) -> ApiResponse:
        path = request.path
        if path.startswith("$") and (ref := request.references.get(path[1:])) is not None:
            path = ref
        if path == "WhoAmI" and request.method == "GET":
            return _json_response(
                200,
                {
                    "@odata.context": f"{request.service_root}/$metadata#"
                    f"{ENTITY_TYPE}.WhoAmIResponse",
                    "BusinessUnitId": "9f3a2b1c-0000-4000-8000-0000000000b1",
                    "UserId": EMULATOR_USER_ID,
                    "OrganizationId": "9f3a2b1c-0000-4000-8000-0000000000o1".replace("o", "0"),
                },
            )
        if path == "" and request.method == "GET":
            return _json_response(200, service_document(request.service_root, self.entity_sets))
        if path == "$metadata" and request.method == "GET":
            return ApiResponse(
                200,
                [("Content-Type", "application/xml"), ("OData-Version", "4.0")],
                csdl(self.entity_sets).encode(),
            )
        if path == "EntityDefinitions" or path.startswith(
            ("EntityDefinitions(", "EntityDefinitions/")
        ):
            return self._entity_definitions(records, path, request)
        set_name, slash, operation = path.partition("/")
        if slash and _PATH.match(set_name) and set_name.split("(")[0] in self.entity_sets:
            action = operation.removeprefix(f"{ENTITY_TYPE}.")
            if "(" not in set_name and action in BULK_ACTIONS and request.method == "POST":
                return self._bulk(records, self.entity_sets[set_name], action, request)
            # A known table with an operation the emulator lacks: never the "table missing" 404.
            raise ODataError(
                501 if action in _KNOWN_UNSUPPORTED else 400,
                "0x80060888",
                f"The operation '{operation[:100]}' on '{set_name[:100]}' is not "
                + ("supported by the emulator." if action in _KNOWN_UNSUPPORTED else "valid."),
            )
        match = _PATH.match(path)
        if match is None:
            segment = path.split("(")[0].split("/")[0]
            if segment in self.entity_sets:  # a known table, a malformed key: 400, not 404
                raise bad_query(f"Bad Request - Error in query syntax: '{path[:200]}'.")
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{segment}'.")
        found_set = self.entity_sets.get(match["set"])
        if found_set is None:
            raise ODataError(
                404, "0x8006088a", f"Resource not found for the segment '{match['set']}'."
            )
        entity = found_set
        if match["key"] is None:
            if request.method == "GET":
                return self._query(records, entity, request)
            if request.method == "POST":
                return self._create(records, entity, request)
        else:
            key = parse_key(match["key"])
            if request.method == "GET":
                return self._get(records, entity, key, request)
            if request.method == "PATCH":
                return self._upsert(records, entity, key, request)
            if request.method == "DELETE":
                return self._delete(records, entity, key, request)
        raise ODataError(
            405, "0x80060888", f"The HTTP method '{request.method}' is not allowed on '{path}'."
        )

    # --- keys and bodies -------------------------------------------------------------------

    def _resolve(
        self, records: Records, entity: EntitySet, key: KeyPredicate
    ) -> tuple[str | None, dict[str, Any]]:
        """The id a key points at (None if no such record) and the key fields from the URL."""
        if isinstance(key, str):
            return (key if records.exists(entity.name, key) else None), {}
        names = tuple(sorted(key))
        if names == (entity.primary_id,):
            guid = literal_for(entity.by_name[entity.primary_id], key[entity.primary_id])
            return (guid if records.exists(entity.name, guid) else None), {}
        declared = next((k for k in entity.alternate_keys if tuple(sorted(k)) == names), None)
        if declared is None:
            raise _invalid_key(entity)
        values = {}
        for name in declared:
            value = literal_for(entity.by_name[name], key[name])
            if value is None:
                raise _invalid_key(entity)
            if isinstance(value, str) and URL_REFUSED_KEY_CHARACTERS & set(value):
                raise _refused_key_value(entity, value)
            values[name] = value
        found = records.find_by_key(
            entity.name, ",".join(declared), key_value([values[n] for n in declared])
        )
        return found, values

    def _key_values(self, entity: EntitySet, doc: dict[str, Any]) -> dict[str, str]:
        keys = {}
        for declared in entity.alternate_keys:
            values = [doc.get(n) for n in declared]
            # Like a filtered unique index: rows missing part of the key are not indexed.
            if all(v is not None for v in values):
                keys[",".join(declared)] = key_value(values)
        return keys

    def _parse_body(
        self, records: Records, entity: EntitySet, request: ApiRequest
    ) -> dict[str, Any]:
        try:
            payload = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise _payload_error(
                entity, "Invalid JSON. The request body is not valid JSON."
            ) from None
        if not isinstance(payload, dict):
            raise _payload_error(entity, "A JSON object was expected for the entity.")
        return self._parse_payload(records, entity, payload, request)

    def _parse_payload(
        self, records: Records, entity: EntitySet, payload: dict[str, Any], request: ApiRequest
    ) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for name, value in payload.items():
            if name == "@odata.type" or name == "@odata.etag":
                continue
            if name.endswith("@odata.bind"):
                lookup = entity.by_bind.get(name[: -len("@odata.bind")])
                if lookup is None:
                    raise _payload_error(
                        entity,
                        f"An undeclared property '{name[:-11][:100]}' which only has property "
                        "annotations in the payload but no property value was found.",
                    )
                changes[lookup.name] = self._bind(records, entity, lookup, value, request)
                continue
            field_def = entity.by_name.get(name)
            if field_def is None:
                raise _payload_error(
                    entity,
                    f"The property '{name[:100]}' does not exist on type "
                    f"'{ENTITY_TYPE}.{entity.logical_name}'. Make sure to only use property "
                    "names that are defined by the type or mark the type as open type.",
                )
            if field_def.read_only or field_def.type is FieldType.LOOKUP:
                raise _payload_error(entity, f"The property '{name}' is read-only.")
            try:
                changes[name] = field_def.coerce(value, DYNAMICS_DATETIME)
            except InvalidValue as e:
                if e.problem is Problem.TOO_LONG:
                    raise ODataError(
                        400,
                        "0x80044331",
                        f"A validation error occurred. The length of the '{name}' attribute of "
                        f"the '{entity.logical_name}' entity exceeded the maximum allowed length "
                        f"of '{field_def.max_length}'.",
                    ) from None
                raise _payload_error(entity, e.detail) from None
        return changes

    def _bind(
        self, records: Records, entity: EntitySet, lookup: FieldDef, value: Any, request: ApiRequest
    ) -> str | None:
        if value is None:
            return None
        target, key = self._bind_reference(entity, lookup, value, request)
        found, _ = self._resolve(records, target, key)
        if found is None:
            raise _not_found(target, key)
        return found

    def _bind_reference(
        self, entity: EntitySet, lookup: FieldDef, value: Any, request: ApiRequest
    ) -> tuple[EntitySet, KeyPredicate]:
        """The table and key an `@odata.bind` value names."""
        if not isinstance(value, str):
            raise _payload_error(entity, f"The @odata.bind value of '{lookup.bind}' must be a URL.")
        ref = value
        if ref.startswith("$") and ref[1:] in request.references:
            ref = request.references[ref[1:]]
        ref = ref.removeprefix(request.service_root).lstrip("/")
        if "/api/data/" in ref:
            ref = ref.split("/api/data/", 1)[1].split("/", 1)[-1]
        match = _PATH.match(ref)
        if match is None or match["key"] is None or match["set"] != lookup.target:
            raise _payload_error(
                entity,
                f"The value '{value[:200]}' of '{lookup.bind}@odata.bind' does not reference "
                f"a record in '{lookup.target}'.",
            )
        return self.entity_sets[match["set"]], parse_key(match["key"])

    # --- operations ------------------------------------------------------------------------

    def _save(
        self,
        records: Records,
        entity: EntitySet,
        id_: str,
        doc: dict[str, Any],
        created: bool,
        *,
        fresh: bool = False,
    ) -> Row:
        now = now_text(DYNAMICS_DATETIME)
        doc[entity.primary_id] = id_
        if created:
            doc["createdon"] = now
        doc["modifiedon"] = now
        doc["_modifiedby_value"] = EMULATOR_USER_ID
        if "fullname" in entity.by_name:
            doc["fullname"] = (
                " ".join(p for p in (doc.get("firstname"), doc.get("lastname")) if p) or None
            )
        try:
            return records.save(entity.name, id_, doc, self._key_values(entity, doc), fresh=fresh)
        except DuplicateKey as e:
            raise ODataError(
                412,
                "0x80040237",
                f"A record that has the attribute values {e.key} already exists. The entity key "
                "requires that this set of attributes contains unique values.",
            ) from None

    def _written(
        self,
        entity: EntitySet,
        row: Row,
        request: ApiRequest,
        created: bool,
        key_text: str | None = None,
    ) -> ApiResponse:
        # A write addressed by an alternate key is answered with the record's URL in key form.
        location = f"{request.service_root}/{entity.name}({key_text or row.id})"
        headers = [("OData-EntityId", location), ("ETag", self._etag(row))]
        if request.prefers().get("return") == "representation":
            select = self._select(entity, request)
            body = self._render(entity, row, select)
            body["@odata.context"] = f"{request.service_root}/$metadata#{entity.name}/$entity"
            return _json_response(
                201 if created else 200,
                body,
                *headers,
                ("Location", location),
                ("Preference-Applied", "return=representation"),
            )
        return ApiResponse(204, [*headers, ("OData-Version", "4.0")])

    def _create(self, records: Records, entity: EntitySet, request: ApiRequest) -> ApiResponse:
        doc = self._parse_body(records, entity, request)
        id_ = doc.get(entity.primary_id) or new_guid()
        if records.get(entity.name, id_) is not None:
            raise ODataError(412, "0x80040237", "Cannot insert duplicate key.")
        return self._written(entity, self._save(records, entity, id_, doc, True), request, True)

    def _upsert(
        self, records: Records, entity: EntitySet, key: KeyPredicate, request: ApiRequest
    ) -> ApiResponse:
        found, url_keys = self._resolve(records, entity, key)
        changes = self._parse_body(records, entity, request)
        if_match = request.headers.get("if-match")
        if_none_match = request.headers.get("if-none-match")
        existing = records.get(entity.name, found) if found else None
        if if_none_match == "*" and existing is not None:
            raise ODataError(412, "0x80040237", "A record with matching key values already exists.")
        if if_match is not None:
            if existing is None:
                raise _not_found(entity, key)
            if if_match != "*" and if_match != self._etag(existing):
                raise ODataError(
                    412,
                    "0x80060882",
                    "The version of the existing record doesn't match the RowVersion property "
                    "provided.",
                )
        if isinstance(key, str):
            id_ = key
        elif entity.primary_id in key:
            id_ = literal_for(entity.by_name[entity.primary_id], key[entity.primary_id])
        else:
            id_ = found or changes.get(entity.primary_id) or new_guid()
        if changes.get(entity.primary_id, id_) != id_:
            raise bad_query(f"The '{entity.primary_id}' in the body does not match the URL.")
        doc = {**(existing.doc if existing else {}), **changes, **url_keys}
        row = self._save(records, entity, id_, doc, existing is None)
        key_text = None
        if url_keys:
            key_text = ",".join(f"{n}={_url_literal(v)}" for n, v in url_keys.items())
        return self._written(entity, row, request, existing is None, key_text)

    def _delete(
        self, records: Records, entity: EntitySet, key: KeyPredicate, request: ApiRequest
    ) -> ApiResponse:
        found, _ = self._resolve(records, entity, key)
        existing = records.get(entity.name, found) if found else None
        if existing is None:
            raise _not_found(entity, key)
        if_match = request.headers.get("if-match")
        if if_match is not None and if_match != "*" and if_match != self._etag(existing):
            raise ODataError(
                412,
                "0x80060882",
                "The version of the existing record doesn't match the RowVersion property "
                "provided.",
            )
        records.delete(entity.name, existing.id)
        return ApiResponse(204, [("OData-Version", "4.0")])

    def _get(
        self, records: Records, entity: EntitySet, key: KeyPredicate, request: ApiRequest
    ) -> ApiResponse:
        options = self._options(request, allowed={"$select", "$expand"})
        if "$expand" in options:
            raise bad_query("The query parameter '$expand' is not supported by the emulator.")
        found, _ = self._resolve(records, entity, key)
        row = records.get(entity.name, found) if found else None
        if row is None:
            raise _not_found(entity, key)
        if request.headers.get("if-none-match") == self._etag(row):
            return ApiResponse(304, [("ETag", self._etag(row)), ("OData-Version", "4.0")])
        select = self._select(entity, request)
        body = {
            "@odata.context": f"{request.service_root}/$metadata#{entity.name}"
            f"{'(' + ','.join(select) + ')' if select else ''}/$entity",
            **self._render(entity, row, select),
        }
        return _json_response(200, body, ("ETag", self._etag(row)))

    def _query(self, records: Records, entity: EntitySet, request: ApiRequest) -> ApiResponse:
        options = self._options(
            request,
            allowed={
                "$select",
                "$filter",
                "$top",
                "$orderby",
                "$count",
                "$skiptoken",
                "$deltatoken",
            },
        )
        prefers = request.prefers()
        select = self._select(entity, request)
        context = (
            f"{request.service_root}/$metadata#{entity.name}"
            f"{'(' + ','.join(select) + ')' if select else ''}"
        )
        page_size = _MAX_PAGE
        applied = []
        if "odata.maxpagesize" in prefers:
            try:
                page_size = max(1, min(_MAX_PAGE, int(prefers["odata.maxpagesize"])))
            except ValueError:
                raise bad_query("The odata.maxpagesize preference must be a number.") from None
            applied.append(f"odata.maxpagesize={page_size}")
        tracking = "odata.track-changes" in prefers or "$deltatoken" in options
        if tracking:
            if not entity.change_tracking:
                raise bad_query(f"Change tracking is not enabled for '{entity.logical_name}'.")
            if {"$filter", "$top", "$orderby"} & options.keys():
                raise bad_query("$filter, $orderby and $top cannot be used with change tracking.")
            if "$deltatoken" in options:
                return self._delta(records, entity, request, options, select, page_size, context)
            applied.append("odata.track-changes")
        where, params = "1", list[Any]()
        if "$filter" in options:
            where, params = compile_filter(entity, options["$filter"])
        order_by = compile_orderby(entity, options["$orderby"]) if "$orderby" in options else "rid"
        top = None
        if "$top" in options:
            if not options["$top"].isdigit():
                raise bad_query(f"Invalid value '{options['$top'][:50]}' for $top query option.")
            # With odata.maxpagesize the service pages and ignores $top.
            top = None if "odata.maxpagesize" in prefers else int(options["$top"])
        offset, snapshot = 0, None
        if "$skiptoken" in options:
            offset, snapshot = _read_skiptoken(options["$skiptoken"])
        if tracking and snapshot is None:
            snapshot = records.current_seq
        limit = top if top is not None else page_size
        rows = records.query(
            entity.name, where, params, order_by=order_by, limit=limit + 1, offset=offset
        )
        body: dict[str, Any] = {"@odata.context": context}
        if options.get("$count") == "true":
            body["@odata.count"] = min(records.count(entity.name, where, params), _MAX_PAGE)
        body["value"] = [self._render(entity, r, select) for r in rows[:limit]]
        if len(rows) > limit and top is None:
            next_query = [(k, v) for k, v in request.query if k != "$skiptoken"]
            next_query.append(("$skiptoken", _skiptoken(offset + limit, snapshot)))
            body["@odata.nextLink"] = self._link(request, entity, next_query)
        elif tracking and snapshot is not None:
            body["@odata.deltaLink"] = self._delta_link(request, entity, snapshot)
        headers = [("Preference-Applied", ",".join(applied))] if applied else []
        return _json_response(200, body, *headers)

    def _delta(
        self,
        records: Records,
        entity: EntitySet,
        request: ApiRequest,
        options: dict[str, str],
        select: list[str] | None,
        page_size: int,
        context: str,
    ) -> ApiResponse:
        since = self._read_delta_token(records, options["$deltatoken"])
        changes = records.changes(entity.name, since, page_size + 1)
        values: list[dict[str, Any]] = []
        deleted: list[dict[str, Any]] = []
        for change in changes[:page_size]:
            if change.row is None:
                deleted.append(
                    {
                        "@odata.context": f"{request.service_root}/$metadata#{entity.name}"
                        "/$deletedEntity",
                        "id": change.id,
                        "reason": "deleted",
                    }
                )
            else:
                values.append(self._render(entity, change.row, select))
        # A delta page lists new and changed rows first, then the deletions.
        body: dict[str, Any] = {"@odata.context": f"{context}/$delta", "value": values + deleted}
        if len(changes) > page_size:
            # Changes are ordered by version, so the next page starts right after this one.
            next_query = [(k, v) for k, v in request.query if k != "$deltatoken"]
            next_query.append(("$deltatoken", delta_token(changes[page_size - 1].seq, time.time())))
            body["@odata.nextLink"] = self._link(request, entity, next_query)
        else:
            body["@odata.deltaLink"] = self._delta_link(request, entity, records.current_seq)
        return _json_response(200, body, ("Preference-Applied", "odata.track-changes"))

    def _read_delta_token(self, records: Records, token: str) -> int:
        seq_text, _, stamp = token.partition("!")
        try:
            seq = int(seq_text)
            issued = datetime.strptime(stamp, "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC)
        except ValueError:
            raise bad_query("The $deltatoken is not valid.") from None
        if seq < 0 or seq > records.current_seq:
            raise bad_query("The $deltatoken is not valid.")
        if time.time() - issued.timestamp() > self.delta_token_ttl_s:
            raise ODataError(
                400,
                "0x80044352",
                "Version stamp associated with the client has expired. Please perform a full sync.",
            )
        return seq

    # --- metadata --------------------------------------------------------------------------

    def _entity_definitions(self, records: Records, path: str, request: ApiRequest) -> ApiResponse:
        if request.method == "POST":
            return self._metadata_write(records, path, request)
        if request.method != "GET":
            raise ODataError(
                501, "0x80060888", f"{request.method} of metadata is not supported by the emulator."
            )
        options = self._options(request, allowed={"$select", "$filter", "$expand"})
        root = f"{request.service_root}/$metadata#EntityDefinitions"
        head, _, tail = path.partition("/")
        definitions = [entity_definition(e, self.key_status) for e in self.entity_sets.values()]
        if head != "EntityDefinitions":
            definitions = [d for d in definitions if _definition_matches(d, head)]
            if not definitions:
                raise ODataError(
                    404, "0x80040217", f"Could not find an entity with the key {head[17:][:100]}."
                )
            (definition,) = definitions
            collection, _, cast = tail.partition("/")
            if collection in ("Attributes", "Keys"):
                items = definition[collection]
                if cast:  # a derived-type cast, e.g. Attributes/...PicklistAttributeMetadata
                    items = [i for i in items if i.get("@odata.type") == f"#{cast}"]
                return _json_response(200, {"@odata.context": f"{root}/{tail}", "value": items})
            if tail:
                raise bad_query(f"The segment '{tail[:100]}' is not valid on EntityDefinitions.")
            return _json_response(
                200, {"@odata.context": f"{root}/$entity", **_shaped(definition, options)}
            )
        if "$filter" in options:
            definitions = [d for d in definitions if _filter_definition(d, options["$filter"])]
        return _json_response(
            200, {"@odata.context": root, "value": [_shaped(d, options) for d in definitions]}
        )

    def _metadata_write(self, records: Records, path: str, request: ApiRequest) -> ApiResponse:
        """Create a table (``POST EntityDefinitions``), a column (``.../Attributes``) or an
        alternate key (``.../Keys``), as the metadata API documents them; 204 + OData-EntityId."""
        try:
            body = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise bad_query("The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise bad_query("A JSON object was expected.")
        head, _, tail = path.partition("/")
        try:
            if path == "EntityDefinitions":
                entity = new_table(body, self.entity_sets)
            else:
                matches = [
                    e
                    for e in self.entity_sets.values()
                    if _definition_matches(entity_definition(e), head)
                ]
                if not matches or tail not in ("Attributes", "Keys"):
                    raise ODataError(404, "0x80040217", f"No entity for '{head[:100]}'.")
                change = with_column if tail == "Attributes" else with_key
                entity = change(matches[0], body)
        except MetadataRefused as refused:
            raise ODataError(refused.status, refused.code, refused.message) from None
        if tail == "Keys":
            self.index_new_key(records, entity, entity.alternate_keys[-1])
            self._key_active_at[(entity.name, entity.alternate_keys[-1])] = (
                time.monotonic() + self.key_index_delay_s
            )
        self.define(records, entity)
        location = (
            f"{request.service_root}/EntityDefinitions({entity_definition(entity)['MetadataId']})"
        )
        return ApiResponse(204, [("OData-EntityId", location), ("OData-Version", "4.0")])

    # --- bulk operations -------------------------------------------------------------------

    def _bulk(
        self, records: Records, entity: EntitySet, action: str, request: ApiRequest
    ) -> ApiResponse:
        """CreateMultiple / UpdateMultiple / UpsertMultiple: all targets or none (one
        transaction), as for standard tables."""
        try:
            payload = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise _payload_error(
                entity, "Invalid JSON. The request body is not valid JSON."
            ) from None
        targets = payload.get("Targets") if isinstance(payload, dict) else None
        if not isinstance(targets, list) or not targets:
            raise bad_query(f"{action} needs a non-empty 'Targets' collection.")
        if len(targets) > _MAX_BULK_TARGETS:
            raise bad_query(f"{action} takes at most {_MAX_BULK_TARGETS} targets.")
        ids: list[str] = []
        with records.prefetched(*self._bulk_reads(entity, targets, request)):
            for target in targets:
                ids.append(self._bulk_target(records, entity, action, target, request))
        if action == "UpdateMultiple":
            return ApiResponse(204, [("OData-Version", "4.0")])
        return _json_response(
            200,
            {
                "@odata.context": f"{request.service_root}/$metadata#{ENTITY_TYPE}."
                f"{action}Response",
                "Ids": ids,
            },
        )

    def _bulk_reads(
        self, entity: EntitySet, targets: list[Any], request: ApiRequest
    ) -> tuple[dict[str, set[str]], dict[str, dict[str, set[str]]]]:
        """What the targets will look up — their ids, their key values, the records they bind
        — read off the payload so that one query reads each kind (`Records.prefetched`). Only a
        guess: a target the guess misreads is looked up on its own, and checked as before."""
        ids: dict[str, set[str]] = {}
        keys: dict[str, dict[str, set[str]]] = {}
        primary = entity.by_name.get(entity.primary_id)
        for target in targets:
            if not isinstance(target, dict):
                continue
            if primary is not None:
                with contextlib.suppress(InvalidValue):
                    given = primary.coerce(target.get(entity.primary_id), DYNAMICS_DATETIME)
                    if isinstance(given, str):
                        ids.setdefault(entity.name, set()).add(given)
            for declared in entity.alternate_keys:
                values = []
                for name in declared:
                    column, value = entity.by_name.get(name), target.get(name)
                    if column is None or value is None:
                        break
                    try:
                        values.append(column.coerce(value, DYNAMICS_DATETIME))
                    except InvalidValue:
                        break
                else:
                    by_key = keys.setdefault(entity.name, {})
                    by_key.setdefault(",".join(declared), set()).add(key_value(values))
            for name, lookup in entity.by_bind.items():
                value = target.get(f"{name}@odata.bind")
                if isinstance(value, str):
                    with contextlib.suppress(ODataError):
                        bound, key = self._bind_reference(entity, lookup, value, request)
                        self._key_read(bound, key, ids, keys)
        return ids, keys

    @staticmethod
    def _key_read(
        entity: EntitySet,
        key: KeyPredicate,
        ids: dict[str, set[str]],
        keys: dict[str, dict[str, set[str]]],
    ) -> None:
        """What `_resolve` will look up for the key (nothing if it will refuse the key)."""
        if isinstance(key, str):
            ids.setdefault(entity.name, set()).add(key)
            return
        names = tuple(sorted(key))
        if names == (entity.primary_id,):
            guid = literal_for(entity.by_name[entity.primary_id], key[entity.primary_id])
            if isinstance(guid, str):
                ids.setdefault(entity.name, set()).add(guid)
            return
        declared = next((k for k in entity.alternate_keys if tuple(sorted(k)) == names), None)
        if declared is not None:
            values = [literal_for(entity.by_name[n], key[n]) for n in declared]
            if None not in values:
                by_key = keys.setdefault(entity.name, {})
                by_key.setdefault(",".join(declared), set()).add(key_value(values))

    def _bulk_target(
        self,
        records: Records,
        entity: EntitySet,
        action: str,
        target: Any,
        request: ApiRequest,
    ) -> str:
        if not isinstance(target, dict):
            raise _payload_error(entity, "A JSON object was expected for each target.")
        kind = target.get("@odata.type")
        if kind not in (
            f"Microsoft.Dynamics.CRM.{entity.logical_name}",
            f"#Microsoft.Dynamics.CRM.{entity.logical_name}",
        ):
            raise _payload_error(
                entity,
                f'Each target needs "@odata.type": "Microsoft.Dynamics.CRM.{entity.logical_name}".',
            )
        return self._bulk_one(records, entity, action, target, request)

    def _bulk_one(
        self,
        records: Records,
        entity: EntitySet,
        action: str,
        target: dict[str, Any],
        request: ApiRequest,
    ) -> str:
        body = {k: v for k, v in target.items() if k not in ("@odata.type", "@odata.id")}
        changes = self._parse_payload(records, entity, body, request)
        found: str | None = None
        reference = target.get("@odata.id")
        if reference is not None:  # the record named by URL: `<set>(<key>)`
            match = _PATH.match(str(reference).removeprefix(request.service_root + "/"))
            if match is None or match["set"] != entity.name or match["key"] is None:
                raise _payload_error(
                    entity, f"The @odata.id '{str(reference)[:200]}' is not valid."
                )
            key = parse_key(match["key"])
            found, url_keys = self._resolve(records, entity, key)
            changes.update(url_keys)
            if isinstance(key, str):
                changes[entity.primary_id] = key
        given_id = changes.get(entity.primary_id)
        if given_id is not None:
            found = given_id if records.get(entity.name, given_id) else None
        else:
            for declared in entity.alternate_keys:
                values = [changes.get(n) for n in declared]
                if all(v is not None for v in values):
                    found = records.find_by_key(entity.name, ",".join(declared), key_value(values))
                    break
            else:
                if action != "CreateMultiple":
                    raise bad_query(
                        f"Each target of {action} needs '{entity.primary_id}' or the values of "
                        "an alternate key."
                    )
        existing = records.get(entity.name, found) if found else None
        if action == "CreateMultiple" and existing is not None:
            raise ODataError(412, "0x80040237", "A record with matching key values already exists.")
        if action == "UpdateMultiple" and existing is None:
            raise _not_found(entity, given_id or {})
        id_ = found or given_id
        fresh = id_ is None
        if id_ is None:
            id_ = new_guid()
        doc = {**(existing.doc if existing else {}), **changes}
        return self._save(records, entity, id_, doc, existing is None, fresh=fresh).id

    # --- rendering -------------------------------------------------------------------------

    def _options(self, request: ApiRequest, allowed: set[str]) -> dict[str, str]:
        options: dict[str, str] = {}
        for name, value in request.query:
            if not name.startswith("$"):
                continue
            if name not in allowed:
                raise bad_query(f"The query parameter '{name[:50]}' is not supported.")
            if name in options:
                raise bad_query(f"Query option '{name}' was specified more than once.")
            options[name] = value
        return options

    def _select(self, entity: EntitySet, request: ApiRequest) -> list[str] | None:
        for name, value in request.query:
            if name == "$select":
                return parse_select(entity, value)
        return None

    @staticmethod
    def _etag(row: Row) -> str:
        return f'W/"{row.seq}"'

    def _render(self, entity: EntitySet, row: Row, select: list[str] | None) -> dict[str, Any]:
        names = select or [f.name for f in entity.fields]
        out: dict[str, Any] = {"@odata.etag": self._etag(row)}
        out.update({n: row.doc.get(n) for n in names})
        # Dataverse always returns the primary id, selected or not.
        out[entity.primary_id] = row.id
        return out

    def _link(self, request: ApiRequest, entity: EntitySet, query: list[tuple[str, str]]) -> str:
        return (
            f"{request.service_root}/{entity.name}?{urlencode(query, quote_via=quote, safe='$,')}"
        )

    def _delta_link(self, request: ApiRequest, entity: EntitySet, seq: int) -> str:
        query = [(k, v) for k, v in request.query if k == "$select"]
        query.append(("$deltatoken", delta_token(seq, time.time())))
        return self._link(request, entity, query)

    def index_statements(self) -> list[str]:
        """Expression indexes for alternate keys and common lookups, so $filter eq stays fast."""
        statements = []
        for entity in self.entity_sets.values():
            for f in entity.fields:
                if f.type is FieldType.STRING and f.name in ("emailaddress1",):
                    statements.append(
                        f"CREATE INDEX IF NOT EXISTS ix_{entity.name}_{f.name} "
                        f"ON records (kind, {folded(f.name)})"
                    )
        return statements
