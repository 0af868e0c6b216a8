"""The traffic chaos scenarios publish on each workflow, and the expected rows it implies.

Each `*Traffic` builds encoded events (what any producer would put on the topic), remembers the
row the target must end with per key, and reads the target back through its real API.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer

from crmsync.schemas.codec import CHANGE_EVENT, EMAIL_EVENT
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import change_event
from crmsync.streams.source import TrackedEntity, events_of
from tests.chaos.ledger import Comparison, Expected, compare
from tests.integration.harness import Cluster
from tests.integration.workflow_helpers import (
    ACTIVITY_SETS,
    PROFILE,
    campaign_rows,
    create_contacts_in_dynamics,
    create_profiles_in_campaign,
    dead_letters,
    dynamics_rows,
    now_ms,
)

D2C = "d365-to-campaign"
C2D = "campaign-to-d365"
OPT = "opt-in-out"

Record = tuple[str | None, bytes]  # (key, value) as published


async def publish(
    cluster: Cluster, topic: str, records: Sequence[Record], *, chunk: int = 5000, **options: Any
) -> int:
    """Publishes in the given order (so per key in order) as EventProducer does: idempotent,
    acks=all. Returns how many."""
    producer = AIOKafkaProducer(
        bootstrap_servers=cluster.bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
        **options,
    )
    try:
        await producer.start()
        for start in range(0, len(records), chunk):
            futures = [
                await producer.send(topic, value=value, key=key.encode() if key else None)
                for key, value in records[start : start + chunk]
            ]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(records)


@dataclass
class ContactTraffic:
    """Dynamics contact changes → Campaign profiles (d365-to-campaign)."""

    expected: Expected = field(default_factory=lambda: Expected("profile"))
    sent: int = 0

    def versions(self, people: int, versions: int, tag: str = "") -> list[Record]:
        """`versions` successive changes of `people` new contacts, rounds interleaved."""
        ids = [str(uuid.uuid4()) for _ in range(people)]
        return [self.change(cid, v, tag) for v in range(versions) for cid in ids]

    def change(self, contact_id: str, version: int, tag: str = "") -> Record:
        event = self.event(contact_id, version, tag)
        return contact_id, CHANGE_EVENT.encode(event, validate=False)

    def event(self, contact_id: str, version: int, tag: str = "") -> dict[str, Any]:
        """The ChangeEvent of one version of a contact; it becomes the key's expected row."""
        after = {
            "contactid": contact_id,
            "firstname": f"v{version}{tag} {contact_id[:8]}",
            "lastname": f"Last {version}",
            "emailaddress1": f"{contact_id[:13]}.{version}@example.org",
        }
        self.expected.set(
            contact_id,
            {
                "firstName": after["firstname"][:30],
                "lastName": after["lastname"],
                "email": after["emailaddress1"],
            },
        )
        self.sent += 1
        return change_event("u", "contact", contact_id, after=after, system="d365")

    async def compare(self, cluster: Cluster, ours: set[str] | None = None) -> Comparison:
        return compare(self.expected, await campaign_rows(cluster, PROFILE), "externalId", ours)


@dataclass
class EmailTraffic:
    """Campaign email events → Dynamics activities (campaign-to-d365), one per event id."""

    contacts: list[str]
    expected: Expected = field(default_factory=lambda: Expected("activity"))
    sent: int = 0
    _n: int = 0

    @classmethod
    async def with_contacts(cls, cluster: Cluster, n: int) -> EmailTraffic:
        people = [{"contactid": str(uuid.uuid4()), "lastname": f"Reader {i}"} for i in range(n)]
        await create_contacts_in_dynamics(cluster, people)
        return cls([p["contactid"] for p in people])

    def events(self, n: int, replays: float = 0.1) -> list[Record]:
        """`n` new events over the contacts, some published again renamed (a producer's replay:
        the same event id, so the later copy wins and no second activity appears)."""
        records = []
        fresh = []
        for _ in range(n):
            kind = random.choice(("send", "open", "click", "bounce"))
            event = self._event(kind, random.choice(self.contacts))
            fresh.append(event)
            records.append(self._record(event))
        for event in random.sample(fresh, int(len(fresh) * replays)):
            records.append(self._record({**event, "campaign_name": f"{event['campaign_name']} R"}))
        return records

    def _event(self, kind: str, contact_id: str) -> dict[str, Any]:
        self._n += 1
        n = self._n
        return {
            "event_id": f"evt-{kind}-{uuid.uuid4()}",
            "type": kind,
            "ts_ms": 1_714_564_800_000 + n * 1000,
            "contact_id": contact_id,
            "email": f"{contact_id[:8]}@example.org",
            "campaign_id": f"CMP{n:06d}",
            "campaign_name": f"Campaign {n}",
            "delivery_id": f"DLV{n:06d}",
            "delivery_name": f"Delivery {n}",
            "mirror_page_url": f"https://mirror.example.org/{n}",
            "url": f"https://shop.example.org/{n}" if kind == "click" else None,
            "bounce_type": "hard" if kind == "bounce" else None,
            "bounce_reason": "mailbox does not exist" if kind == "bounce" else None,
        }

    def _record(self, event: dict[str, Any]) -> Record:
        self.expected.set(
            event["event_id"],
            {
                "subject": f"{event['campaign_id']} / {event['delivery_id']}",
                "crmsync_campaignname": event["campaign_name"],
                "_regardingobjectid_value": event["contact_id"],
            },
        )
        self.sent += 1
        return event["contact_id"], EMAIL_EVENT.encode(event, validate=False)

    async def compare(self, cluster: Cluster) -> Comparison:
        rows = [
            row for name in ACTIVITY_SETS.values() for row in await dynamics_rows(cluster, name)
        ]
        return compare(self.expected, rows, "crmsync_eventid")


@dataclass
class OptOutTraffic:
    """Campaign opt-out flips → Dynamics donotbulkemail (opt-in-out), newest change wins.

    Made with `on_both_sides`, each person is also a Campaign profile: a flip is made through
    Campaign's API before its event is published, Dynamics rows are edited (`edits`), and
    both sides must end with the last flip.
    """

    contacts: list[str]
    expected: Expected = field(default_factory=lambda: Expected("opt-out"))
    sent: int = 0
    both_sides: bool = False
    edited: int = 0
    _value: dict[str, bool] = field(default_factory=dict)
    _ts: dict[str, int] = field(default_factory=dict)
    _recent: list[str] = field(default_factory=list)

    @classmethod
    async def with_contacts(cls, cluster: Cluster, n: int) -> OptOutTraffic:
        people: list[dict[str, Any]] = [
            {"contactid": str(uuid.uuid4()), "lastname": f"Subscriber {i}", "donotbulkemail": False}
            for i in range(n)
        ]
        await create_contacts_in_dynamics(cluster, people)
        traffic = cls([p["contactid"] for p in people])
        for cid in traffic.contacts:
            traffic.expected.set(cid, {"donotbulkemail": False})
        return traffic

    @classmethod
    async def on_both_sides(cls, cluster: Cluster, n: int) -> OptOutTraffic:
        people: list[dict[str, Any]] = [
            {
                "contactid": str(uuid.uuid4()),
                "firstname": f"Sub{i}",
                "lastname": f"Subscriber {i}",
                "emailaddress1": f"subscriber{i}.{uuid.uuid4().hex[:6]}@example.org",
                "donotbulkemail": False,
            }
            for i in range(n)
        ]
        await create_contacts_in_dynamics(cluster, people)
        await create_profiles_in_campaign(
            cluster,
            [
                {"externalId": p["contactid"], "email": p["emailaddress1"], "blackListEmail": False}
                for p in people
            ],
        )
        traffic = cls([p["contactid"] for p in people], both_sides=True)
        for cid in traffic.contacts:
            traffic.expected.set(cid, {"donotbulkemail": False})
        return traffic

    def flips(self, n: int) -> list[Record]:
        """`n` flips of random contacts' blackListEmail, each newer than the last of its key."""
        records: list[Record] = []
        for _ in range(n):
            cid = random.choice(self.contacts)
            old = self._value.get(cid, False)
            ts = max(self._ts.get(cid, 0) + 1, now_ms())
            self._value[cid], self._ts[cid] = not old, ts
            self._recent.append(cid)
            event = change_event(
                "u",
                "profile",
                cid,
                after={"externalId": cid, "blackListEmail": not old},
                before={"blackListEmail": old},
                system="campaign",
                source_ts_ms=ts,
            )
            self.expected.set(cid, {"donotbulkemail": not old})
            self.sent += 1
            records.append((cid, CHANGE_EVENT.encode(event, validate=False)))
        return records

    async def applied_flips(self, cluster: Cluster, n: int) -> list[Record]:
        """`flips`, each made in Campaign through its API first (as a person would)."""
        records = self.flips(n)
        client = cluster.campaign_client()
        try:
            for cid in dict.fromkeys(cid for cid, _ in records):
                assert cid is not None
                fields = {"blackListEmail": self._value[cid]}
                await client.upsert(PROFILE, cid, fields, mode="update")
        finally:
            await client.aclose()
        return records

    async def edits(self, cluster: Cluster, n: int) -> list[Record]:
        """Edits of another field (the last name) in Dynamics, of contacts just flipped or
        opted out, published as the Dynamics source does: the whole row, with donotbulkemail
        as Dynamics holds it then (crmsync's write of a flip may not have landed yet)."""
        opted_out = [cid for cid, value in self._value.items() if value]
        picked = self._recent[-n:] + random.sample(opted_out, min(n, len(opted_out)))
        self._recent.clear()
        contact = TrackedEntity("contact", topics.CONTACT_CHANGES, "contacts")
        records: list[Record] = []
        client = cluster.dynamics_client()
        try:
            for cid in list(dict.fromkeys(picked))[:n]:
                self.edited += 1
                fields = {"lastname": f"Subscriber e{self.edited}"}
                await client.upsert("contacts", cid, fields, mode="update")
                row = await client.get("contacts", cid)
                for key, event in events_of(contact, [row] if row else [], initial=False):
                    if event is not None:
                        records.append((key, CHANGE_EVENT.encode(event, validate=False)))
        finally:
            await client.aclose()
        return records

    async def compare(self, cluster: Cluster) -> Comparison:
        rows = [
            {**row, "donotbulkemail": bool(row.get("donotbulkemail"))}
            for row in await dynamics_rows(cluster, "contacts")
        ]
        found = compare(self.expected, rows, "contactid", ours=set(self.contacts))
        if self.both_sides:
            campaign = Expected("opt-out in Campaign")
            for cid, want in self.expected.rows.items():
                campaign.set(cid, {"blackListEmail": want["donotbulkemail"]})
            profiles = [
                {**row, "blackListEmail": bool(row.get("blackListEmail"))}
                for row in await campaign_rows(cluster, PROFILE)
            ]
            found.add(compare(campaign, profiles, "externalId", ours=set(self.contacts)))
        return found


async def dlq_count(cluster: Cluster, workflows: Iterable[str]) -> int:
    return sum([len(await dead_letters(cluster, w)) for w in workflows])


async def publish_steadily(
    cluster: Cluster,
    topic: str,
    records: Sequence[Record],
    batches: int,
    pause: float,
) -> int:
    """Publishes in `batches` slices `pause` seconds apart, as a live producer would; a slice
    that fails (a broker down) is sent again whole, so each key still ends with its last
    version."""
    size = max(1, -(-len(records) // batches))
    for start in range(0, len(records), size):
        part = records[start : start + size]
        for attempt in range(60):
            try:
                await asyncio.wait_for(publish(cluster, topic, part), 30)
                break
            except Exception:
                if attempt == 59:
                    raise
                await asyncio.sleep(1)
        await asyncio.sleep(pause)
    return len(records)
