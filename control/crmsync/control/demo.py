"""`crmsync demo`: contacts, changes, opt-outs and email events that make every workflow move."""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from rich.progress import Progress

from crmsync.streams.kafka import topics
from crmsync.streams.kafka.events import EventProducer, change_event
from crmsync.streams.settings import Settings
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.errors import ParentMissing, SinkError

T = TypeVar("T")
PROFILE = "profileAndServicesExt/profile"
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_CONCURRENCY = 8

FIRST_NAMES = (
    "Ada", "Alan", "Amara", "Aiko", "Bruno", "Chloé", "Dmitri", "Elena", "Farah", "Grace",
    "Hugo", "Ines", "Jonas", "Kenji", "Lena", "Malik", "Nora", "Oskar", "Priya", "Quentin",
    "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zoe", "Mateo",
)  # fmt: skip
LAST_NAMES = (
    "Lovelace", "Turing", "Okafor", "Tanaka", "Rossi", "Dubois", "Ivanov", "García", "Haddad",
    "Hopper", "Martin", "Silva", "Berg", "Watanabe", "Fischer", "Khan", "Lindqvist", "Novak",
    "Patel", "Moreau", "Costa", "Larsen", "Aziz", "Nair", "Horvat", "Chen", "López", "Demir",
)  # fmt: skip
CITIES = ("Lisbon", "Berlin", "Osaka", "Lagos", "Toronto", "Lyon", "Oslo", "Pune", "Austin")
JOBS = ("Buyer", "Engineer", "Marketing Manager", "Analyst", "Store Owner", "Designer", "CFO")


class DemoFailed(RuntimeError):
    """The demo could not run: a target or Kafka unreachable."""


class DemoRefused(DemoFailed):
    """The targets are not the local emulators: the demo will not write made-up people there."""


@dataclass
class DemoReport:
    """What the demo did, for its summary."""

    created: list[dict[str, Any]] = field(default_factory=list)
    changed: int = 0
    deleted: int = 0
    d365_opt_outs: int = 0
    campaign_opt_outs: int = 0
    campaign_skipped: int = 0
    events: Counter[str] = field(default_factory=Counter)


def demo_contacts(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` contacts with realistic names and unique email addresses."""
    people = []
    for _ in range(n):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        contact_id = str(uuid.uuid4())
        local = f"{first}.{last}".lower().encode("ascii", "ignore").decode()
        people.append(
            {
                "contactid": contact_id,
                "firstname": first,
                "lastname": last,
                "emailaddress1": f"{local}.{contact_id[:8]}@example.com",
                "telephone1": f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
                "address1_city": rng.choice(CITIES),
                "jobtitle": rng.choice(JOBS),
                "donotbulkemail": False,
            }
        )
    return people


def email_event(kind: str, person: dict[str, Any], delivery: int) -> dict[str, Any]:
    """An EmailEvent of the demo's newsletter."""
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "type": kind,
        "ts_ms": int(time.time() * 1000),
        "contact_id": person["contactid"],
        "email": person["emailaddress1"],
        "campaign_id": "CMP-DEMO",
        "campaign_name": "crmsync demo newsletter",
        "delivery_id": f"DM{delivery}",
        "delivery_name": f"Newsletter #{delivery}",
        "mirror_page_url": f"https://example.com/mirror/DM{delivery}",
        "url": "https://example.com/offers/spring" if kind == "click" else None,
        "bounce_type": "hard" if kind == "bounce" else None,
        "bounce_reason": "550 5.1.1 mailbox does not exist" if kind == "bounce" else None,
    }
    return event


def _check_local(settings: Settings) -> None:
    for name, url in (("Dynamics", settings.dynamics_url), ("Campaign", settings.campaign_url)):
        if urlsplit(url).hostname not in _LOCAL_HOSTS:
            raise DemoRefused(
                f"{name} is {url}, not a local emulator: the demo writes made-up people and only "
                "runs against the emulators (`crmsync up` or `crmsync emulators`)"
            )


async def _each(
    items: Iterable[T], call: Callable[[T], Awaitable[None]], advance: Callable[[], None]
) -> None:
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def one(item: T) -> None:
        async with limit:
            await call(item)
        advance()

    await asyncio.gather(*(one(item) for item in items))


async def run_demo(
    settings: Settings, n: int, *, profile_wait_s: float = 60.0, seed: int | None = None
) -> DemoReport:
    """Runs the demo against the emulators and prints what to look at; its report."""
    _check_local(settings)
    rng = random.Random(seed)
    people = demo_contacts(n, rng)
    shuffled = rng.sample(people, len(people))
    deleted = shuffled[: max(1, n // 20) if n >= 5 else 0]
    alive = shuffled[len(deleted) :]
    changed = alive[: max(1, n // 5)]
    d365_out = alive[: max(1, n // 10)]  # also among the changed: several changes in a row
    campaign_out = alive[len(d365_out) : len(d365_out) + max(1, n // 10)]
    recipients = alive[: max(1, (len(alive) * 3) // 5)]
    report = DemoReport()
    total = (
        n + len(changed) + len(deleted) + len(d365_out) + len(campaign_out) + len(recipients) * 2
    )
    dynamics = DynamicsClient(settings.dynamics)
    campaign = CampaignClient(settings.campaign)
    try:
        with Progress(disable=not sys.stderr.isatty(), transient=True) as progress:
            task = progress.add_task("demo", total=total)

            def advance() -> None:
                progress.advance(task)

            def step(text: str) -> None:
                progress.update(task, description=text)

            step(f"creating {n} contacts in Dynamics")

            async def create(person: dict[str, Any]) -> None:
                fields = {k: v for k, v in person.items() if k != "contactid"}
                await dynamics.upsert("contacts", person["contactid"], fields, mode="create")
                report.created.append(person)

            await _each(people, create, advance)
            step(f"changing {len(changed)} contacts")

            async def change(person: dict[str, Any]) -> None:
                fields = {"jobtitle": rng.choice(JOBS), "address1_city": rng.choice(CITIES)}
                await dynamics.upsert("contacts", person["contactid"], fields, mode="update")
                report.changed += 1

            await _each(changed, change, advance)
            step(f"deleting {len(deleted)} contacts")

            async def delete(person: dict[str, Any]) -> None:
                await dynamics.delete("contacts", person["contactid"])
                report.deleted += 1

            await _each(deleted, delete, advance)
            step(f"opting out {len(d365_out)} contacts in Dynamics")

            async def opt_out(person: dict[str, Any]) -> None:
                await dynamics.upsert(
                    "contacts", person["contactid"], {"donotbulkemail": True}, mode="update"
                )
                report.d365_opt_outs += 1

            await _each(d365_out, opt_out, advance)
            async with EventProducer(settings.kafka) as producer:
                step("waiting for the profiles in Campaign (source → d365-to-campaign)")
                ready = await _wait_profiles(campaign, campaign_out, profile_wait_s)
                step(f"blacklisting {len(ready)} profiles in Campaign")

                async def blacklist(person: dict[str, Any]) -> None:
                    if person["contactid"] not in ready:
                        report.campaign_skipped += 1
                        return
                    await campaign.upsert(
                        PROFILE, person["contactid"], {"blackListEmail": True}, mode="update"
                    )
                    await producer.send_change(
                        topics.PROFILE_CHANGES,
                        change_event(
                            "u",
                            "profile",
                            person["contactid"],
                            after={
                                "externalId": person["contactid"],
                                "email": person["emailaddress1"],
                                "blackListEmail": True,
                            },
                            system="campaign",
                        ),
                    )
                    report.campaign_opt_outs += 1

                await _each(campaign_out, blacklist, advance)
                step("publishing email events")
                events = []
                for person in recipients:
                    events.append(email_event("send", person, 1))
                    roll = rng.random()
                    kind = "bounce" if roll < 0.08 else "click" if roll < 0.4 else "open"
                    events.append(email_event(kind, person, 1))
                futures = []
                for event in events:
                    futures.append(
                        await producer.send_encoded(
                            topics.EMAIL_EVENTS,
                            event["contact_id"],
                            _encode_email(event),
                            wait=False,
                        )
                    )
                for future in futures:
                    await future
                    advance()
                report.events.update(event["type"] for event in events)
    except ParentMissing as error:
        raise DemoFailed(f"a record was missing: {error.reason}") from error
    except SinkError as error:
        raise DemoFailed(error.reason) from error
    finally:
        await dynamics.aclose()
        await campaign.aclose()
    print(summary(settings, report))
    return report


def _encode_email(event: dict[str, Any]) -> bytes:
    from crmsync.schemas.codec import EMAIL_EVENT

    return EMAIL_EVENT.encode(event)


async def _wait_profiles(
    campaign: CampaignClient, people: list[dict[str, Any]], within: float
) -> set[str]:
    """The contact ids among ``people`` whose Campaign profile exists, waiting up to ``within``."""
    found: set[str] = set()
    deadline = time.monotonic() + within
    while True:
        for person in people:
            if person["contactid"] not in found and await campaign.find(
                PROFILE, person["contactid"]
            ):
                found.add(person["contactid"])
        if len(found) == len(people) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1.0)


def summary(settings: Settings, report: DemoReport) -> str:
    """What the demo did and where to look."""
    events = ", ".join(f"{report.events[k]} {k}" for k in ("send", "open", "click", "bounce"))
    n_events = sum(report.events.values())
    lines = [
        "demo done:",
        f"  Dynamics   created {len(report.created)} contacts, changed {report.changed}, "
        f"deleted {report.deleted}, opted out {report.d365_opt_outs} (donotbulkemail)",
        f"  Campaign   blacklisted {report.campaign_opt_outs} profiles (blackListEmail) and "
        f"published the changes to {topics.PROFILE_CHANGES}",
        f"  Kafka      {n_events} email events to {topics.EMAIL_EVENTS} ({events})",
    ]
    if report.campaign_skipped:
        lines.append(
            f"  note       {report.campaign_skipped} profile(s) had not reached Campaign in time, "
            "so they were not blacklisted: are `crmsync source d365` and the d365-to-campaign "
            "worker running?"
        )
    alive = len(report.created) - report.deleted
    lines += [
        "what to look at:",
        f"  workflows page     {settings.control_base_url}  (backlogs rise, then drain)",
        f"  d365-to-campaign   {alive} contacts become Campaign profiles; {report.deleted} "
        "deleted ones lose theirs",
        f"  campaign-to-d365   {n_events} email events become Dynamics activities",
        f"  opt-in-out         {report.d365_opt_outs} Dynamics opt-outs → blackListEmail, "
        f"{report.campaign_opt_outs} Campaign blacklists → donotbulkemail",
        f"  emulator stats     {settings.dynamics_url}/_admin/stats  "
        f"{settings.campaign_url}/_admin/stats",
    ]
    return "\n".join(lines)
