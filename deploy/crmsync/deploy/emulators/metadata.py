"""Dataverse metadata of the emulator's model: service document, $metadata, EntityDefinitions."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import quoteattr

from crmsync.deploy.emulators.model import EntitySet, FieldDef, FieldType
from crmsync.deploy.emulators.odata import ENTITY_TYPE

_EDM = {
    FieldType.STRING: "Edm.String",
    FieldType.BOOL: "Edm.Boolean",
    FieldType.INT: "Edm.Int32",
    FieldType.DECIMAL: "Edm.Decimal",
    FieldType.DATETIME: "Edm.DateTimeOffset",
    FieldType.GUID: "Edm.Guid",
    FieldType.LOOKUP: "Edm.Guid",
}
_ATTRIBUTE_TYPE = {
    FieldType.STRING: "String",
    FieldType.BOOL: "Boolean",
    FieldType.INT: "Integer",
    FieldType.DECIMAL: "Decimal",
    FieldType.DATETIME: "DateTime",
    FieldType.GUID: "Uniqueidentifier",
    FieldType.LOOKUP: "Lookup",
}
#: Messages bound to every entity set's collection (bulk operations).
BULK_ACTIONS = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")


def metadata_id(*names: str) -> str:
    """A stable MetadataId for a table, column or key of the model."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "crmsync-emulator:" + "/".join(names)))


def schema_name(logical_name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in logical_name.split("_"))


def service_document(service_root: str, entity_sets: dict[str, EntitySet]) -> dict[str, Any]:
    """``GET /api/data/v9.2/``: the entity sets, as OData's service document lists them."""
    names = sorted([*entity_sets, "EntityDefinitions"])
    return {
        "@odata.context": f"{service_root}/$metadata",
        "value": [{"name": n, "kind": "EntitySet", "url": n} for n in names],
    }


def _attribute_name(field: FieldDef) -> str:
    # A lookup is read as `_<x>_value`; its attribute's logical name is the `<x>`.
    if (
        field.type is FieldType.LOOKUP
        and field.name.startswith("_")
        and field.name.endswith("_value")
    ):
        return field.name[1 : -len("_value")]
    return field.name


def csdl(entity_sets: dict[str, EntitySet]) -> str:
    """The CSDL $metadata document of the model: entity types, keys, properties, navigation
    properties, the entity container and the bulk actions bound to each collection."""
    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">',
        "<edmx:DataServices>",
        f'<Schema Namespace="{ENTITY_TYPE}" Alias="mscrm" '
        'xmlns="http://docs.oasis-open.org/odata/ns/edm">',
    ]
    for entity in entity_sets.values():
        out.append(f"<EntityType Name={quoteattr(entity.logical_name)}>")
        out.append(f'<Key><PropertyRef Name="{entity.primary_id}" /></Key>')
        for field in entity.fields:
            out.append(
                f'<Property Name={quoteattr(field.name)} Type="{_EDM[field.type]}" />'
                if field.type in _EDM
                else ""
            )
        for field in entity.fields:
            if field.type is FieldType.LOOKUP and field.bind and field.target in entity_sets:
                target = entity_sets[field.target].logical_name
                out.append(
                    f"<NavigationProperty Name={quoteattr(field.bind)} "
                    f'Type="mscrm.{target}">'
                    f'<ReferentialConstraint Property="{field.name}" '
                    f'ReferencedProperty="{entity_sets[field.target].primary_id}" />'
                    "</NavigationProperty>"
                )
        out.append("</EntityType>")
    for entity in entity_sets.values():
        for action in BULK_ACTIONS:
            out.append(
                f'<Action Name="{action}" IsBound="true">'
                f'<Parameter Name="entityset" Type="Collection(mscrm.{entity.logical_name})" />'
                f'<Parameter Name="Targets" Type="Collection(mscrm.crmbaseentity)" />'
                "</Action>"
            )
    out.append('<EntityContainer Name="System">')
    for entity in entity_sets.values():
        out.append(
            f'<EntitySet Name={quoteattr(entity.name)} EntityType="mscrm.{entity.logical_name}" />'
        )
    out.append('<EntitySet Name="EntityDefinitions" EntityType="mscrm.EntityMetadata" />')
    out += ["</EntityContainer>", "</Schema>", "</edmx:DataServices>", "</edmx:Edmx>"]
    return "\n".join(line for line in out if line)


def attribute_definition(entity: EntitySet, field: FieldDef) -> dict[str, Any]:
    name = _attribute_name(field)
    definition: dict[str, Any] = {
        "@odata.type": f"#Microsoft.Dynamics.CRM.{_ATTRIBUTE_TYPE[field.type]}AttributeMetadata"
        if field.type in _ATTRIBUTE_TYPE
        else "#Microsoft.Dynamics.CRM.AttributeMetadata",
        "MetadataId": metadata_id(entity.logical_name, name),
        "LogicalName": name,
        "SchemaName": schema_name(name),
        "EntityLogicalName": entity.logical_name,
        "AttributeType": _ATTRIBUTE_TYPE.get(field.type, "Virtual"),
        "IsPrimaryId": field.name == entity.primary_id,
        "IsValidForCreate": not field.read_only,
        "IsValidForUpdate": not field.read_only and field.name != entity.primary_id,
    }
    if field.max_length is not None:
        definition["MaxLength"] = field.max_length
    if field.type is FieldType.DECIMAL:
        # DecimalAttributeMetadata.Precision: digits after the point, 2 unless set at creation.
        definition["Precision"] = 2 if field.precision is None else field.precision
    if field.type is FieldType.LOOKUP and field.target:
        definition["Targets"] = [field.target]
    return definition


def key_definition(
    entity: EntitySet, columns: tuple[str, ...], status: str = "Active"
) -> dict[str, Any]:
    logical = f"{entity.logical_name}_{'_'.join(columns)}_key"
    return {
        "MetadataId": metadata_id(entity.logical_name, "key", *columns),
        "LogicalName": logical,
        "SchemaName": schema_name(logical),
        "EntityLogicalName": entity.logical_name,
        "KeyAttributes": list(columns),
        # Pending, InProgress, Active or Failed: the index is built by a background job.
        "EntityKeyIndexStatus": status,
    }


def entity_definition(
    entity: EntitySet, key_status: Callable[[str, tuple[str, ...]], str] | None = None
) -> dict[str, Any]:
    """One table's EntityMetadata, with its Attributes and Keys."""
    return {
        "@odata.type": "#Microsoft.Dynamics.CRM.EntityMetadata",
        "MetadataId": metadata_id(entity.logical_name),
        "LogicalName": entity.logical_name,
        "SchemaName": schema_name(entity.logical_name),
        "EntitySetName": entity.name,
        "LogicalCollectionName": entity.name,
        "PrimaryIdAttribute": entity.primary_id,
        "PrimaryNameAttribute": "subject" if "subject" in entity.by_name else None,
        "IsActivity": entity.primary_id == "activityid",
        "ChangeTrackingEnabled": entity.change_tracking,
        "Attributes": [attribute_definition(entity, f) for f in entity.fields],
        "Keys": [
            key_definition(entity, k, key_status(entity.name, k) if key_status else "Active")
            for k in entity.alternate_keys
        ],
    }


class MetadataRefused(Exception):
    """A metadata write the Web API would refuse: status, code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _label(body: dict[str, Any], name: str) -> str:
    label = body.get(name) or {}
    labels = label.get("LocalizedLabels") if isinstance(label, dict) else None
    if isinstance(labels, list) and labels and isinstance(labels[0], dict):
        return str(labels[0].get("Label", ""))
    return ""


def _column(body: dict[str, Any]) -> FieldDef:
    """A column from an AttributeMetadata body (String, Memo, DateTime, Integer, Decimal,
    Boolean), as ``POST EntityDefinitions(...)/Attributes`` takes it."""
    kind = (
        str(body.get("@odata.type", "")).removeprefix("#").removeprefix("Microsoft.Dynamics.CRM.")
    )
    schema = body.get("SchemaName")
    if not isinstance(schema, str) or not schema:
        raise MetadataRefused(400, "0x80044363", "SchemaName is required for an attribute.")
    types = {
        "StringAttributeMetadata": FieldType.STRING,
        "MemoAttributeMetadata": FieldType.STRING,
        "DateTimeAttributeMetadata": FieldType.DATETIME,
        "IntegerAttributeMetadata": FieldType.INT,
        "DecimalAttributeMetadata": FieldType.DECIMAL,
        "BooleanAttributeMetadata": FieldType.BOOL,
    }
    if kind not in types:
        raise MetadataRefused(400, "0x80060888", f"Attribute type '{kind[:100]}' is not supported.")
    length = body.get("MaxLength")
    precision = body.get("Precision")
    return FieldDef(
        name=schema.lower(),
        type=types[kind],
        max_length=int(length) if isinstance(length, int) and length > 0 else None,
        precision=precision
        if types[kind] is FieldType.DECIMAL and isinstance(precision, int) and 0 <= precision <= 10
        else None,
    )


def new_table(body: dict[str, Any], existing: dict[str, EntitySet]) -> EntitySet:
    """The table a ``POST EntityDefinitions`` body defines (``IsActivity`` → an activity table,
    keyed by ``activityid``, with its per-table regarding lookup to contacts)."""
    schema = body.get("SchemaName")
    if not isinstance(schema, str) or not schema:
        raise MetadataRefused(400, "0x80044363", "SchemaName is required for an entity.")
    logical = schema.lower()
    if any(e.logical_name == logical for e in existing.values()):
        raise MetadataRefused(
            400, "0x80044363", f"An entity with the specified name {logical} already exists."
        )
    entity_set = logical + ("es" if logical.endswith(("s", "x", "z", "ch", "sh")) else "s")
    columns = [_column(a) for a in body.get("Attributes") or [] if isinstance(a, dict)]
    maintained = (
        FieldDef(name="createdon", type=FieldType.DATETIME, read_only=True),
        FieldDef(name="modifiedon", type=FieldType.DATETIME, read_only=True),
        FieldDef(name="_modifiedby_value", type=FieldType.GUID, read_only=True),
    )
    if body.get("IsActivity"):
        primary = "activityid"
        given = {c.name for c in columns}
        # Every activity table has the activity columns of activitypointer, subject and
        # description among them (the SchemaName "Subject" of the primary name is one of them).
        base = [
            FieldDef(name="subject", type=FieldType.STRING, max_length=400),
            FieldDef(name="description", type=FieldType.STRING, max_length=2000),
        ]
        columns = [c for c in base if c.name not in given] + columns
        columns.append(
            FieldDef(
                name="_regardingobjectid_value",
                type=FieldType.LOOKUP,
                target="contacts",
                bind=f"regardingobjectid_contact_{logical}",
            )
        )
    else:
        primary = f"{logical}id"
    return EntitySet(
        name=entity_set,
        logical_name=logical,
        primary_id=primary,
        fields=(FieldDef(name=primary, type=FieldType.GUID), *columns, *maintained),
    )


def with_column(entity: EntitySet, body: dict[str, Any]) -> EntitySet:
    column = _column(body)
    if column.name in entity.by_name:
        raise MetadataRefused(
            400, "0x80044363", f"An attribute with the specified name {column.name} already exists."
        )
    fields = [f.model_dump() for f in entity.fields] + [column.model_dump()]
    return EntitySet.model_validate({**entity.model_dump(), "fields": fields})


def with_key(entity: EntitySet, body: dict[str, Any]) -> EntitySet:
    columns = body.get("KeyAttributes")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise MetadataRefused(400, "0x80060888", "KeyAttributes must name the key's columns.")
    missing = [c for c in columns if c not in entity.by_name]
    if missing:
        raise MetadataRefused(
            400, "0x80060888", f"The key's columns do not exist: {', '.join(missing)[:200]}."
        )
    if tuple(sorted(columns)) in {tuple(sorted(k)) for k in entity.alternate_keys}:
        raise MetadataRefused(400, "0x80044363", "A key on these columns already exists.")
    keys = [*entity.alternate_keys, tuple(columns)]
    return EntitySet.model_validate({**entity.model_dump(), "alternate_keys": keys})
