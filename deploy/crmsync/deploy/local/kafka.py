"""Real Apache Kafka on loopback: jars from Maven Central, KRaft storage, one or three nodes."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from crmsync.deploy.local import secure

log = logging.getLogger(__name__)

#: Kafka's command-line tools by their script names, as classes of the kafka-tools jar.
TOOLS = {
    "kafka-consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "kafka-topics": "org.apache.kafka.tools.TopicCommand",
    "kafka-consumer-perf-test": "org.apache.kafka.tools.ConsumerPerformance",
    "kafka-producer-perf-test": "org.apache.kafka.tools.ProducerPerformance",
    "kafka-get-offsets": "org.apache.kafka.tools.GetOffsetShell",
    "kafka-console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "kafka-metadata-quorum": "org.apache.kafka.tools.MetadataQuorumCommand",
    "kafka-storage": "kafka.tools.StorageTool",
    "kafka-acls": "org.apache.kafka.tools.AclCommand",
}


class KafkaLaunchError(RuntimeError):
    """The local broker could not be obtained, formatted or started."""


def _pom() -> Path:
    return Path(str(resources.files(__package__).joinpath("pom.xml")))


def kafka_version() -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", _pom().read_text())
    if match is None:
        raise KafkaLaunchError("pom.xml names no <kafka.version>")
    return match.group(1)


def ensure_jars(cache_dir: Path) -> Path:
    """Returns the folder of Kafka's jars, fetching them with Maven the first time only."""
    lib = cache_dir.resolve() / "kafka" / kafka_version() / "lib"
    if (lib / ".complete").exists():
        return lib
    if shutil.which("mvn") is None:
        raise KafkaLaunchError("Maven (mvn) is needed once to obtain Apache Kafka's jars")
    lib.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="lib.", dir=lib.parent))
    log.info("event=kafka_jars_fetch version=%s dir=%s", kafka_version(), lib)
    result = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(_pom()),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaLaunchError(f"mvn failed to fetch Kafka's jars:\n{result.stdout}{result.stderr}")
    (staging / ".complete").touch()
    if lib.exists():  # a concurrent fetch won; keep its copy
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(lib)
    return lib


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = Path(home, "bin", "java") if home else shutil.which("java")
    if not java:
        raise KafkaLaunchError("Java 17+ is needed to run Apache Kafka (no java on PATH)")
    return str(java)


def run_tool(cache_dir: Path, tool: str, args: Sequence[str], timeout: float = 120) -> str:
    """Runs one of Kafka's own tools from the launcher's classpath and returns its stdout."""
    cls = TOOLS.get(tool, tool)
    lib = ensure_jars(cache_dir)
    result = subprocess.run(
        [_java(), "-Xmx512m", *_log_opts(None), "-cp", f"{lib}/*", cls, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise KafkaLaunchError(f"{tool} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def group_lag(cache_dir: Path, bootstrap: str, group: str) -> dict[tuple[str, int], str]:
    """LAG per (topic, partition) as Kafka's own kafka-consumer-groups prints it ("-": none)."""
    out = run_tool(
        cache_dir,
        "kafka-consumer-groups",
        ["--bootstrap-server", bootstrap, "--describe", "--group", group],
    )
    header: list[str] | None = None
    lags: dict[tuple[str, int], str] = {}
    for line in out.splitlines():
        cells = line.split()
        if cells[:1] == ["GROUP"]:
            header = cells
        elif header and cells and cells[0] == group:
            row = dict(zip(header, cells, strict=False))
            lags[(row["TOPIC"], int(row["PARTITION"]))] = row["LAG"]
    return lags


def _log_opts(logs_dir: Path | None) -> list[str]:
    config = resources.files(__package__).joinpath("log4j2.properties")
    if logs_dir is None:  # tools: quiet, errors only
        return ["-Dlog4j2.rootLevel=error", "-Dlog4j2.level=error"]
    return [f"-Dlog4j2.configurationFile={config}", f"-Dkafka.logs.dir={logs_dir}"]


@dataclass(frozen=True)
class NodeSpec:
    node_id: int
    port: int
    controller_port: int
    data_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class LocalKafka:
    """A local KRaft cluster of `nodes` combined broker+controller nodes on 127.0.0.1.

    Data lives under `data_dir` and survives stop/start; a formatted node is never reformatted.
    """

    cache_dir: Path
    data_dir: Path
    nodes: int = 1
    base_port: int = 9092
    controller_base_port: int = 19092
    heap: str = "768m"
    extra_config: dict[str, str] = field(default_factory=dict)
    #: SASL/SCRAM for every client, crmsync's ACLs (deploy/kafka/acls.yaml) enforced.
    secure: bool = False
    _procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.cache_dir = self.cache_dir.resolve()
        self.data_dir = self.data_dir.resolve()

    @property
    def specs(self) -> list[NodeSpec]:
        return [
            NodeSpec(
                node_id=i + 1,
                port=self.base_port + i,
                controller_port=self.controller_base_port + i,
                data_dir=self.data_dir / f"node-{i + 1}",
            )
            for i in range(self.nodes)
        ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(spec.address for spec in self.specs)

    def _config(self, spec: NodeSpec) -> str:
        voters = ",".join(f"{s.node_id}@127.0.0.1:{s.controller_port}" for s in self.specs)
        replication = str(min(3, self.nodes))
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(spec.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{spec.port},CONTROLLER://127.0.0.1:{spec.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{spec.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(spec.data_dir / "data"),
            "num.partitions": "1",
            "default.replication.factor": replication,
            "min.insync.replicas": "2" if self.nodes >= 3 else "1",
            "offsets.topic.replication.factor": replication,
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": "2" if self.nodes >= 3 else "1",
            "share.coordinator.state.topic.replication.factor": replication,
            "share.coordinator.state.topic.min.isr": "1",
            # A laptop-sized broker: rebalances at once, small segments, few threads.
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "controlled.shutdown.enable": "true",
            **self._secure_settings(spec),
            **self.extra_config,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _secure_settings(self, spec: NodeSpec) -> dict[str, str]:
        if not self.secure:
            return {}
        superuser = self.passwords()[secure.SUPERUSER]
        return secure.broker_settings(spec.port, spec.controller_port, superuser)

    def passwords(self) -> dict[str, str]:
        """The SCRAM password of every principal (secure clusters only)."""
        return secure.passwords(self.data_dir, list(secure.load_acls()))

    def client_options(self, principal: str = "") -> dict[str, Any]:
        """aiokafka options for a client of this cluster, as `principal` (default: superuser)."""
        if not self.secure:
            return {}
        principal = principal or secure.SUPERUSER
        return secure.client_options(principal, self.passwords()[principal])

    def apply_acls(self, principals: Sequence[str] | None = None) -> None:
        """Adds deploy/kafka/acls.yaml's ACLs (of `principals`, default all) with kafka-acls."""
        config = secure.command_config(self.data_dir, self.passwords()[secure.SUPERUSER])
        for args in secure.acl_commands(secure.load_acls(), principals):
            run_tool(
                self.cache_dir,
                "kafka-acls",
                [
                    "--bootstrap-server",
                    self.bootstrap_servers,
                    "--command-config",
                    str(config),
                    *args,
                ],
            )

    def _format(self, lib: Path) -> None:
        cluster_id_file = self.data_dir / "cluster.id"
        if not cluster_id_file.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cluster_id_file.write_text(_random_cluster_id())
        cluster_id = cluster_id_file.read_text().strip()
        for spec in self.specs:
            spec.data_dir.mkdir(parents=True, exist_ok=True)
            properties = spec.data_dir / "server.properties"
            properties.write_text(self._config(spec))
            if (spec.data_dir / "data" / "meta.properties").exists():
                continue
            result = subprocess.run(
                [
                    _java(),
                    *_log_opts(None),
                    "-cp",
                    f"{lib}/*",
                    TOOLS["kafka-storage"],
                    "format",
                    f"--cluster-id={cluster_id}",  # an id may start with "-"
                    "-c",
                    str(properties),
                    "--ignore-formatted",
                    *(secure.scram_format_args(self.passwords()) if self.secure else ()),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise KafkaLaunchError(f"formatting node {spec.node_id} failed: {result.stderr}")

    def start(self, timeout: float = 90) -> None:
        """Starts every node that is not running and waits until the cluster answers metadata.

        Every port is checked before any node starts, and a start that fails stops the nodes it
        started: a failed start leaves no broker behind."""
        lib = ensure_jars(self.cache_dir)
        self._format(lib)
        starting = [s for s in self.specs if not self._running(s.node_id)]
        for spec in starting:
            self._check_ports(spec)
        try:
            for spec in starting:
                self.start_node(spec.node_id, lib=lib)
            self.wait_ready(timeout)
        except BaseException:
            for spec in starting:
                self.stop_node(spec.node_id, timeout=30, kill=True)
            raise

    def _running(self, node_id: int) -> bool:
        running = self._procs.get(node_id)
        return running is not None and running.poll() is None

    @staticmethod
    def _check_ports(spec: NodeSpec) -> None:
        for port in (spec.port, spec.controller_port):
            if _port_open(port):
                raise KafkaLaunchError(
                    f"127.0.0.1:{port} is already in use: is another Kafka running? "
                    "Stop it, or set KAFKA_BOOTSTRAP_SERVERS to use it."
                )

    def start_node(self, node_id: int, lib: Path | None = None) -> None:
        spec = self.specs[node_id - 1]
        if self._running(node_id):
            return
        self._check_ports(spec)
        lib = lib or ensure_jars(self.cache_dir)
        logs = spec.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        command = [
            _java(),
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            *_log_opts(logs),
            "-cp",
            f"{lib}/*",
            "kafka.Kafka",
            str(spec.data_dir / "server.properties"),
        ]
        with (logs / "stdout.log").open("ab") as stdout:
            # Own session: Ctrl-C in a terminal reaches us, and we stop the broker in order.
            self._procs[node_id] = subprocess.Popen(
                command, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True
            )
        (spec.data_dir / "broker.pid").write_text(str(self._procs[node_id].pid))
        log.info(
            "event=kafka_node_started node=%s port=%s pid=%s",
            node_id,
            spec.port,
            self._procs[node_id].pid,
        )

    def stop_node(self, node_id: int, timeout: float = 60, kill: bool = False) -> None:
        """Stops one node: SIGTERM (controlled shutdown) and wait, or SIGKILL when `kill`."""
        proc = self._procs.pop(node_id, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("event=kafka_node_kill node=%s reason=timeout", node_id)
            proc.kill()
            proc.wait()
        (self.specs[node_id - 1].data_dir / "broker.pid").unlink(missing_ok=True)

    def stop(self, timeout: float = 60) -> None:
        """Stops every node at once: one by one, the last nodes would wait for a lost quorum."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for node_id in list(self._procs):
            self.stop_node(node_id, timeout)

    def is_running(self) -> bool:
        return any(proc.poll() is None for proc in self._procs.values())

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            for node_id, proc in self._procs.items():
                if proc.poll() is not None:
                    raise KafkaLaunchError(
                        f"Kafka node {node_id} exited with {proc.returncode}; see "
                        f"{self.specs[node_id - 1].data_dir / 'logs' / 'server.log'}"
                    )
            if not _port_open(self.specs[0].port):
                time.sleep(0.3)
                continue
            try:
                brokers = probe_brokers(self.bootstrap_servers, **self.client_options())
            except Exception as error:  # not up yet: any connection or protocol error
                last_error = error
            else:
                if brokers >= self.nodes:
                    return
            time.sleep(0.3)
        raise KafkaLaunchError(f"Kafka did not become ready in {timeout:.0f}s: {last_error}")

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def probe_brokers(bootstrap_servers: str, timeout: float = 5.0, **options: Any) -> int:
    """How many brokers the cluster's metadata lists; raises when it cannot be reached.

    Runs aiokafka on a thread of its own, so it can be called with or without a running loop.
    """
    result: list[int] = []
    failure: list[BaseException] = []

    async def probe() -> int:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout * 1000), **options
        )
        await asyncio.wait_for(admin.start(), timeout)
        try:
            cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
            return len(cluster["brokers"])
        finally:
            await admin.close()

    def run() -> None:
        try:
            result.append(asyncio.run(probe()))
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout * 3)
    if failure:
        raise failure[0]
    if not result:
        raise TimeoutError(f"no metadata from {bootstrap_servers} in {timeout}s")
    return result[0]


def _random_cluster_id() -> str:
    # KRaft cluster ids are 16 random bytes in URL-safe base64 without padding.
    import base64

    while True:  # as Kafka's own Uuid.randomUuid(): never an id that reads like an option
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
