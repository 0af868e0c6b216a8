"""Dataverse metadata of the emulator's model: service document, $metadata, EntityDefinitions."""

from __future__ import annotations

import uuid
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
    if field.type is FieldType.LOOKUP and field.target:
        definition["Targets"] = [field.target]
    return definition


def key_definition(entity: EntitySet, columns: tuple[str, ...]) -> dict[str, Any]:
    logical = f"{entity.logical_name}_{'_'.join(columns)}_key"
    return {
        "MetadataId": metadata_id(entity.logical_name, "key", *columns),
        "LogicalName": logical,
        "SchemaName": schema_name(logical),
        "EntityLogicalName": entity.logical_name,
        "KeyAttributes": list(columns),
        "EntityKeyIndexStatus": "Active",
    }


def entity_definition(entity: EntitySet) -> dict[str, Any]:
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
        "Keys": [key_definition(entity, k) for k in entity.alternate_keys],
    }
