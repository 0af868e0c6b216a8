"""The 3-broker local cluster with SASL/SCRAM and deploy/kafka/acls.yaml enforced (`crmsync
kafka run --brokers 3 --secure`): a worker's principal is refused when it writes crmsync.control,
the control plane's is not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError

from crmsync.deploy.local.kafka import LocalKafka
from crmsync.streams import catalog
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from tests.conftest import free_port_block

pytestmark = pytest.mark.timeout(300)
WORKER, CONTROL = "crmsync-worker-d365-to-campaign", "crmsync-control"


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    port = free_port_block(6)  # three brokers from here, then their controllers
    kafka = LocalKafka(
        cache_dir=Path(__file__).resolve().parents[2] / ".cache",
        data_dir=tmp_path_factory.mktemp("kafka-secure"),
        nodes=3,
        base_port=port,
        controller_base_port=port + 3,
        heap="320m",
        secure=True,
    )
    kafka.start(timeout=180)
    try:
        kafka.apply_acls([WORKER, CONTROL])
        yield kafka
    finally:
        kafka.stop()


async def _send(kafka: LocalKafka, principal: str, topic: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, **kafka.client_options(principal)
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"forged", key=b"d365-to-campaign")
    finally:
        await producer.stop()


async def test_a_workers_principal_is_refused_writing_the_control_topic(
    secure_cluster: LocalKafka,
) -> None:
    await topics.ensure_topics(
        KafkaClients(secure_cluster.bootstrap_servers, secure_cluster.client_options()),
        catalog.topic_specs(3),
    )
    await _send(secure_cluster, WORKER, topics.STATUS)  # what a worker may write
    with pytest.raises(TopicAuthorizationFailedError):
        await _send(secure_cluster, WORKER, topics.CONTROL)
    with pytest.raises(TopicAuthorizationFailedError):
        await _send(secure_cluster, WORKER, topics.AUDIT)
    await _send(secure_cluster, CONTROL, topics.CONTROL)  # the one writer of control
