"""The workflow registry: one WorkflowSpec per workflow, read by every part that names workflows.

The CLI, the local stack, the worker app, the config form, the topics and the page all take the
workflows, their titles, configs, target systems and topics from here; adding a workflow is one
spec below and its module (tests/unit/test_catalog.py fails if any part disagrees).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT
from crmsync.streams import mapping
from crmsync.streams.config import (
    CampaignToD365Config,
    ConfigError,
    D365ToCampaignConfig,
    OptInOutConfig,
    WorkflowConfig,
)
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.topics import TopicSpec
from crmsync.streams.workflows import OptInOut, StatelessWorkflow, Workflow

System = Literal["d365", "campaign"]


@dataclass(frozen=True)
class WorkflowSpec:
    """What crmsync knows of one workflow before any config is loaded."""

    name: str
    title: str
    config_model: type[WorkflowConfig]
    #: The target systems it writes to (each gets a sink).
    systems: tuple[System, ...]
    #: Builds the workflow object for a validated config of ``config_model``.
    build: Callable[[Any, KafkaClients], Workflow]
    #: Topics of its own besides its dead letters (e.g. kept state), by partition count.
    own_topics: Callable[[int], list[TopicSpec]] = lambda _partitions: []

    @property
    def group_id(self) -> str:
        """Its consumer group: the workflow's backlog is this group's lag."""
        return f"crmsync.{self.name}"

    @property
    def dead_letter_topic(self) -> str:
        return topics.dead_letters(self.name)

    def parse_config(self, data: Mapping[str, Any]) -> WorkflowConfig:
        """The validated config; ``ConfigError`` lists every problem with its place."""
        if not isinstance(data, Mapping):
            raise ConfigError([{"loc": [], "msg": "a config is a JSON object"}])
        try:
            return self.config_model.model_validate(dict(data))
        except ValidationError as error:
            raise ConfigError.from_validation(error) from None

    def default_config(self) -> WorkflowConfig:
        """The config a workflow starts with (what the local stack runs)."""
        return self.parse_config({})

    def source_topics(self, config: WorkflowConfig) -> list[str]:
        return config.source_topics()


def _d365_to_campaign(config: D365ToCampaignConfig, _kafka: KafkaClients) -> Workflow:
    return StatelessWorkflow(
        "d365-to-campaign",
        config,
        CHANGE_EVENT,
        mapping.compile_writes(config),
        lambda topic, event: mapping.filtered_out(event, topic, config),
    )


def _campaign_to_d365(config: CampaignToD365Config, _kafka: KafkaClients) -> Workflow:
    return StatelessWorkflow(
        "campaign-to-d365",
        config,
        EMAIL_EVENT,
        lambda _topic, event: mapping.email_event_writes(event, config),
        lambda _topic, event: not mapping.email_event_enabled(event, config),
        # Every event is an activity of its own: the next batch is sent while Dataverse answers
        # one (d365-to-campaign stays at one: a Campaign create relies on counting the profiles
        # against those it knows, which creates still in flight would blur).
        writes_in_flight=4,
    )


def _optout_state_topic(partitions: int) -> list[TopicSpec]:
    # The last opt-out value synced per contact: co-partitioned with the inputs by key.
    return [TopicSpec(topics.OPTOUT_STATE, partitions, compacted=True, config=topics.COMPACTED)]


_SPECS = (
    WorkflowSpec(
        name="d365-to-campaign",
        title="Microsoft Dynamics 365 to Campaign",
        config_model=D365ToCampaignConfig,
        systems=("campaign",),
        build=_d365_to_campaign,
    ),
    WorkflowSpec(
        name="campaign-to-d365",
        title="Campaign to Microsoft Dynamics 365",
        config_model=CampaignToD365Config,
        systems=("d365",),
        build=_campaign_to_d365,
    ),
    WorkflowSpec(
        name="opt-in-out",
        title="Opt-in/Opt-out",
        config_model=OptInOutConfig,
        systems=("d365", "campaign"),
        build=lambda config, kafka: OptInOut(config, kafka),
        own_topics=_optout_state_topic,
    ),
)

#: Every workflow by name, in the order the page and the CLI list them.
WORKFLOWS: Mapping[str, WorkflowSpec] = {spec.name: spec for spec in _SPECS}
NAMES: tuple[str, ...] = tuple(WORKFLOWS)


class UnknownWorkflow(ValueError):
    """A workflow name that is not in the registry."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown workflow {name!r}; workflows: {', '.join(NAMES)}")
        self.name = name


def spec(name: str) -> WorkflowSpec:
    try:
        return WORKFLOWS[name]
    except KeyError:
        raise UnknownWorkflow(name) from None


def parse_config(workflow: str, data: Mapping[str, Any]) -> WorkflowConfig:
    """The validated config of ``workflow``; ``ConfigError`` lists every problem with its place."""
    found = WORKFLOWS.get(workflow)
    if found is None:
        raise ConfigError(
            [
                {
                    "loc": ["workflow"],
                    "msg": f"unknown workflow {workflow!r}; known: {', '.join(NAMES)}",
                }
            ]
        )
    return found.parse_config(data)


def default_config(workflow: str) -> WorkflowConfig:
    """The config a workflow starts with (what the local stack runs)."""
    return spec(workflow).default_config()


def topic_specs(
    partitions: int = 6,
    custom_entities: list[str] | tuple[str, ...] = (),
    outcomes_retention_h: float = topics.OUTCOMES_RETENTION_H,
) -> list[TopicSpec]:
    """Every topic of DESIGN.md's table: the shared ones, then each workflow's own, its DLQ and
    its outcome records."""
    return [
        *topics.shared_topic_specs(partitions, custom_entities),
        *(own for s in _SPECS for own in s.own_topics(partitions)),
        *(topics.dead_letter_spec(s.name, partitions) for s in _SPECS),
        *(topics.outcomes_spec(s.name, outcomes_retention_h) for s in _SPECS),
    ]
