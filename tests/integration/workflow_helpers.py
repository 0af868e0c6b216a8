"""What the data-plane behaviour tests publish and read back: events, raw bytes, DLQ, targets."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT
from crmsync.streams.control_protocol import WorkerStatus
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import EventProducer, change_event
from tests.integration.harness import Cluster, Worker, end_offsets, wait_for
from tests.integration.kafka_io import read_all

PROFILE = "profileAndServicesExt/profile"
PURCHASES = "profileAndServicesExt/cusPurchase"
PURCHASE_CHANGES = topics.entity_changes("new_purchase")
ACTIVITY_SETS = {
    "send": "crmsync_emailsends",
    "open": "crmsync_emailopens",
    "click": "crmsync_emailclicks",
    "bounce": "crmsync_emailbounces",
}


def guid() -> str:
    return str(uuid.uuid4())


def now_ms() -> int:
    return int(time.time() * 1000)


async def start_running(
    cluster: Cluster,
    workflow: str,
    config: Mapping[str, Any] | None = None,
    version: int = 1,
    **env: str,
) -> tuple[Worker, int]:
    """Writes a `running` control record, starts one worker, waits until it reports RUNNING.

    The record is written first, so the worker subscribes to the topics of that config.
    """
    generation = await cluster.control(
        workflow, "running", dict(config) if config else None, version
    )
    worker = cluster.start_worker(workflow, **env)
    await cluster.wait_state(workflow, "RUNNING", generation)
    return worker, generation


# -- publishing ------------------------------------------------------------------------------


async def publish_changes(
    cluster: Cluster, topic: str, events: Iterable[Mapping[str, Any]]
) -> None:
    """ChangeEvents, validated and encoded as any producer would, in order per key."""
    async with EventProducer(cluster.bootstrap) as producer:
        futures = [
            await producer.send_encoded(
                topic, str(event["key"]), CHANGE_EVENT.encode(event), wait=False
            )
            for event in events
        ]
        for future in futures:
            await future


async def publish_email_events(cluster: Cluster, events: Iterable[Mapping[str, Any]]) -> None:
    async with EventProducer(cluster.bootstrap) as producer:
        for event in events:
            await producer.send_email_event(topics.EMAIL_EVENTS, event)


@dataclass(frozen=True)
class Sent:
    """Where a raw record landed."""

    key: bytes
    value: bytes
    partition: int
    offset: int


async def publish_raw(
    cluster: Cluster, topic: str, records: Iterable[tuple[bytes, bytes]]
) -> list[Sent]:
    """Arbitrary bytes, as a foreign or broken producer would send them."""
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            (key, value, await producer.send(topic, value=value, key=key)) for key, value in records
        ]
        sent = []
        for key, value, future in futures:
            meta = await future
            sent.append(Sent(key, value, meta.partition, meta.offset))
        return sent
    finally:
        await producer.stop()


def contact_change(
    contact_id: str,
    after: Mapping[str, Any] | None,
    *,
    op: str = "u",
    before: Mapping[str, Any] | None = None,
    source_ts_ms: int | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    return change_event(
        op,  # type: ignore[arg-type]
        "contact",
        contact_id,
        after=after,
        before=before,
        system="d365",
        source_ts_ms=source_ts_ms,
        user=user,
    )


def profile_change(
    external_id: str,
    after: Mapping[str, Any] | None,
    *,
    before: Mapping[str, Any] | None = None,
    source_ts_ms: int | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    return change_event(
        "u",
        "profile",
        external_id,
        after=after,
        before=before,
        system="campaign",
        source_ts_ms=source_ts_ms,
        user=user,
    )


def purchase_change(purchase_id: str, contact_id: str, product: str) -> dict[str, Any]:
    return change_event(
        "c",
        "new_purchase",
        purchase_id,
        after={
            "new_purchaseid": purchase_id,
            "new_product": product,
            "new_amount": 19.5,
            "new_quantity": 3,
            "new_purchasedon": "2024-05-01T12:00:00Z",
            "_new_contactid_value": contact_id,
        },
        system="d365",
    )


def email_event(kind: str, contact_id: str, n: int = 0, **extra: Any) -> dict[str, Any]:
    event = {
        "event_id": f"evt-{kind}-{guid()}",
        "type": kind,
        "ts_ms": 1_714_564_800_000 + n * 1000,  # 2024-05-01T12:00:00Z onwards
        "contact_id": contact_id,
        "email": f"{contact_id[:8]}@example.org",
        "campaign_id": f"CMP{n:04d}",
        "campaign_name": f"Spring sale {n}",
        "delivery_id": f"DLV{n:04d}",
        "delivery_name": f"Spring newsletter {n}",
        "mirror_page_url": f"https://mirror.example.org/{n}",
        "url": None,
        "bounce_type": None,
        "bounce_reason": None,
    }
    if kind == "click":
        event["url"] = f"https://shop.example.org/item/{n}"
    if kind == "bounce":
        event["bounce_type"] = "hard"
        event["bounce_reason"] = "mailbox does not exist"
    event.update(extra)
    EMAIL_EVENT.validate(event)
    return event


# -- reading back ----------------------------------------------------------------------------


def counts(cluster: Cluster, system: str) -> dict[str, int]:
    return dict(cluster.emulators.stats(system)["counts"])


def requests(cluster: Cluster, system: str) -> int:
    return int(cluster.emulators.stats(system)["requests"])


async def campaign_rows(cluster: Cluster, resource: str) -> list[dict[str, Any]]:
    """Every record of a Campaign resource, duplicates included."""
    client = cluster.campaign_client()
    try:
        return [row async for row in client.list(resource)]
    finally:
        await client.aclose()


async def dynamics_rows(
    cluster: Cluster, entity_set: str, filter: str | None = None
) -> list[dict[str, Any]]:
    client = cluster.dynamics_client()
    try:
        return [row async for row in client.query(entity_set, filter=filter)]
    finally:
        await client.aclose()


async def create_contacts_in_dynamics(
    cluster: Cluster, contacts: Iterable[Mapping[str, Any]]
) -> None:
    """Contacts that exist in Dynamics before any event names them (as in a real org)."""
    client = cluster.dynamics_client()
    try:
        for contact in contacts:
            fields = {k: v for k, v in contact.items() if k != "contactid"}
            await client.upsert("contacts", str(contact["contactid"]), fields, mode="create")
    finally:
        await client.aclose()


async def create_profiles_in_campaign(
    cluster: Cluster, profiles: Iterable[Mapping[str, Any]]
) -> None:
    """Profiles that exist in Campaign already (externalId = the Dynamics contactid)."""
    client = cluster.campaign_client()
    try:
        for profile in profiles:
            fields = {k: v for k, v in profile.items() if k != "externalId"}
            await client.upsert(PROFILE, str(profile["externalId"]), fields, mode="create")
    finally:
        await client.aclose()


async def dead_letters(cluster: Cluster, workflow: str) -> list[tuple[Any, dict[str, str]]]:
    """The workflow's DLQ: (record, headers as text)."""
    records = await read_all(cluster.bootstrap, topics.dead_letters(workflow))
    return [(r, {k: v.decode() for k, v in r.headers}) for r in records]


async def total_end_offset(cluster: Cluster, topic: str) -> int:
    return sum((await end_offsets(cluster.bootstrap, topic)).values())


async def wait_drained(
    cluster: Cluster, workflow: str, topics_: Iterable[str], within: float = 60
) -> None:
    """Waits until the workflow's group committed everything published on `topics_`."""
    names = list(topics_)

    async def drained() -> bool:
        for topic in names:
            if await cluster.lag(workflow, topic) != 0:
                return False
        return True

    await wait_for(drained, within, f"{workflow} lag 0 on {', '.join(names)}")


async def status_of(cluster: Cluster, workflow: str) -> list[WorkerStatus]:
    live_after = (time.time() - 5) * 1000
    return [s for s in await cluster.statuses(workflow) if s.heartbeat_ms > live_after]
