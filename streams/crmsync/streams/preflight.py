"""Preflight: what each workflow's config needs in Dynamics and Campaign, and if it is there."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

from crmsync.streams.config import (
    PROFILE_KEY,
    CampaignToD365Config,
    D365ToCampaignConfig,
    OptInOutConfig,
    WorkflowConfig,
)
from crmsync.targets._http import RetryPolicy
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.errors import Fatal, NotFound, RecordRejected, Retryable, SinkError
from crmsync.targets.settings import CampaignTarget, DynamicsTarget

Kind = Literal["table", "column", "key", "navigation", "resource", "field", "filter"]
_EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


@dataclass(frozen=True, slots=True)
class Requirement:
    """One piece a workflow needs in a target: present, or missing with what to do."""

    workflow: str
    target: Literal["d365", "campaign"]
    kind: Kind
    name: str
    present: bool = False
    fix: str = ""
    #: A column's or field's type as the target describes it (``String(100)``, ``Decimal(2)``,
    #: ``string(64)``), so drift can tell a change that no longer fits the values.
    shape: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Table:
    """What the workflows need of one Dataverse table."""

    workflows: set[str] = field(default_factory=set)
    logical_name: str | None = None  # known for crmsync's own activity tables
    columns: dict[str, set[str]] = field(default_factory=dict)  # column → workflows
    keys: dict[tuple[str, ...], set[str]] = field(default_factory=dict)
    navigations: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class _Needs:
    tables: dict[str, _Table] = field(default_factory=dict)  # entity set → needs
    resources: dict[str, set[str]] = field(default_factory=dict)  # resource path → workflows
    fields: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (path, field)
    filters: dict[tuple[str, str, str], set[str]] = field(default_factory=dict)

    def table(self, entity_set: str, workflow: str) -> _Table:
        table = self.tables.setdefault(entity_set, _Table())
        table.workflows.add(workflow)
        return table

    def field(self, resource: str, name: str, workflow: str) -> None:
        self.fields.setdefault((resource, name), set()).add(workflow)


def needs_of(configs: Mapping[str, WorkflowConfig]) -> _Needs:
    """Every table, column, key, navigation property, resource and filter the configs use."""
    needs = _Needs()
    for workflow, config in configs.items():
        if isinstance(config, CampaignToD365Config):
            names = config.fields
            for kind, event in config.events.items():
                if not event.enabled:
                    continue
                table = needs.table(event.entity_set, workflow)
                table.logical_name = event.table
                columns = [
                    names.subject,
                    names.campaign_name,
                    names.delivery_name,
                    names.event_time,
                    names.mirror_page_url,
                    config.event_id_field,
                ]
                columns += {
                    "click": [names.url],
                    "bounce": [names.bounce_type, names.bounce_reason],
                }.get(kind, [])
                for column in columns:
                    table.columns.setdefault(column, set()).add(workflow)
                table.keys.setdefault((config.event_id_field,), set()).add(workflow)
                navigation = event.regarding_property(names.regarding)
                table.navigations.setdefault(navigation, set()).add(workflow)
            needs.table(config.contact_entity_set, workflow)
        elif isinstance(config, D365ToCampaignConfig):
            contacts = needs.table("contacts", workflow)
            for mapping in config.mappings:
                contacts.columns.setdefault(mapping.source, set()).add(workflow)
            needs.resources.setdefault(config.profile_resource, set()).add(workflow)
            needs.field(config.profile_resource, PROFILE_KEY, workflow)
            for mapping in config.mappings:
                needs.field(config.profile_resource, mapping.target, workflow)
            needs.filters.setdefault(
                ("profileAndServicesExt/profile", "byExternalId", "externalId_parameter"), set()
            ).add(workflow)
            for entity in config.custom_entities:
                needs.resources.setdefault(entity.target, set()).add(workflow)
                needs.field(entity.target, entity.key_field, workflow)
                for mapping in entity.mappings:
                    needs.field(entity.target, mapping.target, workflow)
                if entity.link is not None:
                    needs.field(entity.target, entity.link.target_field, workflow)
                filter_name = f"by{entity.key_field[:1].upper()}{entity.key_field[1:]}"
                needs.filters.setdefault(
                    (entity.target, filter_name, f"{entity.key_field}_parameter"), set()
                ).add(workflow)
        elif isinstance(config, OptInOutConfig):
            if config.direction == "disabled":
                continue
            contacts = needs.table(config.contact_entity_set, workflow)
            contacts.columns.setdefault(config.d365_field, set()).add(workflow)
            needs.resources.setdefault(config.profile_resource, set()).add(workflow)
            needs.field(config.profile_resource, config.campaign_field, workflow)
            needs.filters.setdefault(
                ("profileAndServicesExt/profile", "byExternalId", "externalId_parameter"), set()
            ).add(workflow)
    return needs


def _each(workflows: set[str]) -> list[str]:
    return sorted(workflows)


#: Names every needed table or resource has, whether the configs use them or not:
#: ``d365:<entity set>`` / ``campaign:<resource>`` → column or field names.
Inventory = dict[str, set[str]]


def column_shape(attribute: Mapping[str, Any]) -> str:
    """``String(100)``, ``Decimal(2)`` (decimal places), ``Integer``...: the AttributeMetadata's
    type with what bounds its values (MaxLength of String/Memo, Precision of Decimal/Money)."""
    kind = str(attribute.get("AttributeType") or "")
    if not kind:
        kind = (
            str(attribute.get("@odata.type", ""))
            .rpartition(".")[2]
            .removesuffix("AttributeMetadata")
        )
    for bound in ("MaxLength", "Precision"):
        if isinstance(attribute.get(bound), int):
            return f"{kind}({attribute[bound]})"
    return kind


def field_shape(described: Mapping[str, Any]) -> str:
    """``string(64)``, ``double``...: a Campaign field's ``type`` and ``length``."""
    kind = str(described.get("type") or "")
    length = described.get("length")
    return f"{kind}({length})" if isinstance(length, int) else kind


async def check_dynamics(
    client: DynamicsClient, needs: _Needs, inventory: Inventory | None = None
) -> list[Requirement]:
    """Reads EntityDefinitions (with Attributes and Keys) and $metadata's navigation properties."""
    found: list[Requirement] = []
    navigations = await _navigation_properties(client)
    for entity_set, table in sorted(needs.tables.items()):
        definition = await _definition(client, entity_set)
        for workflow in _each(table.workflows):
            found.append(
                Requirement(
                    workflow,
                    "d365",
                    "table",
                    entity_set,
                    definition is not None,
                    "" if definition else "create the table: crmsync targets setup d365",
                )
            )
        attributes = {
            str(a.get("LogicalName")): a for a in (definition or {}).get("Attributes", [])
        }
        if inventory is not None and definition is not None:
            inventory[f"d365:{entity_set}"] = set(attributes)
        keys = {
            tuple(sorted(k.get("KeyAttributes", []))): k.get("EntityKeyIndexStatus") or "Active"
            for k in (definition or {}).get("Keys", [])
        }
        logical = (definition or {}).get("LogicalName", "")
        for column, workflows in sorted(table.columns.items()):
            present = column in attributes
            for workflow in _each(workflows):
                found.append(
                    Requirement(
                        workflow,
                        "d365",
                        "column",
                        f"{entity_set}.{column}",
                        present,
                        "" if present else f"add the column {column} (crmsync targets setup d365)",
                        column_shape(attributes[column]) if present else "",
                    )
                )
        for key, workflows in sorted(table.keys.items()):
            status = keys.get(tuple(sorted(key)))
            present = status == "Active"
            for workflow in _each(workflows):
                found.append(
                    Requirement(
                        workflow,
                        "d365",
                        "key",
                        f"{entity_set}({','.join(key)})",
                        present,
                        "" if present else _key_fix(key, status),
                    )
                )
        for navigation, workflows in sorted(table.navigations.items()):
            present = navigation in navigations.get(logical, set())
            for workflow in _each(workflows):
                found.append(
                    Requirement(
                        workflow,
                        "d365",
                        "navigation",
                        f"{entity_set}.{navigation}",
                        present,
                        ""
                        if present
                        else "make it an activity table (its regarding lookup is then named "
                        "regardingobjectid_contact_<logical name>) or set events.<type>.regarding",
                    )
                )
    return found


_CREATE_KEY = "create an alternate key on"


def _key_fix(key: tuple[str, ...], status: str | None) -> str:
    if status is None:
        return f"{_CREATE_KEY} {', '.join(key)} (crmsync targets setup d365)"
    if status == "Failed":
        return (
            "the key's index job failed (duplicate values?): correct the rows, then reactivate "
            "the key (ReactivateEntityKey)"
        )
    return f"the key's index is {status}: Dataverse builds it in the background; check again"


async def _definition(client: DynamicsClient, entity_set: str) -> dict[str, Any] | None:
    # Attributes without a nested $select: only then does each come with its derived type's
    # properties (MaxLength of a StringAttributeMetadata, Precision of a Decimal one).
    params = {
        "$filter": f"EntitySetName eq '{entity_set}'",
        "$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
        "$expand": "Attributes,Keys($select=KeyAttributes,EntityKeyIndexStatus)",
    }
    url = f"{client.api_url}/EntityDefinitions?{urlencode(params, safe='$,()=')}"
    response = await client.raw("GET", url, what=f"EntityDefinitions {entity_set}")
    if response.status_code != 200:
        raise Fatal(f"EntityDefinitions {entity_set}: HTTP {response.status_code}")
    values = response.json().get("value") or []
    return dict(values[0]) if values else None


async def _navigation_properties(client: DynamicsClient) -> dict[str, set[str]]:
    """Entity type → its navigation properties, from the CSDL $metadata document."""
    response = await client.raw("GET", f"{client.api_url}/$metadata", what="$metadata")
    if response.status_code != 200:
        raise Fatal(f"$metadata: HTTP {response.status_code}")
    root = ElementTree.fromstring(response.content)
    found: dict[str, set[str]] = {}
    for entity_type in root.iter(f"{_EDM}EntityType"):
        names = {n.get("Name", "") for n in entity_type.iter(f"{_EDM}NavigationProperty")}
        found[entity_type.get("Name", "")] = names
    return found


async def check_campaign(
    client: CampaignClient, needs: _Needs, inventory: Inventory | None = None
) -> list[Requirement]:
    """Reads each resource (one line) and calls each custom filter with a value nothing has."""
    found: list[Requirement] = []
    for resource, workflows in sorted(needs.resources.items()):
        present = await _answers(client, f"{client.url(resource)}?_lineCount=1")
        for workflow in _each(workflows):
            found.append(
                Requirement(
                    workflow,
                    "campaign",
                    "resource",
                    resource,
                    present,
                    ""
                    if present
                    else "create the resource in Campaign (Administration > Development > Custom "
                    "resources), link it to the profile, publish; see docs/targets.md",
                )
            )
    described: dict[str, dict[str, str] | None] = {}
    for (resource, name), workflows in sorted(needs.fields.items()):
        if resource not in described:
            described[resource] = await _resource_fields(client, resource)
            if inventory is not None and described[resource] is not None:
                inventory[f"campaign:{resource}"] = set(described[resource] or {})
        fields = described[resource]
        present = fields is not None and name in fields
        fix = (
            ""
            if present
            else "create the resource first (see the resource line)"
            if fields is None
            else _field_fix(resource, name)
        )
        for workflow in _each(workflows):
            shape = fields[name] if fields is not None and present else ""
            found.append(
                Requirement(
                    workflow, "campaign", "field", f"{resource}.{name}", present, fix, shape
                )
            )
    for (resource, name, parameter), workflows in sorted(needs.filters.items()):
        url = f"{client.url(resource, name)}?{urlencode({parameter: '__crmsync_preflight__'})}"
        present = await _answers(client, url)
        for workflow in _each(workflows):
            found.append(
                Requirement(
                    workflow,
                    "campaign",
                    "filter",
                    f"{resource}/{name}?{parameter}=",
                    present,
                    ""
                    if present
                    else f"define the custom filter {name} on {resource} in Campaign's UI "
                    "(resource > Definition > Filter definition), publish; see docs/targets.md",
                )
            )
    return found


def _field_fix(resource: str, name: str) -> str:
    resource_name = resource.rpartition("/")[2]
    if resource_name == "profile":
        return (
            f"add the field {name} to the profile's extension in Campaign's UI (Administration > "
            "Development > Custom resources > Profile (profile), Data structure), then "
            "Administration > Development > Publication > Prepare publication with 'Create the "
            "Profiles & Services Ext API' checked > Publish; see docs/targets.md"
        )
    return (
        f"add the field {name} to the custom resource {resource_name} in Campaign's UI "
        "(Administration > Development > Custom resources, Data structure), then publish "
        "(Publication > Prepare publication > Publish); see docs/targets.md"
    )


async def _resource_fields(client: CampaignClient, resource: str) -> dict[str, str] | None:
    """The fields' API names (→ their shapes) from the metadata mechanism,
    ``GET <root>/resourceType/<name>``; None when the resource is not there."""
    root, _, name = resource.rpartition("/")
    try:
        described = await client.raw_get(client.url(f"{root}/resourceType/{name}"))
    except (NotFound, RecordRejected):
        return None
    content = described.get("content")
    if not isinstance(content, dict):
        return {}
    return {
        str(f.get("apiName", key)) if isinstance(f, dict) else str(key): field_shape(f)
        if isinstance(f, dict)
        else ""
        for key, f in content.items()
    }


async def _answers(client: CampaignClient, url: str) -> bool:
    try:
        await client.raw_get(url)
    except (NotFound, RecordRejected):
        return False
    return True


async def check(
    configs: Mapping[str, WorkflowConfig],
    dynamics: DynamicsClient,
    campaign: CampaignClient,
    inventory: Inventory | None = None,
) -> list[Requirement]:
    """Every requirement of the configs, present or missing, Dynamics first (``inventory``, when
    given, gets every column and field name of the tables and resources read)."""
    needs = needs_of(configs)
    try:
        found = await check_dynamics(dynamics, needs, inventory)
    except SinkError as error:
        found = [Requirement("*", "d365", "table", "Web API", False, error.reason)]
    try:
        found += await check_campaign(campaign, needs, inventory)
    except SinkError as error:
        found.append(Requirement("*", "campaign", "resource", "REST API", False, error.reason))
    return found


def missing(requirements: list[Requirement], workflow: str | None = None) -> list[Requirement]:
    return [
        r
        for r in requirements
        if not r.present and (workflow is None or r.workflow in (workflow, "*"))
    ]


#: Columns of crmsync's activity tables: (AttributeMetadata type, MaxLength).
_COLUMN_SPECS: dict[str, tuple[str, int | None]] = {
    "crmsync_eventid": ("StringAttributeMetadata", 100),
    "crmsync_campaignname": ("StringAttributeMetadata", 200),
    "crmsync_deliveryname": ("StringAttributeMetadata", 200),
    "crmsync_mirrorpageurl": ("StringAttributeMetadata", 2000),
    "crmsync_url": ("StringAttributeMetadata", 2000),
    "crmsync_bouncetype": ("StringAttributeMetadata", 100),
    "crmsync_bouncereason": ("StringAttributeMetadata", 2000),
    "crmsync_eventtime": ("DateTimeAttributeMetadata", None),
}


@dataclass(frozen=True, slots=True)
class MetadataRequest:
    """One Web API metadata write of ``crmsync targets setup d365``."""

    method: str
    path: str  # relative to the Web API root
    body: dict[str, Any]


def _label(text: str) -> dict[str, Any]:
    return {"LocalizedLabels": [{"Label": text, "LanguageCode": 1033}]}


def _attribute(column: str) -> dict[str, Any]:
    kind, length = _COLUMN_SPECS.get(column, ("StringAttributeMetadata", 200))
    body: dict[str, Any] = {
        "@odata.type": f"Microsoft.Dynamics.CRM.{kind}",
        "SchemaName": column,
        "DisplayName": _label(column.removeprefix("crmsync_")),
        "RequiredLevel": {"Value": "None"},
    }
    if length is not None:
        body["MaxLength"] = length
    if kind == "DateTimeAttributeMetadata":
        body["Format"] = "DateAndTime"
    return body


def setup_plan(
    configs: Mapping[str, WorkflowConfig], found: list[Requirement]
) -> list[MetadataRequest]:
    """The metadata writes that create what is missing of crmsync's own activity tables: the
    table (``POST EntityDefinitions``, an activity table), its columns (``.../Attributes``) and
    its alternate keys (``.../Keys``), in that order. Other tables are left to their owners."""
    needs = needs_of(configs)
    own = {s: t for s, t in needs.tables.items() if t.logical_name}
    absent = {
        (r.kind, r.name)
        for r in found
        if not r.present
        and r.target == "d365"
        # a key whose index is still being built (or failed) exists: creating it again fails
        and (r.kind != "key" or r.fix.startswith(_CREATE_KEY))
    }
    plan: list[MetadataRequest] = []
    for entity_set, table in sorted(own.items()):
        logical = table.logical_name
        assert logical is not None
        where = f"EntityDefinitions(LogicalName='{logical}')"
        if ("table", entity_set) in absent:
            plan.append(
                MetadataRequest(
                    "POST",
                    "EntityDefinitions",
                    {
                        "@odata.type": "Microsoft.Dynamics.CRM.EntityMetadata",
                        "SchemaName": logical,
                        "DisplayName": _label(logical.removeprefix("crmsync_")),
                        "DisplayCollectionName": _label(entity_set.removeprefix("crmsync_")),
                        "OwnershipType": "UserOwned",
                        "IsActivity": True,
                        "HasActivities": False,
                        "HasNotes": False,
                        "Attributes": [
                            {
                                "@odata.type": "Microsoft.Dynamics.CRM.StringAttributeMetadata",
                                "SchemaName": "Subject",
                                "IsPrimaryName": True,
                                "MaxLength": 400,
                                "RequiredLevel": {"Value": "None"},
                                "DisplayName": _label("Subject"),
                            }
                        ],
                    },
                )
            )
        for column in sorted(table.columns):
            if ("column", f"{entity_set}.{column}") in absent and column != "subject":
                plan.append(MetadataRequest("POST", f"{where}/Attributes", _attribute(column)))
        for key in sorted(table.keys):
            if ("key", f"{entity_set}({','.join(key)})") in absent:
                name = f"{logical}_{'_'.join(key)}_key"
                plan.append(
                    MetadataRequest(
                        "POST",
                        f"{where}/Keys",
                        {
                            "SchemaName": name,
                            "DisplayName": _label(name),
                            "KeyAttributes": list(key),
                        },
                    )
                )
    return plan


async def apply(client: DynamicsClient, plan: list[MetadataRequest]) -> None:
    """Send the plan's metadata writes in order; a refusal raises ``Fatal`` with the answer."""
    for step in plan:
        url = f"{client.api_url}/{step.path}"
        response = await client.raw(
            step.method, url, what=f"{step.method} {step.path}", body=step.body
        )
        if response.status_code >= 300:
            raise Fatal(
                f"{step.method} {step.path}: HTTP {response.status_code}: {response.text[:300]}"
            )


async def setup_dynamics(
    configs: Mapping[str, WorkflowConfig], client: DynamicsClient, *, dry_run: bool = False
) -> list[MetadataRequest]:
    """``crmsync targets setup d365``: reads what the configs need of Dynamics, and creates what
    is missing of crmsync's activity tables (unless ``dry_run``); returns the plan. Idempotent:
    a second call finds everything and sends nothing."""
    found = await check_dynamics(client, needs_of(configs))
    plan = setup_plan(configs, found)
    if not dry_run:
        await apply(client, plan)
    return plan


async def missing_for_start(
    workflow: str, config: WorkflowConfig, dynamics: DynamicsTarget, campaign: CampaignTarget
) -> list[Requirement]:
    """What the workflow's config needs and its targets definitely lack; a target that cannot be
    reached now blocks nothing (the workers retry it), so a Start is refused only for a
    missing piece."""
    once = RetryPolicy(attempts=1, budget_s=0.0)
    try:
        async with (
            DynamicsClient(dynamics, retry=once) as d365,
            CampaignClient(campaign, retry=once) as acs,
        ):
            found = await check({workflow: config}, d365, acs)
    except Retryable:
        return []
    except SinkError as error:  # e.g. no Entra authority known for the org's host
        return [Requirement(workflow, "d365", "table", "Web API", False, error.reason)]
    return [r for r in missing(found, workflow) if r.workflow == workflow]
