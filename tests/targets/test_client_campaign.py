"""CampaignClient and CampaignSink against the Campaign emulator over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from crmsync.streams.sinks.base import SinkRecord
from crmsync.streams.sinks.campaign import CampaignSink
from crmsync.targets._http import RetryPolicy
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.errors import Fatal, RecordRejected, Retryable
from crmsync.targets.settings import CampaignTarget

pytestmark = pytest.mark.timeout(60)
PROFILE = "profileAndServicesExt/profile"
PURCHASES = "profileAndServicesExt/cusPurchase"


def target(emulators: Any, **overrides: Any) -> CampaignTarget:
    settings: dict[str, Any] = {
        "url": emulators.campaign_url,
        "org": emulators.org,
        "client_id": emulators.client_id,
        "client_secret": emulators.client_secret,
    }
    return CampaignTarget(**{**settings, **overrides})


async def admin(emulators: Any, method: str, path: str, body: Any = None) -> Any:
    async with httpx.AsyncClient(base_url=emulators.campaign_url) as http:
        response = await http.request(method, f"/_admin/{path}", json=body)
        response.raise_for_status()
        return response.json()


def contact_id(n: int) -> str:
    return str(uuid.UUID(int=n))


async def test_profile_upsert_update_and_delete_by_external_id(emulators: Any) -> None:
    async with CampaignClient(target(emulators)) as client:
        key = contact_id(1)
        pkey = await client.upsert(PROFILE, key, {"email": "ada@example.org", "firstName": "Ada"})
        again = await client.upsert(PROFILE, key, {"lastName": "Lovelace", "blackListEmail": True})
        # A fresh client (empty PKey cache) finds the profile through the externalId filter.
        async with CampaignClient(target(emulators)) as fresh:
            third = await fresh.upsert("profileAndServices/profile", key, {"firstName": "Augusta"})
            found = await fresh.find(PROFILE, key)
        await client.delete(PROFILE, key)
        await client.delete(PROFILE, key)  # already gone: still a success
        gone = await client.find(PROFILE, key)

    assert pkey == again == third
    assert found is not None
    assert (found["firstName"], found["lastName"], found["blackListEmail"]) == (
        "Augusta",
        "Lovelace",
        True,
    )
    assert gone is None


async def test_a_stale_cached_pkey_is_looked_up_again(emulators: Any) -> None:
    async with (
        CampaignClient(target(emulators)) as client,
        CampaignClient(target(emulators)) as other,
    ):
        first = await client.upsert(PROFILE, contact_id(2), {"firstName": "A"})
        await other.delete(PROFILE, contact_id(2))  # behind the first client's back
        second = await client.upsert(PROFILE, contact_id(2), {"firstName": "B"})
        found = await other.find(PROFILE, contact_id(2))

    assert first != second
    assert found is not None and found["firstName"] == "B"


async def test_custom_resources_upsert_by_their_key_and_list_with_paging(emulators: Any) -> None:
    async with CampaignClient(target(emulators)) as client:
        for n in range(30):
            await client.upsert(
                PURCHASES,
                f"P-{n}",
                {"product": f"thing {n}", "quantity": n},
                key_field="purchaseId",
            )
        await client.upsert(PURCHASES, "P-3", {"quantity": 300}, key_field="purchaseId")
        listed = [r async for r in client.list(PURCHASES, page_size=7)]

    assert sorted(r["purchaseId"] for r in listed) == sorted(f"P-{n}" for n in range(30))
    assert next(r for r in listed if r["purchaseId"] == "P-3")["quantity"] == 300


async def test_the_same_batch_twice_leaves_the_same_profiles(emulators: Any) -> None:
    records = [
        SinkRecord(PROFILE, contact_id(100 + n), fields={"email": f"p{n}@example.org"})
        for n in range(60)
    ]
    bad = SinkRecord(PROFILE, contact_id(999), fields={"firstName": "x" * 31})
    read_only = SinkRecord(PROFILE, contact_id(998), fields={"created": "2020-01-01"})
    ordered = [
        SinkRecord(PROFILE, contact_id(100), fields={"firstName": f"v{n}"}) for n in range(3)
    ]
    batch = [*records[:30], bad, read_only, *ordered, *records[30:]]
    sink = CampaignSink.for_target(target(emulators))
    first = await sink.write_batch(batch)
    second = await sink.write_batch(batch)
    counts = (await admin(emulators, "GET", "stats"))["counts"]
    listed = [r async for r in sink.client.list(PROFILE, page_size=25)]
    await sink.aclose()

    for outcomes in (first, second):
        assert isinstance(outcomes[30], RecordRejected) and "firstName" in outcomes[30].reason
        assert isinstance(outcomes[31], RecordRejected) and "read-only" in outcomes[31].reason
        assert [o for n, o in enumerate(outcomes) if n not in (30, 31)] == [None] * 63
    assert sum(counts.values()) == 60
    assert len(listed) == 60
    assert next(r for r in listed if r["externalId"] == contact_id(100))["firstName"] == "v2"


async def test_a_429_pauses_the_client_until_retry_after(emulators: Any) -> None:
    async with CampaignClient(target(emulators)) as client:
        await client.upsert(PROFILE, contact_id(1), {"firstName": "warm"})
        await admin(
            emulators, "POST", "faults", {"fail_next": [{"status": 429, "retry_after_s": 2}]}
        )
        started = time.monotonic()

        async def later() -> None:
            await asyncio.sleep(0.3)
            await client.upsert(PROFILE, contact_id(2), {"firstName": "b"})

        await asyncio.gather(client.upsert(PROFILE, contact_id(1), {"firstName": "a"}), later())
        elapsed = time.monotonic() - started
        found = await client.find(PROFILE, contact_id(2))

    assert elapsed >= 2.0
    assert found is not None and found["firstName"] == "b"


async def test_an_outage_is_reported_retryable_then_written_on_the_next_call(
    emulators: Any,
) -> None:
    sink = CampaignSink(CampaignClient(target(emulators), retry=RetryPolicy(budget_s=1)))
    record = SinkRecord(PROFILE, contact_id(5), fields={"firstName": "after the outage"})
    await admin(emulators, "POST", "faults", {"outage_s": 3})
    during = await sink.write_batch([record])
    assert isinstance(during[0], Retryable) and (during[0].retry_after or 0) >= 2
    await asyncio.sleep(during[0].retry_after or 0)  # what the workflow runtime does
    after = await sink.write_batch([record])
    await sink.aclose()

    assert after == [None]


async def test_a_revoked_token_is_refreshed_and_refused_credentials_are_fatal(
    emulators: Any,
) -> None:
    async with CampaignClient(target(emulators)) as client:
        await client.upsert(PROFILE, contact_id(1), {"firstName": "a"})
        await admin(emulators, "POST", "faults", {"revoke_tokens": True})
        await client.upsert(PROFILE, contact_id(1), {"firstName": "b"})
    sink = CampaignSink.for_target(target(emulators, client_secret="wrong"))
    outcomes = await sink.write_batch(
        [SinkRecord(PROFILE, contact_id(3), fields={"firstName": "c"})]
    )
    await sink.aclose()

    assert isinstance(outcomes[0], Fatal) and "invalid_client" in outcomes[0].reason


async def test_a_missing_resource_is_fatal(emulators: Any) -> None:
    async with CampaignClient(target(emulators)) as client:
        with pytest.raises(Fatal, match="404"):
            await client.upsert("customResources/cusNope", "k", {"a": 1}, key_field="key")
