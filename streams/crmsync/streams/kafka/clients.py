"""How every crmsync process talks to Kafka: one set of connection options, one producer config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient


@dataclass(frozen=True)
class KafkaClients:
    """Makes the aiokafka clients of one process, all with the same connection options.

    ``options`` are the security options (protocol, SASL, the SSL context): built once per
    process by the settings, and shared by every client made here, so a process holds one SSL
    context however many clients it opens.
    """

    bootstrap_servers: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def producer(
        self,
        *,
        linger_ms: int = 5,
        max_request_size: int | None = None,
        max_batch_size: int | None = None,
    ) -> AIOKafkaProducer:
        """A producer with crmsync's delivery settings: every write acknowledged by all in-sync
        replicas, idempotent (a retried send is never written twice). Only batching is tunable."""
        tuning: dict[str, Any] = {"linger_ms": linger_ms}
        if max_request_size is not None:
            tuning["max_request_size"] = max_request_size
        if max_batch_size is not None:
            tuning["max_batch_size"] = max_batch_size
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            **tuning,
            **self.options,
        )

    def consumer(self, *topics: str, **config: Any) -> AIOKafkaConsumer:
        """A consumer that commits nothing unless ``config`` names a group and asks for it."""
        config.setdefault("enable_auto_commit", False)
        return AIOKafkaConsumer(
            *topics, bootstrap_servers=self.bootstrap_servers, **config, **self.options
        )

    def admin(self) -> AIOKafkaAdminClient:
        return AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, **self.options)
