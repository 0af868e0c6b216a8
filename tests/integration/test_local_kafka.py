"""The local launcher: real brokers that keep their data, Kafka's own tools, all of our topics."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from crmsync.deploy.local.kafka import KafkaLaunchError, LocalKafka, run_tool
from crmsync.streams import catalog
from crmsync.streams.kafka import topics
from tests.conftest import free_port, free_port_block
from tests.integration.harness import recreate_topics
from tests.integration.kafka_io import partitions_of, read_all


async def _produce(bootstrap: str, topic: str, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(n):
            await producer.send(topic, f"value-{i}".encode(), key=f"k{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()


def _own_kafka(tmp_path: Path, kafka_cache: Path, nodes: int = 1) -> LocalKafka:
    base = free_port_block(2 * nodes)  # brokers, then their controllers
    controller = base + nodes
    return LocalKafka(
        cache_dir=kafka_cache,
        data_dir=tmp_path / "kafka",
        nodes=nodes,
        base_port=base,
        controller_base_port=controller,
        heap="256m",
    )


async def test_a_stopped_and_restarted_broker_keeps_all_data(
    tmp_path: Path, kafka_cache: Path
) -> None:
    kafka = _own_kafka(tmp_path, kafka_cache)
    kafka.start()
    try:
        await topics.ensure_topics(kafka.bootstrap_servers, [topics.TopicSpec("kept", 3)])
        await _produce(kafka.bootstrap_servers, "kept", 300)
        kafka.stop()
        assert not kafka.is_running()
        kafka.start()
        values = sorted(r.value for r in await read_all(kafka.bootstrap_servers, "kept"))
        assert values == sorted(f"value-{i}".encode() for i in range(300))
        assert len(await partitions_of(kafka.bootstrap_servers, "kept")) == 3
    finally:
        kafka.stop()


def test_a_busy_port_is_refused_with_a_clear_message(
    local_kafka: LocalKafka, tmp_path: Path, kafka_cache: Path
) -> None:
    clash = LocalKafka(
        cache_dir=kafka_cache,
        data_dir=tmp_path / "clash",
        base_port=local_kafka.base_port,
        controller_base_port=free_port(),
    )
    with pytest.raises(KafkaLaunchError, match="already in use"):
        clash.start()


def test_a_cluster_whose_last_node_cannot_bind_starts_no_node(
    tmp_path: Path, kafka_cache: Path
) -> None:
    cluster = _own_kafka(tmp_path, kafka_cache, nodes=3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", cluster.specs[2].port))
        busy.listen()
        with pytest.raises(KafkaLaunchError, match=f"{cluster.specs[2].port} is already in use"):
            cluster.start()
    assert not cluster.is_running()
    assert not any((spec.data_dir / "broker.pid").exists() for spec in cluster.specs)


def test_a_start_that_times_out_leaves_no_broker_running(tmp_path: Path, kafka_cache: Path) -> None:
    kafka = _own_kafka(tmp_path, kafka_cache)
    with pytest.raises(KafkaLaunchError, match="did not become ready"):
        kafka.start(timeout=0.01)
    assert not kafka.is_running()
    assert not _port_listening(kafka.specs[0].port)


def _port_listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_every_design_topic_is_created_once_with_its_shape(bootstrap: str) -> None:
    entity = f"new_{uuid.uuid4().hex[:8]}"
    specs = catalog.topic_specs(partitions=6, custom_entities=[entity])
    # other tests share the broker and create these topics with their own partition counts
    await recreate_topics(bootstrap, partitions=6)
    await topics.ensure_topics(bootstrap, specs)
    assert await topics.ensure_topics(bootstrap, specs) == []  # idempotent
    for spec in specs:
        assert len(await partitions_of(bootstrap, spec.name)) == spec.partitions, spec.name
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, topics.CONTROL),
                ConfigResource(ConfigResourceType.TOPIC, topics.CONTACT_CHANGES),
            ]
        )
    finally:
        await admin.close()
    policies = {
        resource[3]: {entry[0]: entry[1] for entry in resource[4]}["cleanup.policy"]
        for response in described
        for resource in response.resources
    }
    assert policies == {topics.CONTROL: "compact", topics.CONTACT_CHANGES: "delete"}


def test_kafkas_own_tools_run_from_the_launchers_classpath(
    bootstrap: str, kafka_cache: Path
) -> None:
    listed = run_tool(kafka_cache, "kafka-topics", ["--bootstrap-server", bootstrap, "--list"])
    assert topics.CONTACT_CHANGES in listed.split()
    groups = run_tool(
        kafka_cache, "kafka-consumer-groups", ["--bootstrap-server", bootstrap, "--list"]
    )
    assert isinstance(groups, str)


async def test_a_three_node_cluster_replicates_and_survives_a_node_loss(
    tmp_path: Path, kafka_cache: Path
) -> None:
    cluster = _own_kafka(tmp_path, kafka_cache, nodes=3)
    cluster.start(timeout=120)
    try:
        created = await topics.ensure_topics(
            cluster.bootstrap_servers, [topics.TopicSpec("replicated", 3)]
        )
        assert created == ["replicated"]
        (described,) = [await partitions_of(cluster.bootstrap_servers, "replicated")]
        assert len(described) == 3
        await _produce(cluster.bootstrap_servers, "replicated", 100)
        cluster.stop_node(3)
        survivors = ",".join(s.address for s in cluster.specs[:2])
        await _produce(survivors, "replicated", 100)  # acks=all with 2 of 3 in sync
        assert len(await read_all(survivors, "replicated")) == 200
    finally:
        cluster.stop()


def test_a_cluster_id_that_starts_with_a_dash_formats(tmp_path: Path, kafka_cache: Path) -> None:
    """One random id in 64 starts with "-", which Kafka's storage tool took for an option."""
    from crmsync.deploy.local.kafka import ensure_jars

    kafka = LocalKafka(cache_dir=kafka_cache, data_dir=tmp_path / "kafka")
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "cluster.id").write_text("-qdg-pLYTQCV0LRrFugk1Q")
    kafka._format(ensure_jars(kafka_cache))
    meta = (tmp_path / "kafka" / "node-1" / "data" / "meta.properties").read_text()
    assert "cluster.id=-qdg-pLYTQCV0LRrFugk1Q" in meta
