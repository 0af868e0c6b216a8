"""Workflow configs: defaults, field-level errors as the API reports them, and the pending diff."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from crmsync.streams import catalog
from crmsync.streams.catalog import NAMES as WORKFLOWS
from crmsync.streams.catalog import default_config, parse_config
from crmsync.streams.config import (
    CampaignToD365Config,
    ConfigError,
    D365ToCampaignConfig,
    OptInOutConfig,
    config_diff,
    redacted,
)


def errors_of(workflow: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(workflow, data)
    return caught.value.errors


def locs(errors: list[dict[str, Any]]) -> list[list[str | int]]:
    return [e["loc"] for e in errors]


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_every_default_validates_round_trips_and_names_its_topics(workflow: str) -> None:
    config = default_config(workflow)
    dumped = redacted(config)

    assert parse_config(workflow, dumped) == config
    assert config.source_topics()
    assert all(isinstance(topic, str) and topic for topic in config.source_topics())
    assert catalog.spec(workflow).config_model.model_json_schema()["type"] == "object"


def test_defaults_match_the_design() -> None:
    d2c = default_config("d365-to-campaign")
    c2d = default_config("campaign-to-d365")
    opt = default_config("opt-in-out")
    assert isinstance(d2c, D365ToCampaignConfig)
    assert isinstance(c2d, CampaignToD365Config)
    assert isinstance(opt, OptInOutConfig)

    pairs = {(m.source, m.target) for m in d2c.mappings}
    assert {
        ("firstname", "firstName"),
        ("lastname", "lastName"),
        ("emailaddress1", "email"),
        ("contactid", "externalId"),
    } <= pairs
    assert d2c.propagate_deletes and not d2c.delete_when_filtered_out
    assert d2c.source_topics() == ["d365.contact.changes", "d365.entity.new_purchase.changes"]
    (purchase,) = d2c.custom_entities
    assert (purchase.target, purchase.key_field) == (
        "profileAndServicesExt/cusPurchase",
        "purchaseId",
    )
    assert purchase.link is not None and purchase.link.source_field == "_new_contactid_value"

    assert {t: (e.enabled, e.entity_set) for t, e in c2d.events.items()} == {
        "send": (True, "crmsync_emailsends"),
        "open": (True, "crmsync_emailopens"),
        "click": (True, "crmsync_emailclicks"),
        "bounce": (True, "crmsync_emailbounces"),
    }
    assert c2d.source_topics() == ["campaign.email.events"]
    assert (opt.direction, opt.d365_field, opt.campaign_field) == (
        "bidirectional",
        "donotbulkemail",
        "blackListEmail",
    )
    assert opt.source_topics() == ["d365.contact.changes", "campaign.profile.changes"]


def test_a_disabled_opt_in_out_still_consumes_both_topics() -> None:
    config = parse_config("opt-in-out", {"direction": "disabled"})
    assert config.source_topics() == ["d365.contact.changes", "campaign.profile.changes"]


def test_a_misspelt_or_missing_mapping_field_is_reported_where_it_is() -> None:
    errors = errors_of(
        "d365-to-campaign",
        {
            "mappings": [
                {"source": "firstname", "target": "firstName"},
                {"source": "lastname", "target": "lastName", "apply_update": False},
                {"source": "emailaddress1"},
            ]
        },
    )
    assert locs(errors) == [["mappings", 1, "apply_update"], ["mappings", 2, "target"]]
    assert "unknown field" in errors[0]["msg"]
    assert errors[1]["msg"] == "is required"


def test_cross_field_problems_point_at_the_offending_field() -> None:
    errors = errors_of(
        "d365-to-campaign",
        {
            "mappings": [
                {"source": "firstname", "target": "firstName"},
                {"source": "nickname", "target": "firstName"},
                {"source": "emailaddress1", "target": "externalId"},
            ],
            "custom_entities": [
                {"logical_name": "new_a", "resource": "cusA", "key_field": "aId"},
                {
                    "logical_name": "new_a",
                    "resource": "cusB",
                    "key_field": "bId",
                    "mappings": [{"source": "new_bid", "target": "bId"}],
                },
            ],
        },
    )
    by_loc = {tuple(e["loc"]): e["msg"] for e in errors}
    assert "already written by mapping 0" in by_loc[("mappings", 1, "target")]
    assert "contactid" in by_loc[("mappings", 2, "source")]
    assert "key field" in by_loc[("custom_entities", 1, "mappings", 0, "target")]
    assert len(errors) == 3

    errors = errors_of(
        "d365-to-campaign",
        {
            "custom_entities": [
                {"logical_name": "new_a", "resource": "cusA", "key_field": "aId"},
                {"logical_name": "new_a", "resource": "cusB", "key_field": "bId"},
                {
                    "logical_name": "new_c",
                    "resource": "cusC",
                    "key_field": "cId",
                    "topic": "d365.contact.changes",
                },
            ]
        },
    )
    assert locs(errors) == [["custom_entities", 1, "logical_name"], ["custom_entities", 1, "topic"]]
    errors = errors_of(
        "d365-to-campaign",
        {
            "custom_entities": [
                {
                    "logical_name": "new_c",
                    "resource": "cusC",
                    "key_field": "cId",
                    "topic": "d365.contact.changes",
                    "link": {"source_field": "_x_value", "target_field": "cId"},
                }
            ]
        },
    )
    assert locs(errors) == [["custom_entities", 0, "link", "target_field"]]
    errors = errors_of(
        "d365-to-campaign",
        {
            "custom_entities": [
                {
                    "logical_name": "new_c",
                    "resource": "cusC",
                    "key_field": "cId",
                    "topic": "d365.contact.changes",
                }
            ]
        },
    )
    assert locs(errors) == [["custom_entities", 0, "topic"]]
    assert "contact topic" in errors[0]["msg"]


def test_filter_errors_have_paths_through_nested_groups() -> None:
    errors = errors_of(
        "d365-to-campaign",
        {
            "filters": {
                "all": [
                    {"field": "statecode", "op": "eq"},
                    {
                        "any": [
                            {"field": "x", "op": "in", "value": []},
                            {"field": "y", "op": "startswith", "value": "a"},
                            {"field": "z", "op": "prefix", "value": 3},
                        ]
                    },
                    {"all": [], "any": []},
                ]
            }
        },
    )
    assert locs(errors) == [
        ["filters", "all", 0, "value"],
        ["filters", "all", 1, "any", 0, "value"],
        ["filters", "all", 1, "any", 1, "op"],
        ["filters", "all", 1, "any", 2, "value"],
        ["filters", "all", 2],
    ]
    assert "'eq' needs one value" in errors[0]["msg"]
    assert "'prefix'" in errors[2]["msg"]
    assert "exactly one of 'all'" in errors[4]["msg"]


def test_value_types_field_names_and_topics_are_checked() -> None:
    errors = errors_of(
        "d365-to-campaign",
        {
            "mappings": [
                {"source": "first name", "target": "firstName"},
                {"source": "a", "target": "b", "replacements": {"x": [1]}},
            ],
            "contact_topic": "bad topic!",
        },
    )
    by_loc = {tuple(e["loc"]): e["msg"] for e in errors}
    assert "field name" in by_loc[("mappings", 0, "source")]
    assert "string, number, boolean or null" in by_loc[("mappings", 1, "replacements", "x")]
    assert "topic" in by_loc[("contact_topic",)]


def test_campaign_to_d365_partial_events_keep_defaults_and_bad_ones_are_named() -> None:
    config = parse_config("campaign-to-d365", {"events": {"click": {"enabled": False}}})
    assert isinstance(config, CampaignToD365Config)
    assert config.events["click"].enabled is False
    assert config.events["click"].entity_set == "crmsync_emailclicks"
    assert config.events["send"].enabled is True

    errors = errors_of(
        "campaign-to-d365",
        {
            "events": {"opened": {"enabled": True}, "bounce": {"enabled": "maybe"}},
            "subject_template": "{campaign} / {delivery_id!r}",
        },
    )
    by_loc = {tuple(e["loc"]): e["msg"] for e in errors}
    assert set(by_loc) == {
        ("events", "bounce", "enabled"),
        ("events", "opened"),
        ("subject_template",),
    }
    assert "unknown key 'opened'" in by_loc[("events", "opened")]
    assert "unknown placeholder {campaign}" in by_loc[("subject_template",)]


def test_opt_in_out_direction_and_unknown_workflow() -> None:
    errors = errors_of("opt-in-out", {"direction": "both"})
    assert locs(errors) == [["direction"]]
    assert "'bidirectional'" in errors[0]["msg"]
    assert locs(errors_of("opt-in-out", {"contact_topic": "t", "profile_topic": "t"})) == [
        ["profile_topic"]
    ]

    errors = errors_of("nope", {})
    assert locs(errors) == [["workflow"]] and "d365-to-campaign" in errors[0]["msg"]


def test_configs_are_frozen_and_strict_outside_parse_config() -> None:
    config = default_config("opt-in-out")
    assert isinstance(config, OptInOutConfig)
    with pytest.raises(ValidationError):
        config.direction = "disabled"
    with pytest.raises(ValidationError):
        OptInOutConfig.model_validate({"dirction": "disabled"})


def test_config_error_reads_well() -> None:
    with pytest.raises(ConfigError, match=r"mappings\.0\.target: is required"):
        parse_config("d365-to-campaign", {"mappings": [{"source": "a"}]})


def test_config_diff_lists_changed_paths_readably() -> None:
    active = redacted(default_config("d365-to-campaign"))
    pending_data = redacted(default_config("d365-to-campaign"))
    pending_data["mappings"][1]["apply_updates"] = False
    pending_data["mappings"].append({"source": "jobtitle", "target": "jobTitle"})
    pending_data["propagate_deletes"] = False
    pending = parse_config("d365-to-campaign", pending_data)

    diff = config_diff(active, pending)
    by_path = {d["path"]: (d["active"], d["pending"]) for d in diff}

    assert by_path["mappings[1].apply_updates"] == (True, False)
    assert by_path["propagate_deletes"] == (True, False)
    added = by_path["mappings[6]"]
    assert added[0] is None and added[1]["target"] == "jobTitle"
    assert len(diff) == 3
    assert config_diff(active, active) == []
    assert config_diff(
        {"events": {"click": {"enabled": True}}}, {"events": {"click": {"enabled": False}}}
    ) == [{"path": "events.click.enabled", "active": True, "pending": False}]
