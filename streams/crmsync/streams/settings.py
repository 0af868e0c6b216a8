"""The one frozen settings object of a crmsync process, read from the environment at the edge."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from crmsync.streams.kafka.clients import KafkaClients
from crmsync.targets._transport import HttpClient
from crmsync.targets.settings import CampaignTarget, DynamicsTarget

LOCAL_BOOTSTRAP = "127.0.0.1:9092"


class Settings(BaseSettings):
    """Every knob of a crmsync process. Secrets are SecretStr: never logged nor returned."""

    model_config = SettingsConfigDict(env_prefix="CRMSYNC_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=Path.cwd, description="where .local/ and .cache/ live")
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "CRMSYNC_KAFKA_BOOTSTRAP_SERVERS"),
        description="unset → the local broker on 127.0.0.1:9092",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    topic_partitions: int = Field(default=6, ge=1)
    topic_replication: int | None = Field(default=None, ge=1, description="None → min(3, brokers)")
    schema_registry_url: str | None = None

    initial_state: Literal["running", "stopped"] = Field(
        default="running",
        description="what a workflow does before the control plane ever said anything",
    )
    worker_id: str | None = Field(default=None, description="None → <host>-<pid>")
    batch_max_records: int = Field(default=500, ge=1, le=10_000)
    batch_wait_s: float = Field(default=0.2, gt=0)
    heartbeat_s: float = Field(default=2.0, gt=0)
    max_poll_interval_s: float = Field(default=300.0, gt=0)
    session_timeout_s: float = Field(default=10.0, gt=0)
    retry_backoff_max_s: float = Field(default=30.0, gt=0)
    parent_wait_s: float = Field(
        default=300.0, ge=0, description="how long a record waits for its parent before the DLQ"
    )
    trace_outcomes: bool = Field(
        default=True,
        description="workers publish what they did with each record (the record trace)",
    )
    outcomes_retention_h: float = Field(
        default=7 * 24, gt=0, description="how long the record trace's outcome records are kept"
    )
    drift_check_s: float = Field(
        default=60.0,
        ge=0,
        description="how often a worker compares its targets' metadata with its Start; 0 = never",
    )

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    control_url: str | None = Field(
        default=None, description="where the CLI finds the control plane; None → http_host:port"
    )
    public_url: str | None = Field(
        default=None,
        description="the page's address as browsers see it (behind an ingress); https → the "
        "session cookie is __Host- and Secure even when uvicorn sees plain HTTP",
    )
    admin_token: SecretStr | None = Field(
        default=None, description="None → random, kept in .local/admin-token"
    )
    api_tokens: SecretStr | None = Field(
        default=None, description="more bearer tokens: name:role:token,... (viewer/operator/admin)"
    )
    worker_liveness_s: float | None = Field(
        default=None,
        gt=0,
        description="a worker is live while its heartbeat is younger; None → 3 x heartbeat_s + 2",
    )
    backlog_sample_s: float = Field(default=5.0, gt=0, description="backlog sampling interval")
    backlog_window_s: float = Field(default=60.0, gt=0, description="the trend's sliding window")
    replay_timeout_s: float = Field(
        default=30.0, gt=0, description="how long a replay waits for every live worker"
    )

    source_poll_interval_s: float = Field(
        default=3.0, gt=0, description="Dynamics source: pause between polls of a delta link"
    )
    source_page_size: int = Field(
        default=500, ge=1, le=5000, description="Dynamics source: Prefer odata.maxpagesize"
    )
    source_fatal_retry_s: float = Field(
        default=30.0, gt=0, description="Dynamics source: wait after a fatal error (FAILED)"
    )
    source_tombstones: bool = Field(
        default=True,
        description="Dynamics source: a tombstone for the key after each delete (so compacted "
        "change topics can drop the key; workers skip tombstones)",
    )
    source_entity_sets: str | None = Field(
        default=None,
        description="Dynamics source: logicalname=EntitySetName,... where EntityDefinitions "
        "cannot be read (else read from it, or the logical name + s)",
    )

    dynamics_url: str = "http://127.0.0.1:8081"
    dynamics_tenant: str = "local"
    dynamics_client_id: str = "crmsync-local"
    dynamics_client_secret: SecretStr = SecretStr("crmsync-local")
    dynamics_authority: str | None = None
    dynamics_max_concurrency: int = Field(
        default=16, ge=1, le=52, description="Dynamics requests in flight per worker (≤ 52)"
    )

    campaign_url: str = "http://127.0.0.1:8082"
    campaign_org: str = "local"
    campaign_client_id: str = "crmsync-local"
    campaign_client_secret: SecretStr = SecretStr("crmsync-local")
    campaign_ims_url: str | None = None
    target_http_client: HttpClient = Field(
        default="aiohttp",
        description="the HTTP client the target clients send through: aiohttp, or httpx",
    )
    campaign_max_concurrency: int = Field(
        default=16, ge=1, le=256, description="Campaign requests in flight per worker"
    )

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or LOCAL_BOOTSTRAP

    @cached_property
    def kafka(self) -> KafkaClients:
        """The Kafka clients of this process, with its security options; the SSL context is
        built here, once per process (the settings object is the process's one)."""
        options: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            if self.kafka_sasl_password is not None:
                options["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
            )
        return KafkaClients(self.bootstrap_servers, MappingProxyType(options))

    @property
    def liveness_s(self) -> float:
        """How old a worker's last heartbeat may be for it to count as live."""
        return self.worker_liveness_s or 3 * self.heartbeat_s + 2

    @property
    def control_base_url(self) -> str:
        if self.control_url:
            return self.control_url.rstrip("/")
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::", "") else self.http_host
        return f"http://{host}:{self.http_port}"

    @property
    def uses_local_kafka(self) -> bool:
        return self.kafka_bootstrap_servers is None

    @property
    def local_dir(self) -> Path:
        return self.home / ".local"

    @property
    def cache_dir(self) -> Path:
        return self.home / ".cache"

    @cached_property
    def dynamics(self) -> DynamicsTarget:
        return DynamicsTarget(
            url=self.dynamics_url,
            tenant=self.dynamics_tenant,
            client_id=self.dynamics_client_id,
            client_secret=self.dynamics_client_secret,
            authority=self.dynamics_authority,
            http_client=self.target_http_client,
            max_concurrency=self.dynamics_max_concurrency,
        )

    @cached_property
    def campaign(self) -> CampaignTarget:
        return CampaignTarget(
            url=self.campaign_url,
            org=self.campaign_org,
            client_id=self.campaign_client_id,
            client_secret=self.campaign_client_secret,
            ims_url=self.campaign_ims_url,
            http_client=self.target_http_client,
            max_concurrency=self.campaign_max_concurrency,
        )
