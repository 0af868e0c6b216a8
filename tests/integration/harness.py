"""Real processes for data-plane tests: emulators, workers, the control topic, lag, targets."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr

from crmsync.streams import catalog
from crmsync.streams.control_protocol import (
    ControlRecord,
    ReplayRequest,
    WorkerStatus,
    write_control,
)
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.events import EventProducer, change_event
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.settings import CampaignTarget, DynamicsTarget

PARTITIONS = 4


@dataclass
class EmulatorProcess:
    """`crmsync emulators` as a child process on free ports."""

    dynamics_url: str
    campaign_url: str
    process: subprocess.Popen[bytes]

    def reset(self) -> None:
        for url in (self.dynamics_url, self.campaign_url):
            httpx.delete(f"{url}/_admin/faults").raise_for_status()
            httpx.post(f"{url}/_admin/reset", json={}).raise_for_status()

    def stats(self, system: str) -> dict[str, Any]:
        url = self.dynamics_url if system == "d365" else self.campaign_url
        result: dict[str, Any] = httpx.get(f"{url}/_admin/stats").json()
        return result

    def faults(self, system: str, **faults: Any) -> None:
        url = self.dynamics_url if system == "d365" else self.campaign_url
        httpx.post(f"{url}/_admin/faults", json=faults).raise_for_status()

    def clear_faults(self) -> None:
        for url in (self.dynamics_url, self.campaign_url):
            httpx.delete(f"{url}/_admin/faults").raise_for_status()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def start_emulators(data_dir: Path, dynamics_port: int, campaign_port: int) -> EmulatorProcess:
    """`crmsync emulators` on the given ports, set up as `crmsync up` sets them up: the Dynamics
    emulator starts as a fresh org, so crmsync's own tables are made by `targets setup d365`.

    Called from synchronous (session- or module-scoped) fixtures: no event loop is running."""
    log = (data_dir / "emulators.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crmsync.control.cli",
            "emulators",
            "--dynamics-port",
            str(dynamics_port),
            "--campaign-port",
            str(campaign_port),
            "--data-dir",
            str(data_dir),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    emulators = EmulatorProcess(
        f"http://127.0.0.1:{dynamics_port}", f"http://127.0.0.1:{campaign_port}", process
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            emulators.stats("d365")
            emulators.stats("campaign")
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        asyncio.run(set_up_d365(emulators.dynamics_url))
        return emulators
    raise RuntimeError("emulators did not start")


async def set_up_d365(
    dynamics_url: str,
    *,
    tenant: str = "local",
    client_id: str = "crmsync-local",
    client_secret: str = "crmsync-local",
) -> int:
    """What a user does first on a real org, and `crmsync up` on every start: `crmsync targets
    setup d365` (its Python function) for the default configs, then `/_admin/reset` so a test
    starts with no records and zeroed counters (the tables stay). Returns the writes sent."""
    from crmsync.streams import preflight
    from crmsync.streams.catalog import NAMES, default_config

    target = DynamicsTarget(
        url=dynamics_url,
        tenant=tenant,
        client_id=client_id,
        client_secret=SecretStr(client_secret),
    )
    async with DynamicsClient(target) as client:
        plan = await preflight.setup_dynamics(
            {name: default_config(name) for name in NAMES}, client
        )
    async with httpx.AsyncClient() as admin:
        (await admin.post(f"{dynamics_url}/_admin/reset", json={})).raise_for_status()
    return len(plan)


#: The two ways to run a worker; they run the same Faust app.
WORKER_COMMANDS = ("crmsync", "faust")


@dataclass
class Worker:
    """One `crmsync worker <workflow>` (or `faust -A crmsync.streams.worker worker`) process."""

    workflow: str
    process: subprocess.Popen[bytes]
    log: Path

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """What a data-plane test works with: the broker, the emulators, worker processes."""

    bootstrap: str
    emulators: EmulatorProcess
    home: Path
    env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    generations: dict[str, int] = field(default_factory=dict)
    #: How `start_worker` runs a worker (one of WORKER_COMMANDS).
    command: str = "crmsync"

    def worker_env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "CRMSYNC_HOME": str(self.home),
            "CRMSYNC_DYNAMICS_URL": self.emulators.dynamics_url,
            "CRMSYNC_CAMPAIGN_URL": self.emulators.campaign_url,
            "CRMSYNC_TOPIC_PARTITIONS": str(PARTITIONS),
            "CRMSYNC_HEARTBEAT_S": "0.5",
            "CRMSYNC_SESSION_TIMEOUT_S": "6",
            "CRMSYNC_BATCH_WAIT_S": "0.05",
            **self.env,
            **extra,
        }

    def start_worker(self, workflow: str, command: str | None = None, **env: str) -> Worker:
        log = self.home / f"worker-{workflow}-{len(self.workers)}.log"
        argv = {
            "crmsync": [sys.executable, "-m", "crmsync.control.cli", "worker", workflow],
            # Faust's CLI turns its web server (port 6066) on: two workers on one host clash.
            "faust": [
                *(sys.executable, "-m", "faust", "-A", "crmsync.streams.worker"),
                *("worker", "--without-web"),
            ],
        }[command or self.command]
        env = {"CRMSYNC_WORKFLOW": workflow, **env}
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.worker_env(**env),
                start_new_session=True,
            )
        worker = Worker(workflow, process, log)
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.kill()

    # -- control and status -------------------------------------------------------------

    async def control(
        self,
        workflow: str,
        desired: str,
        config: dict[str, Any] | None = None,
        version: int = 1,
        replay: dict[str, str] | None = None,
    ) -> int:
        """Writes a control record with a new generation; returns the generation."""
        from crmsync.streams.catalog import default_config

        generation = self.generations.get(workflow, 0) + 1
        self.generations[workflow] = generation
        record = ControlRecord(
            workflow=workflow,
            desired=desired,  # type: ignore[arg-type]
            generation=generation,
            active_config=config or default_config(workflow).model_dump(mode="json"),
            active_version=version,
            replay=ReplayRequest.model_validate(replay) if replay else None,
        )
        await write_control(KafkaClients(self.bootstrap), record)
        return generation

    async def statuses(self, workflow: str) -> list[WorkerStatus]:
        latest: dict[bytes, bytes | None] = {}
        for record in await read_topic(self.bootstrap, topics.STATUS):
            latest[record.key] = record.value
        found = [WorkerStatus.decode(v) for v in latest.values() if v is not None]
        return [s for s in found if s.workflow == workflow]

    async def wait_state(
        self,
        workflow: str,
        state: str,
        generation: int | None = None,
        workers: int = 1,
        within: float = 60,
    ) -> list[WorkerStatus]:
        """Waits until `workers` live workers of the workflow report `state`."""

        async def ready() -> list[WorkerStatus] | None:
            live = [
                s
                for s in await self.statuses(workflow)
                if s.heartbeat_ms > (time.time() - 5) * 1000
            ]
            match = [
                s
                for s in live
                if s.state == state and (generation is None or s.generation == generation)
            ]
            return match if len(match) >= workers else None

        found: list[WorkerStatus] = await wait_for(
            ready, within, f"{workers} worker(s) of {workflow} {state}"
        )
        return found

    # -- Kafka --------------------------------------------------------------------------

    async def publish_contacts(self, contacts: Iterable[dict[str, Any]]) -> int:
        n = 0
        async with EventProducer(self.bootstrap) as producer:
            futures = []
            for contact in contacts:
                event = change_event(
                    "u", "contact", str(contact["contactid"]), after=contact, system="d365"
                )
                from crmsync.schemas.codec import CHANGE_EVENT

                futures.append(
                    await producer.send_encoded(
                        topics.CONTACT_CHANGES,
                        event["key"],
                        CHANGE_EVENT.encode(event, validate=False),
                        wait=False,
                    )
                )
                n += 1
            await asyncio.gather(*futures)
        return n

    async def lag(self, workflow: str, topic: str = topics.CONTACT_CHANGES) -> int:
        """Σ (log end - committed) over the topic's partitions for the workflow's group."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(f"crmsync.{workflow}")
        finally:
            await admin.close()
        ends = await end_offsets(self.bootstrap, topic)
        committed = {tp: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
        return sum(end - max(committed.get(tp, 0), 0) for tp, end in ends.items())

    # -- targets ------------------------------------------------------------------------

    def campaign_client(self) -> CampaignClient:
        return CampaignClient(CampaignTarget(url=self.emulators.campaign_url))

    def dynamics_client(self) -> DynamicsClient:
        return DynamicsClient(DynamicsTarget(url=self.emulators.dynamics_url))

    async def profiles(self) -> dict[str, dict[str, Any]]:
        """Every Campaign profile by externalId."""
        client = self.campaign_client()
        try:
            rows = [row async for row in client.list("profileAndServicesExt/profile")]
        finally:
            await client.aclose()
        return {str(row.get("externalId")): row for row in rows}


def contacts(n: int, tag: str = "") -> list[dict[str, Any]]:
    return [
        {
            "contactid": str(uuid.uuid4()),
            "firstname": f"First{i}{tag}"[:30],
            "lastname": f"Last{i}",
            "emailaddress1": f"person{i}.{uuid.uuid4().hex[:6]}@example.org",
        }
        for i in range(n)
    ]


async def wait_for(
    check: Callable[[], Awaitable[Any]], within: float, what: str, interval: float = 0.25
) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                (described,) = await admin.describe_topics([topic])
            finally:
                await admin.close()
            partitions = {p["partition"] for p in described.get("partitions", [])}
        tps = [TopicPartition(topic, p) for p in partitions]
        return dict(await consumer.end_offsets(tps)) if tps else {}
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str) -> list[Any]:
    from tests.integration.kafka_io import read_all

    return await read_all(bootstrap, topic)


async def recreate_topics(bootstrap: str, partitions: int = PARTITIONS) -> None:
    """Deletes every crmsync topic (their committed offsets go with them) and creates them anew."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        ours = [t for t in await admin.list_topics() if not t.startswith("__")]
        if ours:
            await admin.delete_topics(ours)

        async def gone() -> bool:
            remaining = set(await admin.list_topics()) & set(ours)
            return not remaining

        await wait_for(gone, 30, "topics deleted")
    finally:
        await admin.close()
    specs = catalog.topic_specs(partitions, custom_entities=["new_purchase"])
    for _ in range(20):
        try:
            await topics.ensure_topics(bootstrap, specs)
            return
        except Exception:  # still being deleted on the broker: try again shortly
            await asyncio.sleep(0.5)
    await topics.ensure_topics(bootstrap, specs)


async def group_members(bootstrap: str, group: str) -> list[str]:
    """Member ids of a consumer group (a member that left and came back has a new id)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    members: list[str] = []
    for response in described:
        for entry in response.groups:
            members += [member[0] for member in entry[5]]
    return sorted(members)
