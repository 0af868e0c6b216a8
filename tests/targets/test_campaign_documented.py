"""Campaign Standard behaviours as Adobe documents them, checked on the emulator and the client.

Each test quotes the documented request/response shape it is written from (AdobeDocs/
campaign-standard.en on GitHub, the source of experienceleague.adobe.com's API pages).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from crmsync.deploy.emulators.server import running_emulators
from crmsync.streams.catalog import default_config
from crmsync.streams.config import D365ToCampaignConfig
from crmsync.streams.sinks.base import SinkRecord
from crmsync.streams.sinks.campaign import CampaignSink
from crmsync.targets._http import RetryPolicy
from crmsync.targets._transport import AiohttpTransport, Response
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.errors import Fatal, RecordRejected
from crmsync.targets.settings import CampaignTarget

pytestmark = pytest.mark.timeout(60)
FAST = RetryPolicy(attempts=3, budget_s=5, backoff_base_s=0.05, backoff_cap_s=0.1)
PROFILE = "profileAndServicesExt/profile"


def target(emulators: Any, **overrides: Any) -> CampaignTarget:
    settings: dict[str, Any] = {
        "url": emulators.campaign_url,
        "org": emulators.org,
        "client_id": emulators.client_id,
        "client_secret": emulators.client_secret,
    }
    return CampaignTarget(**{**settings, **overrides})


@pytest.fixture
async def client(emulators: Any) -> AsyncIterator[CampaignClient]:
    async with CampaignClient(target(emulators), retry=FAST) as campaign:
        yield campaign


async def faults(emulators: Any, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=emulators.campaign_url) as http:
        (await http.post("/_admin/faults", json=body)).raise_for_status()


async def test_custom_resources_linked_to_the_profile_live_under_profile_and_services_ext(
    emulated_campaign: httpx.AsyncClient, client: CampaignClient
) -> None:
    """AdobeDocs/campaign-standard.en, help/api/using/custom-resources.md: "You can perform any
    operation with custom resources, as long as they are linked to the Profile table", at
    ``https://mc.adobe.io/<ORGANIZATION>/campaign/profileAndServicesExt/<resourceName>/``;
    ``GET .../profileAndServicesExt/`` lists ``"cusProduct": {"data":
    "/profileAndServicesExt/cusProduct/", ...}``. ``customResources/`` holds unlinked ones only.
    """
    config = default_config("d365-to-campaign")
    assert isinstance(config, D365ToCampaignConfig)
    linked = [e for e in config.custom_entities if e.link is not None]
    assert linked and all(e.target.startswith("profileAndServicesExt/") for e in linked)

    profile = await client.upsert(PROFILE, "c-1", {"lastName": "Lovelace"})
    purchase = {"purchaseId": "P-1", "profile": {"PKey": profile}}
    refused = await emulated_campaign.post("customResources/cusPurchase", json=purchase)
    assert refused.status_code == 404
    await client.upsert(
        linked[0].target, "P-1", {"profile": {"PKey": profile}}, key_field="purchaseId"
    )
    listed = await emulated_campaign.get("profileAndServicesExt/cusPurchase")
    assert [p["purchaseId"] for p in listed.json()["content"]] == ["P-1"]
    assert (await emulated_campaign.get("customResources/cusPurchase")).status_code == 404


async def test_a_wrong_org_is_fatal_with_the_vendors_message(emulators: Any) -> None:
    """AdobeDocs/campaign-standard.en, help/api/using/troubleshooting.md: "When doing a request to
    Adobe.io you get {"code":500, "message":"Oops. Something went wrong. Check your URI and try
    again."}" — "the URI you are requesting is not valid ... check that the one you choose is the
    one you put in your URL" (the organization id)."""
    async with CampaignClient(target(emulators, org="not-our-org"), retry=FAST) as wrong:
        with pytest.raises(Fatal, match="Check your URI"):
            await wrong.upsert(PROFILE, "c-1", {"lastName": "X"})


async def test_a_duplicate_key_means_look_the_record_up_again_and_patch_it(
    emulators: Any, client: CampaignClient
) -> None:
    """AdobeDocs/campaign-standard.en, help/api/using/troubleshooting.md (its source notes: "error
    duplicate key : quand tu crées un profile qui existe déjà, il faut faire un patch pour updater
    le profile plutôt qu'un POST") and help/api/using/updating-profiles.md (``PATCH
    .../profileAndServices/profile/<PKEY>``). The duplicate-key 500 carries no RST code. Here a
    concurrent writer creates the record between the client's lookup and its POST."""
    other = CampaignClient(target(emulators), retry=FAST)
    profile = await client.upsert(PROFILE, "c-2", {"lastName": "K"})
    raced = False

    class ConcurrentWriter:
        """The client's own transport, with another writer's create slipped in before its POST."""

        def __init__(self) -> None:
            self.inner = AiohttpTransport(
                timeout_s=10,
                max_connections=4,
                headers={"Accept": "application/json", "X-Api-Key": emulators.client_id},
            )

        async def send(
            self,
            method: str,
            url: str,
            headers: Mapping[str, str],
            content: bytes | None,
            what: str,
        ) -> Response:
            nonlocal raced
            if method == "POST" and urlsplit(url).path.endswith("/cusPurchase") and not raced:
                raced = True
                await other.upsert(
                    "profileAndServicesExt/cusPurchase",
                    "P-9",
                    {"product": "theirs", "profile": {"PKey": profile}},
                    key_field="purchaseId",
                )
            return await self.inner.send(method, url, headers, content, what)

        async def aclose(self) -> None:
            await self.inner.aclose()

    try:
        async with CampaignClient(
            target(emulators), retry=FAST, transport=ConcurrentWriter()
        ) as ours:
            await ours.upsert(
                "profileAndServicesExt/cusPurchase",
                "P-9",
                {"product": "ours", "profile": {"PKey": profile}},
                key_field="purchaseId",
            )
        rows = [r async for r in client.list("profileAndServicesExt/cusPurchase")]
    finally:
        await other.aclose()
    assert raced
    assert [(r["purchaseId"], r["product"]) for r in rows] == [("P-9", "ours")]


async def test_a_500_that_persists_is_dead_lettered_with_the_servers_text(
    emulators: Any, client: CampaignClient
) -> None:
    """AdobeDocs/campaign-standard.en, help/api/using/triggering-a-signal-activity.md shows the
    generic ``RST-360011 An error has occurred - please contact your administrator.`` answer: the
    code says nothing about the record. A 500 that clears is retried; one that persists past the
    bounded attempts is dead-lettered (RecordRejected) with the server's text."""
    sink = CampaignSink(client)
    await faults(emulators, {"fail_next": [{"status": 500}]})
    cleared = await sink.write_batch([SinkRecord(PROFILE, "c-3", fields={"lastName": "A"})])
    assert cleared == [None]
    await faults(emulators, {"fail_next": [{"status": 500}] * (FAST.attempts + 1)})
    (persisted,) = await sink.write_batch([SinkRecord(PROFILE, "c-4", fields={"lastName": "B"})])
    assert isinstance(persisted, RecordRejected)
    assert "RST-360011" in persisted.reason and "tries" in persisted.reason


async def test_lists_of_large_tables_page_only_when_forced_and_carry_a_count(
    tmp_path: Path,
) -> None:
    """AdobeDocs/campaign-standard.en, help/api/using/pagination.md: "By default, the **next**
    node is not available when interacting with tables with large amount of data. To be able to
    perform pagination, you must add the **_forcePagination=true** parameter" (large: above
    **XtkBigTableThreshold**, 100,000 records by default); help/api/using/counting.md: a list
    carries ``"count": {"href": ".../_count?..."}`` and ``"serverSidePagination": true``, and
    ``GET`` on that href answers ``{"count": 26}``."""
    async with running_emulators(
        tmp_path, dynamics_port=0, campaign_port=0, campaign_big_table_threshold=3
    ) as emulators:
        async with CampaignClient(target(emulators), retry=FAST) as campaign:
            for n in range(5):
                await campaign.upsert(PROFILE, f"c-{n}", {"lastName": f"L{n}"})
            raw = await campaign._session.request(  # the documented request, as is
                "GET", campaign.url(PROFILE) + "?_lineCount=2", what="list"
            )
            page = raw.json()
            assert "next" not in page and page["serverSidePagination"] is True
            counted = await campaign._session.request("GET", page["count"]["href"], what="count")
            assert counted.json() == {"count": 5}
            listed = [p async for p in campaign.list(PROFILE, page_size=2)]
            assert sorted(p["externalId"] for p in listed) == [f"c-{n}" for n in range(5)]
            assert await campaign.count(PROFILE) == 5


async def test_profile_bodies_carry_black_list_fields_only(
    emulated_campaign: httpx.AsyncClient,
) -> None:
    """AdobeDocs/campaign-standard.en, help/api/using/interacting-with-marketing-history.md: a
    profile body reads ``"blackList": false, "blackListEmail": false, "blackListFax": false,
    ...`` — no ``denyList*`` names (those are the UI's newer wording, not API fields)."""
    created = await emulated_campaign.post(
        "profileAndServices/profile", json={"email": "a@x.org", "blackListEmail": True}
    )
    assert created.status_code == 201
    body = created.json()
    assert body["blackListEmail"] is True
    assert not [k for k in body if k.startswith("denyList")]
    alias = await emulated_campaign.post(
        "profileAndServices/profile", json={"email": "b@x.org", "denyListEmail": True}
    )
    assert alias.status_code == 500 and "denyListEmail" in alias.text


async def test_the_metadata_mechanism_describes_each_resources_fields(
    emulated_campaign: httpx.AsyncClient,
) -> None:
    """AdobeDocs/campaign-standard.en, help/api/using/metadata-mechanism.md: "You can retrieve
    the resources metadata using resourceType in a GET request: ``GET /profileAndServices/
    resourceType/<resourceName>``"; "The Content node returns the resource's fields", each with
    ``"apiName"``, ``"type"``, ``"category"``, ``"resType"`` (and ``resTarget`` for a link); the
    sample answer carries ``"data": "/profileAndServices/profile/"``, ``"name": "profile"``,
    ``"type": "item"``. The profile's extension fields (custom-resources.md: extended fields are
    exposed through ``profileAndServicesExt``) appear only under that root."""
    plain = await emulated_campaign.get("profileAndServices/resourceType/profile")
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert (body["name"], body["type"], body["data"]) == (
        "profile",
        "item",
        "/profileAndServices/profile/",
    )
    email = body["content"]["email"]
    assert email["apiName"] == "email" and email["type"] == "string" and "resType" in email
    assert "cusCrmId" not in body["content"]
    extended = (await emulated_campaign.get("profileAndServicesExt/resourceType/profile")).json()
    assert extended["content"]["cusCrmId"]["apiName"] == "cusCrmId"
    purchase = await emulated_campaign.get("profileAndServicesExt/resourceType/cusPurchase")
    link = purchase.json()["content"]["profile"]
    assert (link["type"], link["resTarget"]) == ("link", "profile")
    # Served where the resource is: a profile-linked resource is not under customResources.
    assert (
        await emulated_campaign.get("customResources/resourceType/cusPurchase")
    ).status_code == 404
    assert (
        await emulated_campaign.get("profileAndServicesExt/resourceType/cusNothing")
    ).status_code == 404
    assert (
        await emulated_campaign.post("profileAndServicesExt/resourceType/profile", json={})
    ).status_code == 405
