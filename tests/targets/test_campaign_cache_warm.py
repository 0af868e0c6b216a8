"""A large load warms the externalId → PKey cache by paging profiles, then creates without lookups.

Paging as Adobe documents it (Campaign Standard API, "Pagination",
https://experienceleague.adobe.com/docs/campaign-standard/using/working-with-apis/global-concepts/additional-operations/pagination.html):
`_lineCount` limits a page, the `next` node's `href` (with its computed `_lineStart`) is the next
page, and `_forcePagination=true` keeps `next` on tables above XtkBigTableThreshold.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from crmsync.streams.sinks.base import SinkRecord
from crmsync.streams.sinks.campaign import CampaignSink
from crmsync.targets.campaign import WARM_PAGE_SIZE, CampaignClient
from crmsync.targets.settings import CampaignTarget

pytestmark = pytest.mark.timeout(120)
PROFILE = "profileAndServicesExt/profile"


#: Smaller than the real 1,000 (and 200) so a test needs few records for several pages.
PAGE, MIN_MISSES = 100, 50


def client(emulators: Any) -> CampaignClient:
    return CampaignClient(target(emulators), warm_page_size=PAGE, warm_min_misses=MIN_MISSES)


def target(emulators: Any) -> CampaignTarget:
    return CampaignTarget(
        url=emulators.campaign_url,
        org=emulators.org,
        client_id=emulators.client_id,
        client_secret=emulators.client_secret,
    )


async def requests_served(emulators: Any) -> int:
    async with httpx.AsyncClient(base_url=emulators.campaign_url) as http:
        return int((await http.get("/_admin/stats")).json()["requests"])


def profile(key: str, first: str) -> SinkRecord:
    return SinkRecord(PROFILE, key, fields={"email": f"{key[:8]}@example.org", "firstName": first})


async def all_profiles(emulators: Any) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    async with CampaignClient(target(emulators)) as reader:
        async for row in reader.list(PROFILE, page_size=WARM_PAGE_SIZE):
            names.setdefault(row["externalId"], []).append(row["firstName"])
    return names


async def test_a_load_pages_existing_profiles_then_writes_one_request_per_profile(
    emulators: Any,
) -> None:
    old = [str(uuid.uuid4()) for _ in range(250)]  # three pages
    new = [str(uuid.uuid4()) for _ in range(50)]
    seeding = CampaignSink(client(emulators))
    assert await seeding.write_batch([profile(k, "Old") for k in old]) == [None] * len(old)
    await seeding.aclose()

    before = await requests_served(emulators)
    sink = CampaignSink(client(emulators))  # a fresh worker: an empty cache
    batch = [profile(k, "Updated") for k in old] + [profile(k, "New") for k in new]
    outcomes = await sink.write_batch(batch)
    await sink.aclose()
    served = await requests_served(emulators) - before

    assert outcomes == [None] * len(batch)
    # One PATCH per existing profile, one POST per new one; the warm-up: a count (two
    # requests) and three pages. Looking each profile up first would have cost 300 more.
    assert served == len(batch) + 2 + 3
    names = await all_profiles(emulators)
    assert all(names[k] == ["Updated"] for k in old)
    assert all(names[k] == ["New"] for k in new)


async def test_a_profile_created_behind_a_warm_cache_is_found_not_duplicated(
    emulators: Any,
) -> None:
    keys = [str(uuid.uuid4()) for _ in range(60)]
    sink = CampaignSink(client(emulators))
    assert await sink.write_batch([profile(k, "First") for k in keys]) == [None] * len(keys)

    # Someone else (another replica after a rebalance, an import) creates a profile after
    # the warm-up listed every one; Campaign does not refuse a second profile with its
    # externalId, so creating it again would duplicate it.
    late = str(uuid.uuid4())
    async with CampaignClient(target(emulators)) as other:
        theirs = await other.upsert(PROFILE, late, {"email": "late@example.org"})

    before = await requests_served(emulators)
    assert await sink.write_batch([profile(late, "Ours")]) == [None]
    served = await requests_served(emulators) - before
    # A "known absent" key on its way: the resource's count (one request) differs from what
    # the warm-up listed plus our creates, so the key is looked up and its profile updated.
    assert served == 1 + 2
    ours_only = [str(uuid.uuid4())]
    before = await requests_served(emulators)
    await sink.write_batch([profile(k, "Later") for k in ours_only])
    await sink.aclose()
    assert await requests_served(emulators) - before == 2  # no longer warm: lookup + create

    names = await all_profiles(emulators)
    assert names[late] == ["Ours"]
    assert all(names[k] == ["First"] for k in keys)
    async with CampaignClient(target(emulators)) as reader:
        found = await reader.find(PROFILE, late)
    assert found is not None and found["PKey"] == theirs


async def test_a_trickle_of_new_keys_is_looked_up_not_paged(emulators: Any) -> None:
    before = await requests_served(emulators)
    keys = [str(uuid.uuid4()) for _ in range(MIN_MISSES - 1)]
    sink = CampaignSink(client(emulators))
    assert await sink.write_batch([profile(k, "Few") for k in keys]) == [None] * len(keys)
    await sink.aclose()
    assert await requests_served(emulators) - before == 2 * len(keys)  # lookup + create each
