"""The workflow registry is the one place workflows are named: every part that lists them agrees."""

from __future__ import annotations

import pytest

from crmsync.control import config_form, openapi
from crmsync.control.cli import _parser
from crmsync.streams import catalog
from crmsync.streams.app import default_sinks
from crmsync.streams.config import ConfigError
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.settings import Settings

SPECS = list(catalog.WORKFLOWS.values())


def test_the_registry_holds_the_contracts_three_workflows_in_page_order() -> None:
    assert catalog.NAMES == ("d365-to-campaign", "campaign-to-d365", "opt-in-out")
    assert len({spec.title for spec in SPECS}) == len(SPECS)
    assert [spec.group_id for spec in SPECS] == [f"crmsync.{name}" for name in catalog.NAMES]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
async def test_each_spec_builds_its_workflow_from_its_default_config(
    spec: catalog.WorkflowSpec,
) -> None:
    config = spec.default_config()
    assert isinstance(config, spec.config_model)
    workflow = spec.build(config, KafkaClients("127.0.0.1:1"))
    assert workflow.name == spec.name
    assert workflow.source_topics() == spec.source_topics(config) != []


def test_an_unknown_workflow_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(catalog.UnknownWorkflow, match="d365-to-campaign, campaign-to-d365"):
        catalog.spec("nope")
    with pytest.raises(ConfigError) as refused:
        catalog.parse_config("nope", {})
    assert refused.value.errors[0]["loc"] == ["workflow"]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_a_worker_gets_one_sink_per_target_system(spec: catalog.WorkflowSpec) -> None:
    assert set(default_sinks(spec.name, Settings())) == set(spec.systems)


def test_the_cli_accepts_every_workflow_and_nothing_else() -> None:
    parser = _parser()
    for name in catalog.NAMES:
        assert parser.parse_args(["worker", name]).workflow == name
        assert parser.parse_args(["workflows", "start", name]).workflow == name
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "nope"])


def test_the_edit_form_has_controls_for_every_workflow_naming_its_config_fields() -> None:
    assert set(config_form.CONTROLS) == set(catalog.NAMES)
    for name, controls in config_form.CONTROLS.items():
        fields = catalog.spec(name).config_model.model_fields
        assert [c.key for c in controls if c.key not in fields] == [], name


def test_every_workflow_has_its_dead_letters_and_own_topics_created_once() -> None:
    specs = catalog.topic_specs(partitions=3)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for spec in SPECS:
        assert spec.dead_letter_topic in names
        assert {own.name for own in spec.own_topics(3)} <= set(names)


def test_the_openapi_document_lists_every_workflow_and_config_model() -> None:
    document = openapi.document()
    parameters = [
        p for path in document["paths"].values() for op in path.values()
        for p in op.get("parameters", []) if p["name"] == "name"
    ]  # fmt: skip
    assert parameters and all(p["schema"]["enum"] == list(catalog.NAMES) for p in parameters)
    schemas = document["components"]["schemas"]
    assert {spec.config_model.__name__ for spec in SPECS} <= set(schemas)
