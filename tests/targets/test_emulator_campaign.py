"""The Campaign Standard emulator behaves like the real REST API, over real HTTP."""

from __future__ import annotations

import httpx

from crmsync.deploy.emulators.server import Emulators

PROFILE = {"email": "ada@example.com", "firstName": "Ada", "lastName": "Lovelace"}


async def test_ims_token_flow(emulators: Emulators) -> None:
    form = {
        "client_id": emulators.client_id,
        "client_secret": emulators.client_secret,
        "grant_type": "client_credentials",
        "scope": "openid,AdobeID",
    }
    async with httpx.AsyncClient() as client:
        good = await client.post(emulators.campaign_token_url, data=form)
        bad = await client.post(emulators.campaign_token_url, data={**form, "client_secret": "x"})
    assert good.status_code == 200
    assert good.json()["token_type"] == "bearer" and good.json()["expires_in"] == 86399
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"


async def test_gateway_errors(emulators: Emulators, emulated_campaign: httpx.AsyncClient) -> None:
    url = f"{emulators.campaign_api_url}/profileAndServices/profile"
    token = emulated_campaign.headers["Authorization"]
    async with httpx.AsyncClient() as client:
        no_token = await client.get(url, headers={"X-Api-Key": emulators.client_id})
        no_key = await client.get(url, headers={"Authorization": token})
        wrong_key = await client.get(url, headers={"Authorization": token, "X-Api-Key": "x"})
    assert no_token.status_code == 401
    assert no_token.json() == {"error_code": "401013", "message": "Oauth token is not valid"}
    assert no_key.status_code == 403 and wrong_key.status_code == 403


async def test_profile_lifecycle(emulated_campaign: httpx.AsyncClient) -> None:
    c = emulated_campaign
    created = await c.post("profileAndServices/profile", json={**PROFILE, "blackListEmail": True})
    assert created.status_code == 201
    profile = created.json()
    pkey = profile["PKey"]
    assert profile["href"].endswith(f"/profileAndServices/profile/{pkey}")
    assert profile["blackListEmail"] is True and profile["created"] and profile["lastModified"]
    assert "denyListEmail" not in profile  # real profile bodies carry blackList* only
    patched = await c.patch(f"profileAndServices/profile/{pkey}", json={"blackListEmail": False})
    assert patched.status_code == 200
    assert set(patched.json()) == {"PKey", "href"}
    ext = await c.patch(f"profileAndServicesExt/profile/{pkey}", json={"cusCrmId": "crm-1"})
    assert ext.status_code == 200
    got = (await c.get(f"profileAndServicesExt/profile/{pkey}")).json()
    assert (got["cusCrmId"], got["blackListEmail"], got["firstName"]) == ("crm-1", False, "Ada")
    standard = (await c.get(f"profileAndServices/profile/{pkey}")).json()
    assert "cusCrmId" not in standard
    by_email = (
        await c.get("profileAndServices/profile/byEmail", params={"email": "ADA@example.com"})
    ).json()
    assert [p["PKey"] for p in by_email["content"]] == [pkey]
    assert (await c.delete(f"profileAndServices/profile/{pkey}")).status_code == 200
    assert (await c.get(f"profileAndServices/profile/{pkey}")).status_code == 404


async def test_external_id_filter_and_paging(emulated_campaign: httpx.AsyncClient) -> None:
    c = emulated_campaign
    for i in range(12):
        await c.post(
            "profileAndServices/profile", json={"email": f"p{i}@x.org", "externalId": f"e{i}"}
        )
    found = await c.get(
        "profileAndServices/profile/byExternalId", params={"externalId_parameter": "e7"}
    )
    assert [p["email"] for p in found.json()["content"]] == ["p7@x.org"]
    first = (await c.get("profileAndServices/profile")).json()
    assert len(first["content"]) == 12 and "next" not in first
    emails, url = [], "profileAndServices/profile?_lineCount=5"
    while url:
        page = (await c.get(url)).json()
        emails += [p["email"] for p in page["content"]]
        url = page.get("next", {}).get("href", "")
        assert not url or "_lineStart=@" in url
    assert emails == [f"p{i}@x.org" for i in range(12)]


async def test_validation_errors_are_500_with_rst_codes(
    emulated_campaign: httpx.AsyncClient,
) -> None:
    c = emulated_campaign
    for body in (
        {"nosuch": 1},
        {"firstName": "x" * 31},
        {"blackList": "yes"},
        {"lastModified": "2024-01-01 00:00:00.000Z"},
        {"cusCrmId": "only-in-ext"},
    ):
        response = await c.post("profileAndServices/profile", json=body)
        assert response.status_code == 500, body
        assert "RST-360011" in response.json()["message"], body
    garbage = await c.post(
        "profileAndServices/profile", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert garbage.status_code == 400
    assert (await c.get("customResources/cusNothing")).status_code == 404
    assert (await c.get("profileAndServices/profile/@nope")).status_code == 404
    assert (await c.get("profileAndServices/profile?_lineCount=abc")).status_code == 400


async def test_custom_resource_with_key_filter_and_link(
    emulated_campaign: httpx.AsyncClient,
) -> None:
    c = emulated_campaign
    profile = (await c.post("profileAndServices/profile", json=PROFILE)).json()
    purchase = {
        "purchaseId": "P-1",
        "product": "tea",
        "amount": 4.5,
        "purchasedOn": "2024-05-01T10:00:00Z",
        "profile": {"PKey": profile["PKey"]},
    }
    created = await c.post("profileAndServicesExt/cusPurchase", json=purchase)
    assert created.status_code == 201, created.text
    assert created.json()["profile"]["PKey"] == profile["PKey"]
    assert created.json()["purchasedOn"] == "2024-05-01 10:00:00.000Z"
    duplicate = await c.post("profileAndServicesExt/cusPurchase", json=purchase)
    assert duplicate.status_code == 500
    found = await c.get(
        "profileAndServicesExt/cusPurchase/byPurchaseId", params={"purchaseId_parameter": "p-1"}
    )
    assert [p["amount"] for p in found.json()["content"]] == [4.5]
    dangling = await c.post(
        "profileAndServicesExt/cusPurchase",
        json={"purchaseId": "P-2", "profile": {"PKey": "@missing"}},
    )
    assert dangling.status_code == 500
