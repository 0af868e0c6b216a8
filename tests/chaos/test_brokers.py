"""Scenario 2: a single broker restarted mid-stream; a 3-broker cluster losing a partition leader.

Each runs on a Kafka of its own (the session broker stays untouched).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from crmsync.deploy.local.kafka import LocalKafka
from crmsync.streams.kafka import topics
from tests.chaos.conftest import own_cluster, pick, record
from tests.chaos.ledger import Outcome, Stopwatch
from tests.chaos.traffic import D2C, ContactTraffic, Record, dlq_count, publish_steadily
from tests.chaos.workers import wait_drained, wait_requests_beyond, wait_worker
from tests.conftest import ROOT, free_port_block
from tests.integration.harness import Cluster, EmulatorProcess, recreate_topics
from tests.integration.workflow_helpers import requests

PEOPLE = pick(250, 10_000, 2236)
VERSIONS = 4

pytestmark = pytest.mark.timeout(pick(300, 1800, 900))


def _kafka(data_dir: Path, nodes: int) -> Iterator[LocalKafka]:
    base = free_port_block(2 * nodes)  # brokers, then their controllers
    kafka = LocalKafka(
        cache_dir=ROOT / ".cache",
        data_dir=data_dir,
        nodes=nodes,
        base_port=base,
        controller_base_port=base + nodes,
        heap="384m",
    )
    kafka.start(timeout=180)
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture
def single_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    yield from _kafka(tmp_path / "kafka", 1)


@pytest.fixture
def three_brokers(tmp_path: Path) -> Iterator[LocalKafka]:
    yield from _kafka(tmp_path / "kafka", 3)


async def _stream_through(
    cluster: Cluster, fault: object, scenario: str, traffic: ContactTraffic, records: list[Record]
) -> None:
    clock = Stopwatch()
    await cluster.control(D2C, "running")
    worker = cluster.start_worker(D2C)
    await wait_worker(cluster, worker, "RUNNING")
    stream = asyncio.create_task(
        publish_steadily(cluster, topics.CONTACT_CHANGES, records, batches=20, pause=0.5)
    )
    await wait_requests_beyond(cluster, "campaign", requests(cluster, "campaign") + 50)
    await fault()  # type: ignore[operator]
    await stream
    await wait_drained(cluster, D2C, [topics.CONTACT_CHANGES], within=120 + len(records) / 20)
    found = await traffic.compare(cluster)
    record(
        Outcome(
            scenario,
            sent=traffic.sent,
            written=found.written,
            lost=found.lost,
            duplicated=found.duplicated,
            unexpected=found.unexpected,
            dlq=await dlq_count(cluster, [D2C]),
            seconds=clock.seconds,
            samples=found.samples,
        )
    )
    assert worker.process.poll() is None, "the worker survived the broker's failure"


async def test_single_broker_restarted_mid_stream(
    single_broker: LocalKafka, chaos_emulators: EmulatorProcess, tmp_path: Path
) -> None:
    cluster = own_cluster(single_broker.bootstrap_servers, chaos_emulators, tmp_path)
    await recreate_topics(cluster.bootstrap)
    traffic = ContactTraffic()
    records = traffic.versions(PEOPLE, VERSIONS)

    async def restart() -> None:
        await asyncio.to_thread(single_broker.stop_node, 1)
        await asyncio.sleep(pick(3, 20, 10))
        await asyncio.to_thread(single_broker.start, 180)

    try:
        await _stream_through(
            cluster, restart, "2a. single broker restarted mid-stream", traffic, records
        )
    finally:
        cluster.stop_all()


async def test_partition_leader_killed_in_a_three_broker_cluster(
    three_brokers: LocalKafka, chaos_emulators: EmulatorProcess, tmp_path: Path
) -> None:
    cluster = own_cluster(
        three_brokers.bootstrap_servers,
        chaos_emulators,
        tmp_path,
        CRMSYNC_TOPIC_REPLICATION="3",
    )
    # Every broker registered again (a loaded machine can fence one for a moment): the topics
    # get replication min(3, brokers the cluster lists now).
    three_brokers.wait_ready()
    await recreate_topics(cluster.bootstrap)  # replication 3, min.insync.replicas 2
    settings = await _topic_settings(cluster.bootstrap, topics.CONTACT_CHANGES)
    assert settings == (3, "2"), settings
    traffic = ContactTraffic()
    records = traffic.versions(PEOPLE, VERSIONS)
    killed: list[int] = []

    async def kill_leader() -> None:
        leader = await _leader(cluster.bootstrap, topics.CONTACT_CHANGES, 0)
        killed.append(leader)
        await asyncio.to_thread(three_brokers.stop_node, leader, 30, True)

    try:
        await _stream_through(
            cluster,
            kill_leader,
            "2b. 3 brokers (acks=all, min ISR 2): partition leader kill -9",
            traffic,
            records,
        )
        assert await _leader(cluster.bootstrap, topics.CONTACT_CHANGES, 0) not in killed
    finally:
        cluster.stop_all()


async def _leader(bootstrap: str, topic: str, partition: int) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    (found,) = [p for p in described["partitions"] if p["partition"] == partition]
    return int(found["leader"])


async def _topic_settings(bootstrap: str, topic: str) -> tuple[int, str]:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        (configs,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None})]
        )
    finally:
        await admin.close()
    replicas = len(described["partitions"][0]["replicas"])
    entries = {entry[0]: entry[1] for entry in configs.resources[0][4]}
    return replicas, entries["min.insync.replicas"]
