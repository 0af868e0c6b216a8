"""The Kafka topics of crmsync: their names, shapes, and one idempotent way to create them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.protocol.metadata import MetadataRequest

from crmsync.streams.kafka.clients import KafkaClients

log = logging.getLogger(__name__)

CONTACT_CHANGES = "d365.contact.changes"
EMAIL_EVENTS = "campaign.email.events"
PROFILE_CHANGES = "campaign.profile.changes"
CONTROL = "crmsync.control"
STATUS = "crmsync.status"
AUDIT = "crmsync.audit"
SOURCE_OFFSETS = "crmsync.source-offsets"
OPTOUT_STATE = "crmsync.opt-in-out.state"

#: The dead-letter topics take records up to this size (4 MiB; Kafka's default is 1 MiB).
DLQ_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def entity_changes(logical_name: str) -> str:
    """Topic of a Dynamics custom entity's changes."""
    return f"d365.entity.{logical_name}.changes"


def dead_letters(workflow: str) -> str:
    return f"crmsync.{workflow}.dlq"


def outcomes(workflow: str) -> str:
    """What the workflow did with each record it read (the record trace)."""
    return f"crmsync.{workflow}.outcomes"


#: How long outcome records are kept by default (CRMSYNC_OUTCOMES_RETENTION_H).
OUTCOMES_RETENTION_H = 7 * 24


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False
    config: Mapping[str, str] | None = None


#: Settings of every compacted topic: records compacted soon, segments rolled hourly.
COMPACTED: Mapping[str, str] = {"min.compaction.lag.ms": "0", "segment.ms": str(3_600_000)}


def shared_topic_specs(partitions: int = 6, custom_entities: Iterable[str] = ()) -> list[TopicSpec]:
    """The topics no single workflow owns. Control-side topics have one partition: one log.

    Every topic crmsync creates: ``crmsync.streams.catalog.topic_specs`` (these, plus each
    workflow's own topics and dead letters).
    """
    return [
        TopicSpec(CONTACT_CHANGES, partitions),
        TopicSpec(EMAIL_EVENTS, partitions),
        TopicSpec(PROFILE_CHANGES, partitions),
        *(TopicSpec(entity_changes(name), partitions) for name in custom_entities),
        TopicSpec(CONTROL, 1, compacted=True, config=COMPACTED),
        TopicSpec(STATUS, 1, compacted=True, config=COMPACTED),
        TopicSpec(AUDIT, 1, config={"retention.ms": str(90 * 24 * 3_600_000)}),
        TopicSpec(SOURCE_OFFSETS, 1, compacted=True, config=COMPACTED),
    ]


def dead_letter_spec(workflow: str, partitions: int) -> TopicSpec:
    """A workflow's DLQ: kept forever, with room for a source record at the broker's size limit
    plus the context headers."""
    return TopicSpec(
        dead_letters(workflow),
        partitions,
        config={"retention.ms": "-1", "max.message.bytes": str(DLQ_MAX_MESSAGE_BYTES)},
    )


def outcomes_spec(workflow: str, retention_h: float = OUTCOMES_RETENTION_H) -> TopicSpec:
    """A workflow's outcome records: one partition (one record per written batch), kept for
    `retention_h` hours."""
    return TopicSpec(
        outcomes(workflow), 1, config={"retention.ms": str(int(retention_h * 3_600_000))}
    )


async def ensure_topics(
    kafka: KafkaClients | str, specs: Iterable[TopicSpec], replication: int | None = None
) -> list[str]:
    """Creates the topics that do not exist yet; returns the names created.

    ``kafka``: the process's clients, or bootstrap servers (no security options). Replication
    defaults to min(3, brokers in the cluster).
    """
    admin = (KafkaClients(kafka) if isinstance(kafka, str) else kafka).admin()
    await admin.start()
    try:
        if replication is None:
            cluster = await admin.describe_cluster()
            replication = min(3, len(cluster["brokers"]))
        existing = set(await admin.list_topics())
        wanted = [spec for spec in specs if spec.name not in existing]
        created = []
        for spec in wanted:
            config = dict(spec.config or {})
            if spec.compacted:
                config["cleanup.policy"] = "compact"
            if replication >= 3:
                config.setdefault("min.insync.replicas", "2")
            topic = NewTopic(spec.name, spec.partitions, replication, topic_configs=config)
            try:
                response = await admin.create_topics([topic])
            except TopicAlreadyExistsError:
                continue
            (_, error_code, error_message) = response.topic_errors[0]
            if error_code == TopicAlreadyExistsError.errno:
                continue  # created meanwhile, or not yet in the metadata we listed
            if error_code:
                raise for_code(error_code)(f"creating {spec.name}: {error_message}")
            log.info(
                "event=topic_created topic=%s partitions=%s replication=%s",
                spec.name,
                spec.partitions,
                replication,
            )
            created.append(spec.name)
        await _wait_visible(admin, created)
        return created
    finally:
        await admin.close()


async def _wait_visible(admin: AIOKafkaAdminClient, names: list[str], wait_s: float = 30) -> None:
    """Waits until every broker sees a leader for every partition of the new topics.

    Each KRaft broker applies the metadata log on its own, so one broker knowing a topic
    does not mean the next client, which may ask another broker, finds it: every broker
    is asked in turn.
    """
    if not names:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    brokers = [broker["node_id"] for broker in (await admin.describe_cluster())["brokers"]]
    for node_id in brokers:
        pending = list(names)
        while pending:
            # aiokafka's admin client has no public "ask this broker"; its helper is used.
            response = await admin._send_request_to_node(node_id, MetadataRequest(pending))
            pending = [
                topic["topic"]
                for topic in response.to_object()["topics"]
                if topic["error_code"] != 0
                or not topic["partitions"]
                or any(p["leader"] < 0 for p in topic["partitions"])
            ]
            if pending and loop.time() > deadline:
                raise TimeoutError(
                    f"topics not available on broker {node_id} after {wait_s}s: "
                    + ", ".join(pending)
                )
            if pending:
                await asyncio.sleep(0.1)
