"""Mapped writes through the sinks into the emulators: what a user sees in Campaign and Dynamics."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from crmsync.streams.catalog import default_config, parse_config
from crmsync.streams.config import (
    CampaignToD365Config,
    D365ToCampaignConfig,
    OptInOutConfig,
)
from crmsync.streams.mapping import Write, email_event_writes, writes_for
from crmsync.streams.optout import decide
from crmsync.streams.sinks.base import Outcome, SinkRecord
from crmsync.streams.sinks.campaign import CampaignSink
from crmsync.streams.sinks.dynamics import DynamicsSink
from crmsync.targets._http import RetryPolicy
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.errors import ParentMissing
from crmsync.targets.settings import CampaignTarget, DynamicsTarget

pytestmark = pytest.mark.timeout(60)
PROFILE = "profileAndServicesExt/profile"
PURCHASES = "profileAndServicesExt/cusPurchase"
CONTACTS_TOPIC = "d365.contact.changes"
PURCHASES_TOPIC = "d365.entity.new_purchase.changes"
FAST = RetryPolicy(attempts=2, budget_s=2, backoff_base_s=0.05, backoff_cap_s=0.1)


def guid(n: int) -> str:
    return str(uuid.UUID(int=n))


@pytest.fixture
async def campaign(emulators: Any) -> AsyncIterator[CampaignSink]:
    target = CampaignTarget(
        url=emulators.campaign_url,
        org=emulators.org,
        client_id=emulators.client_id,
        client_secret=emulators.client_secret,
    )
    sink = CampaignSink.for_target(target, retry=FAST)
    yield sink
    await sink.aclose()


@pytest.fixture
async def dynamics(emulators: Any) -> AsyncIterator[DynamicsSink]:
    target = DynamicsTarget(
        url=emulators.dynamics_url,
        tenant=emulators.tenant,
        client_id=emulators.client_id,
        client_secret=emulators.client_secret,
    )
    sink = DynamicsSink.for_target(target, retry=FAST)
    yield sink
    await sink.aclose()


def change(op: str, key: str, after: dict[str, Any] | None = None, ts: int = 1) -> dict[str, Any]:
    return {
        "op": op,
        "entity": "x",
        "key": key,
        "before": None,
        "after": after,
        "source": {"system": "d365", "ts_ms": ts, "user": None, "txid": None},
        "ts_ms": ts,
    }


async def write(sink: CampaignSink | DynamicsSink, writes: list[Write]) -> list[Outcome]:
    return await sink.write_batch([w.record for w in writes])


def d2c(data: dict[str, Any] | None = None) -> D365ToCampaignConfig:
    config = parse_config("d365-to-campaign", data or {})
    assert isinstance(config, D365ToCampaignConfig)
    return config


async def test_a_mapped_contact_shows_as_a_profile_and_create_only_fields_stay(
    campaign: CampaignSink,
) -> None:
    config = d2c(
        {
            "mappings": [
                {"source": "contactid", "target": "externalId"},
                {"source": "firstname", "target": "firstName"},
                {"source": "emailaddress1", "target": "email", "apply_updates": False},
                {"source": "preferred", "target": "lastName", "picklist": {"1": "Mail"}},
            ]
        }
    )
    key = guid(1)
    created = writes_for(
        change(
            "c",
            key,
            {"contactid": key, "firstname": "Ada", "emailaddress1": "ada@x.org", "preferred": 1},
        ),
        CONTACTS_TOPIC,
        config,
    )
    updated = writes_for(
        change("u", key, {"firstname": "Augusta", "emailaddress1": "other@x.org"}),
        CONTACTS_TOPIC,
        config,
    )

    assert await write(campaign, created) == [None]
    assert await write(campaign, updated) == [None]
    profile = await campaign.client.find(PROFILE, key)

    assert profile is not None
    assert (profile["externalId"], profile["firstName"], profile["lastName"]) == (
        key,
        "Augusta",
        "Mail",
    )
    assert profile["email"] == "ada@x.org"  # apply_updates false: set on create only

    assert await write(campaign, writes_for(change("d", key), CONTACTS_TOPIC, config)) == [None]
    assert await campaign.client.find(PROFILE, key) is None


async def test_a_purchase_waits_for_its_profile_then_links_to_it(campaign: CampaignSink) -> None:
    config = default_config("d365-to-campaign")
    assert isinstance(config, D365ToCampaignConfig)
    contact, purchase = guid(2), guid(200)
    purchase_event = change(
        "c",
        purchase,
        {
            "new_purchaseid": purchase,
            "new_product": "Difference Engine",
            "new_amount": 99.5,
            "new_quantity": 1,
            "new_purchasedon": "2024-05-01T12:00:00Z",
            "_new_contactid_value": contact,
        },
    )

    early = await write(campaign, writes_for(purchase_event, PURCHASES_TOPIC, config))
    assert isinstance(early[0], ParentMissing) and contact in early[0].reason
    assert await campaign.client.find(PURCHASES, purchase, key_field="purchaseId") is None

    contact_event = change("c", contact, {"contactid": contact, "lastname": "Babbage"})
    assert await write(campaign, writes_for(contact_event, CONTACTS_TOPIC, config)) == [None]
    assert await write(campaign, writes_for(purchase_event, PURCHASES_TOPIC, config)) == [None]

    profile = await campaign.client.find(PROFILE, contact)
    row = await campaign.client.find(PURCHASES, purchase, key_field="purchaseId")
    assert profile is not None and row is not None
    assert row["profile"]["PKey"] == profile["PKey"]
    assert (row["product"], row["amount"], row["quantity"]) == ("Difference Engine", 99.5, 1)


async def test_a_relinked_purchase_follows_a_recreated_profile(
    emulators: Any, campaign: CampaignSink
) -> None:
    # The link's PKey is cached; a profile deleted and created again behind the sink's back
    # must still be linked (looked up again), not rejected.
    config = d2c()
    contact, purchase = guid(3), guid(300)
    contact_event = change("c", contact, {"lastname": "Byron"})
    link = change("u", purchase, {"_new_contactid_value": contact, "new_product": "Pen"})
    assert await write(campaign, writes_for(contact_event, CONTACTS_TOPIC, config)) == [None]
    assert await write(campaign, writes_for(link, PURCHASES_TOPIC, config)) == [None]
    target = CampaignTarget(url=emulators.campaign_url, org=emulators.org)
    async with CampaignClient(target, retry=FAST) as other:
        await other.delete(PROFILE, contact)
        await other.upsert(PROFILE, contact, {"lastName": "Byron"})
        outcomes = await write(campaign, writes_for(link, PURCHASES_TOPIC, config))
        row = await other.find(PURCHASES, purchase, key_field="purchaseId")
        profile = await other.find(PROFILE, contact)

    assert outcomes == [None]
    assert row is not None and profile is not None
    assert row["profile"]["PKey"] == profile["PKey"]


async def test_email_events_become_one_activity_each_linked_to_the_contact(
    dynamics: DynamicsSink,
) -> None:
    config = default_config("campaign-to-d365")
    assert isinstance(config, CampaignToD365Config)
    contact = guid(4)
    event = {
        "event_id": "click-1",
        "type": "click",
        "ts_ms": 1_714_564_800_000,
        "contact_id": contact,
        "email": "ada@x.org",
        "campaign_id": "CMP1",
        "campaign_name": "Spring",
        "delivery_id": "DLV1",
        "delivery_name": "Wave 1",
        "mirror_page_url": "https://m.x.org/1",
        "url": "https://x.org/offer",
        "bounce_type": None,
        "bounce_reason": None,
    }
    writes = email_event_writes(event, config)

    early = await write(dynamics, writes)
    assert isinstance(early[0], ParentMissing) and contact in early[0].reason

    await dynamics.client.upsert("contacts", contact, {"lastname": "Lovelace"})
    assert await write(dynamics, writes) == [None]
    assert await write(dynamics, writes + writes) == [None, None]  # replays: still one row
    rows = [r async for r in dynamics.client.query("crmsync_emailclicks")]

    assert len(rows) == 1
    (row,) = rows
    assert row["crmsync_eventid"] == "click-1"
    assert row["_regardingobjectid_value"] == contact
    assert (row["subject"], row["crmsync_url"], row["crmsync_campaignname"]) == (
        "CMP1 / DLV1",
        "https://x.org/offer",
        "Spring",
    )
    assert row["crmsync_eventtime"].startswith("2024-05-01T12:00:00")


async def test_dynamics_create_fields_are_kept_on_update(dynamics: DynamicsSink) -> None:
    key = guid(5)
    first = SinkRecord(
        "contacts", key, fields={"firstname": "Ada"}, create_fields={"jobtitle": "Countess"}
    )
    second = SinkRecord(
        "contacts", key, fields={"firstname": "Augusta"}, create_fields={"jobtitle": "Nobody"}
    )
    assert await dynamics.write_batch([first, second]) == [None, None]
    assert await dynamics.write_batch([second]) == [None]
    row = await dynamics.client.get("contacts", key, select=["firstname", "jobtitle"])

    assert row is not None and (row["firstname"], row["jobtitle"]) == ("Augusta", "Countess")


async def test_opt_out_writes_touch_only_the_flag_and_wait_for_a_missing_record(
    campaign: CampaignSink, dynamics: DynamicsSink
) -> None:
    config = default_config("opt-in-out")
    assert isinstance(config, OptInOutConfig)
    contact = guid(6)
    from_d365 = decide(change("u", contact, {"donotbulkemail": True}, ts=10), "d365", None, config)
    from_campaign = decide(
        change("u", contact, {"denyListEmail": True}, ts=10), "campaign", None, config
    )

    # Neither side has the contact yet: both writes wait, nothing is created.
    (to_campaign,) = await write(campaign, from_d365.writes)
    (to_dynamics,) = await write(dynamics, from_campaign.writes)
    assert isinstance(to_campaign, ParentMissing) and isinstance(to_dynamics, ParentMissing)
    assert await campaign.client.find(PROFILE, contact) is None
    assert await dynamics.client.get("contacts", contact) is None

    await campaign.client.upsert(PROFILE, contact, {"firstName": "Ada", "email": "ada@x.org"})
    await dynamics.client.upsert("contacts", contact, {"firstname": "Ada", "lastname": "L"})
    assert await write(campaign, from_d365.writes) == [None]
    assert await write(dynamics, from_campaign.writes) == [None]

    profile = await campaign.client.find(PROFILE, contact)
    row = await dynamics.client.get("contacts", contact)
    assert profile is not None and row is not None
    assert (profile["blackListEmail"], profile["firstName"], profile["email"]) == (
        True,
        "Ada",
        "ada@x.org",
    )
    assert (row["donotbulkemail"], row["firstname"], row["lastname"]) == (True, "Ada", "L")
