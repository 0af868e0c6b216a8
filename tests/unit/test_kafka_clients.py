"""The Kafka layer: one delivery configuration for every producer, one SSL context per process."""

from __future__ import annotations

import ast
from pathlib import Path

from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
_AIOKAFKA_CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"}


async def test_every_producer_waits_for_all_replicas_and_is_idempotent() -> None:
    # A producer that acked on the leader only could lose a written record in a broker failure;
    # one without idempotence could write a retried send twice.
    producer = KafkaClients("127.0.0.1:1").producer(max_request_size=4 * 1024 * 1024)
    try:
        assert producer._sender._acks == -1
        assert producer._txn_manager is not None  # aiokafka's idempotent-producer state
        assert producer._max_request_size == 4 * 1024 * 1024
    finally:
        await producer.stop()


async def test_the_ssl_context_is_built_once_and_shared_by_every_client() -> None:
    settings = Settings(kafka_security_protocol="SSL")
    kafka = settings.kafka
    assert settings.kafka is kafka
    context = kafka.options["ssl_context"]
    producer, consumer, admin = kafka.producer(), kafka.consumer(), kafka.admin()
    try:
        assert producer.client._ssl_context is context
        assert consumer._client._ssl_context is context
        assert admin._client._ssl_context is context
    finally:
        await producer.stop()
        await consumer.stop()
        await admin.close()


def test_only_the_kafka_layer_makes_aiokafka_clients() -> None:
    """Any other module that built its own client could differ in acks, idempotence or
    security. The local launcher (deploy/) stands alone: it only waits for its broker."""
    makers = []
    for folder in ("schemas", "streams", "control", "deploy"):
        for path in (ROOT / folder / "crmsync").rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if "/crmsync/streams/kafka/" in relative or relative.endswith("deploy/local/kafka.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", getattr(node.func, "attr", None))
                    if name in _AIOKAFKA_CLIENTS:
                        makers.append(f"{relative}:{node.lineno} {name}")
    assert makers == []
