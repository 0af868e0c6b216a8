"""The edit form of a workflow config: its controls, form data → config, errors → controls."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from crmsync.streams import catalog
from crmsync.streams.config import EVENT_TYPES

Kind = Literal["text", "checkbox", "select", "json", "csv"]
_OMIT: Any = object()


@dataclass(frozen=True)
class Control:
    """One top-level config key shown as one form control."""

    key: str
    label: str
    kind: Kind = "text"
    hint: str = ""
    choices: tuple[str, ...] = ()
    blank: Any = _OMIT  # what an emptied json/text control means; _OMIT: the model's default

    @property
    def id(self) -> str:
        return f"f-{self.key}"


#: The controls of each workflow's form, by workflow (tests/unit/test_catalog.py: one per
#: workflow of the registry, each naming a field of its config model). A config with
#: ``mappings`` or ``events`` also gets those rows (see ``_rows``).
CONTROLS: dict[str, tuple[Control, ...]] = {
    "d365-to-campaign": (
        Control("propagate_deletes", "Propagate deletes", "checkbox",
                "a contact deleted in Dynamics 365 deletes its Campaign profile"),
        Control("delete_when_filtered_out", "Delete profiles filtered out", "checkbox",
                "delete the profile of a contact that no longer matches the filters"),
        Control("filters", "Filters (JSON)", "json",
                'contacts not matching are not synced, e.g. {"all": [{"field": "statecode", '
                '"op": "eq", "value": 0}]}; empty: every contact', blank=None),
        Control("custom_entities", "Custom entities (JSON)", "json",
                "Dynamics custom entities → Campaign custom resources; [] for none", blank=[]),
        Control("profile_resource", "Campaign profile resource"),
        Control("contact_topic", "Contact topic", hint="the Kafka topic of contact changes"),
    ),
    "campaign-to-d365": (
        Control("subject_template", "Activity subject",
                hint="placeholders such as {campaign_id}, {delivery_id}, {campaign_name}"),
        Control("event_id_field", "Event id field",
                hint="the activities' alternate key: the event id"),
        Control("contact_entity_set", "Contact entity set"),
        Control("fields", "Activity columns (JSON)", "json",
                "column names of the activities; empty: the defaults"),
        Control("email_topic", "Email event topic"),
    ),
    "opt-in-out": (
        Control("direction", "Direction", "select",
                "which side's opt-out changes are written to the other",
                ("disabled", "d365-to-campaign", "campaign-to-d365", "bidirectional")),
        Control("d365_field", "Dynamics 365 field", hint="a boolean column, e.g. donotbulkemail"),
        Control("campaign_field", "Campaign field", hint="e.g. blackListEmail"),
        Control("contact_entity_set", "Contact entity set"),
        Control("profile_resource", "Campaign profile resource"),
        Control("contact_topic", "Contact topic"),
        Control("profile_topic", "Profile topic"),
        Control("ignore_users", "Ignored users", "csv",
                "source users whose changes are never synced, comma-separated"),
    ),
}  # fmt: skip

#: Mapping options without a control of their own: edited as one JSON object per row.
_MAPPING_OPTIONS = ("replacements", "picklist", "default")
_MAPPING_CONTROLS = ("source", "target", "apply_updates", "max_length")
_SUB_LABELS = {
    "source": "Dynamics 365 field",
    "target": "Campaign field",
    "apply_updates": "apply updates",
    "max_length": "max length",
    "options": "options",
    "enabled": "sync",
    "entity_set": "activity entity set",
}
_ROW = re.compile(r"^mappings-(\d+)-source\Z")


@dataclass
class MappingRow:
    source: str = ""
    target: str = ""
    apply_updates: bool = True
    max_length: str = ""
    options: str = ""


@dataclass
class EventRow:
    type: str
    enabled: bool
    entity_set: str


@dataclass
class ConfigForm:
    """What the edit template shows: values as typed, and errors by control id."""

    workflow: str
    controls: tuple[Control, ...]
    values: dict[str, Any]
    mappings: list[MappingRow] | None = None
    events: list[EventRow] | None = None
    errors: dict[str, list[str]] = field(default_factory=dict)
    general: list[str] = field(default_factory=list)

    def add_errors(self, errors: Sequence[Mapping[str, Any]]) -> None:
        """Puts each ``{"loc", "msg"}`` next to its control (else among the general errors)."""
        for error in errors:
            loc = list(error["loc"])
            target, prefix = self._place(loc)
            message = f"{prefix}: {error['msg']}" if prefix else str(error["msg"])
            if target is None:
                where = _path(loc)
                self.general.append(f"{where}: {message}" if where else message)
            else:
                self.errors.setdefault(target, []).append(message)

    def label(self, control_id: str) -> str:
        """What the error summary calls a control."""
        parts = control_id.removeprefix("f-").split("-")
        if parts[0] == "mappings" and len(parts) == 3:
            return f"Mapping {int(parts[1]) + 1}, {_SUB_LABELS.get(parts[2], parts[2])}"
        if parts[0] == "events" and len(parts) == 3:
            return f"{parts[1].capitalize()} events, {_SUB_LABELS.get(parts[2], parts[2])}"
        for control in self.controls:
            if control.id == control_id:
                return control.label
        return {"mappings": "Field mappings", "events": "Email events"}.get(parts[0], parts[0])

    def _place(self, loc: list[Any]) -> tuple[str | None, str]:
        if not loc:
            return None, ""
        head, rest = loc[0], loc[1:]
        if head == "mappings" and self.mappings is not None:
            if not rest or not isinstance(rest[0], int) or rest[0] >= len(self.mappings):
                return "f-mappings", _path(rest)
            row, sub = rest[0], rest[1:]
            if not sub:
                return f"f-mappings-{row}-source", ""
            if sub[0] in _MAPPING_CONTROLS:
                return f"f-mappings-{row}-{sub[0]}", _path(sub[1:])
            return f"f-mappings-{row}-options", "" if sub[0] == "options" else _path(sub)
        if head == "events" and self.events is not None:
            if not rest or rest[0] not in EVENT_TYPES:
                return "f-events", _path(rest)
            sub = rest[1:]
            if sub and sub[0] == "enabled":
                return f"f-events-{rest[0]}-enabled", _path(sub[1:])
            return f"f-events-{rest[0]}-entity_set", _path(sub[1:])
        for control in self.controls:
            if control.key == head:
                return control.id, _path(rest)
        return None, ""


def _path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _display(control: Control, value: Any) -> Any:
    if control.kind == "checkbox":
        return bool(value)
    if control.kind == "json":
        return "" if value is None else json.dumps(value, indent=2, ensure_ascii=False)
    if control.kind == "csv":
        return ", ".join(str(v) for v in value or [])
    return "" if value is None else str(value)


def _rows(workflow: str, field: str) -> bool:
    """Whether the workflow's config has ``field`` (the form shows its rows)."""
    return field in catalog.spec(workflow).config_model.model_fields


def from_config(workflow: str, config: Mapping[str, Any]) -> ConfigForm:
    """The form showing ``config`` (a config as the API returns it)."""
    controls = CONTROLS[workflow]
    form = ConfigForm(workflow, controls, {c.key: _display(c, config.get(c.key)) for c in controls})
    if _rows(workflow, "mappings"):
        form.mappings = [_mapping_row(m) for m in config.get("mappings") or []]
    if _rows(workflow, "events"):
        events = config.get("events") or {}
        form.events = [
            EventRow(t, bool(events.get(t, {}).get("enabled", True)),
                     str(events.get(t, {}).get("entity_set", "")))
            for t in EVENT_TYPES
        ]  # fmt: skip
    return form


def _mapping_row(mapping: Mapping[str, Any]) -> MappingRow:
    options = {
        k: v
        for k, v in mapping.items()
        if k not in _MAPPING_CONTROLS and not (k in _MAPPING_OPTIONS and v in (None, {}))
    }
    max_length = mapping.get("max_length")
    return MappingRow(
        source=str(mapping.get("source", "")),
        target=str(mapping.get("target", "")),
        apply_updates=bool(mapping.get("apply_updates", True)),
        max_length="" if max_length is None else str(max_length),
        options=json.dumps(options, ensure_ascii=False) if options else "",
    )


def parse(
    workflow: str, data: Mapping[str, str], base: Mapping[str, Any]
) -> tuple[dict[str, Any], ConfigForm]:
    """Form data → the config to validate (``base`` keeps what the form does not show), and the
    form as typed; text that is not JSON where JSON is due is already an error on the form."""
    controls = CONTROLS[workflow]
    config: dict[str, Any] = dict(base)
    form = ConfigForm(workflow, controls, {})
    local: list[dict[str, Any]] = []
    for control in controls:
        raw = data.get(control.id, "")
        value: Any
        if control.kind == "checkbox":
            form.values[control.key] = value = control.id in data
        elif control.kind == "csv":
            form.values[control.key] = raw
            value = [part.strip() for part in raw.split(",") if part.strip()]
        elif control.kind == "json":
            form.values[control.key] = raw
            if not raw.strip():
                value = control.blank
            else:
                try:
                    value = json.loads(raw)
                except ValueError as error:
                    local.append({"loc": [control.key], "msg": f"is not valid JSON: {error}"})
                    value = _OMIT
        else:
            form.values[control.key] = value = raw
        if value is _OMIT:
            config.pop(control.key, None)
        else:
            config[control.key] = value
    if _rows(workflow, "mappings"):
        config["mappings"] = _parse_mappings(data, form, local)
    if _rows(workflow, "events"):
        form.events = []
        events: dict[str, Any] = {}
        for kind in EVENT_TYPES:
            enabled = f"f-events-{kind}-enabled" in data
            entity_set = data.get(f"f-events-{kind}-entity_set", "")
            form.events.append(EventRow(kind, enabled, entity_set))
            events[kind] = {"enabled": enabled, "entity_set": entity_set}
        config["events"] = events
    form.add_errors(local)
    return config, form


def _parse_mappings(
    data: Mapping[str, str], form: ConfigForm, local: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Rows in the order of their numbers; a row with neither source nor target is dropped."""
    numbers = sorted(int(m.group(1)) for key in data if (m := _ROW.match(key.removeprefix("f-"))))
    form.mappings = []
    mappings: list[dict[str, Any]] = []
    for number in numbers:
        prefix = f"f-mappings-{number}-"
        row = MappingRow(
            source=data.get(prefix + "source", "").strip(),
            target=data.get(prefix + "target", "").strip(),
            apply_updates=prefix + "apply_updates" in data,
            max_length=data.get(prefix + "max_length", "").strip(),
            options=data.get(prefix + "options", "").strip(),
        )
        if not row.source and not row.target:
            continue
        index = len(form.mappings)
        form.mappings.append(row)
        mapping: dict[str, Any] = {
            "source": row.source,
            "target": row.target,
            "apply_updates": row.apply_updates,
        }
        if row.max_length:
            mapping["max_length"] = row.max_length
        if row.options:
            try:
                options = json.loads(row.options)
            except ValueError as error:
                options = None
                message = f"is not valid JSON: {error}"
            else:
                message = 'must be a JSON object such as {"default": "n/a"}'
            if isinstance(options, dict):
                mapping |= options
            else:
                local.append({"loc": ["mappings", index, "options"], "msg": message})
        mappings.append(mapping)
    return mappings
