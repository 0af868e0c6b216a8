"""The Dynamics 365 Web API emulator behaves like the real service, over real HTTP."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import msal
import requests

from crmsync.deploy.emulators.server import Emulators

CONTACT = {"firstname": "Ada", "lastname": "Lovelace", "emailaddress1": "ada@example.com"}


def _id_from(response: httpx.Response) -> str:
    return response.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")


async def _create(client: httpx.AsyncClient, entity_set: str, body: dict[str, Any]) -> str:
    response = await client.post(entity_set, json=body)
    assert response.status_code == 204, response.text
    return _id_from(response)


class _LoopbackSession(requests.Session):
    """MSAL insists on https; the emulator speaks http on loopback."""

    def __init__(self, http_base: str) -> None:
        super().__init__()
        self.http_base = http_base
        self.https_base = "https://" + http_base.removeprefix("http://")

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if url.startswith(self.https_base):
            url = self.http_base + url[len(self.https_base) :]
        return super().request(method, url, *args, **kwargs)


async def test_msal_obtains_a_token_that_the_web_api_accepts(emulators: Emulators) -> None:
    def acquire() -> dict[str, Any]:
        with _LoopbackSession(emulators.dynamics_url) as session:
            app = msal.ConfidentialClientApplication(
                emulators.client_id,
                client_credential=emulators.client_secret,
                authority=f"https://{emulators.dynamics_url.removeprefix('http://')}/"
                f"{emulators.tenant}",
                validate_authority=False,
                http_client=session,
            )
            result: dict[str, Any] = app.acquire_token_for_client(
                scopes=[f"{emulators.dynamics_url}/.default"]
            )
            return result

    result = await asyncio.to_thread(acquire)
    assert result.get("token_type") == "Bearer", result
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{emulators.dynamics_api_url}/WhoAmI",
            headers={"Authorization": f"Bearer {result['access_token']}"},
        )
    assert response.status_code == 200
    assert "UserId" in response.json()


async def test_token_endpoint_rejects_bad_credentials_like_entra(emulators: Emulators) -> None:
    form = {
        "client_id": emulators.client_id,
        "client_secret": "wrong",
        "grant_type": "client_credentials",
        "scope": f"{emulators.dynamics_url}/.default",
    }
    async with httpx.AsyncClient() as client:
        wrong_secret = await client.post(emulators.dynamics_token_url, data=form)
        unknown_client = await client.post(
            emulators.dynamics_token_url, data={**form, "client_id": "nobody"}
        )
        no_default = await client.post(
            emulators.dynamics_token_url,
            data={**form, "client_secret": emulators.client_secret, "scope": "contacts"},
        )
    assert wrong_secret.status_code == 401
    assert wrong_secret.json()["error"] == "invalid_client"
    assert wrong_secret.json()["error_description"].startswith("AADSTS7000215")
    assert unknown_client.status_code == 400
    assert no_default.status_code == 400


async def test_web_api_needs_a_valid_bearer_token(emulators: Emulators) -> None:
    async with httpx.AsyncClient(base_url=emulators.dynamics_api_url + "/") as client:
        missing = await client.get("contacts")
        forged = await client.get("contacts", headers={"Authorization": "Bearer a.b.c"})
    for response in (missing, forged):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
        assert "code" in response.json()["error"]


async def test_expired_token_is_refused(tmp_path: Any) -> None:
    from crmsync.deploy.emulators.server import running_emulators

    async with (
        running_emulators(
            tmp_path, dynamics_port=0, campaign_port=0, dynamics_token_lifetime_s=0.3
        ) as emu,
        httpx.AsyncClient() as client,
    ):
        token = (
            await client.post(
                emu.dynamics_token_url,
                data={
                    "client_id": emu.client_id,
                    "client_secret": emu.client_secret,
                    "grant_type": "client_credentials",
                    "scope": f"{emu.dynamics_url}/.default",
                },
            )
        ).json()
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        assert (await client.get(f"{emu.dynamics_api_url}/contacts", headers=headers)).is_success
        await asyncio.sleep(0.4)
        expired = await client.get(f"{emu.dynamics_api_url}/contacts", headers=headers)
    assert expired.status_code == 401


async def test_create_read_update_delete(emulated_dynamics: httpx.AsyncClient) -> None:
    c = emulated_dynamics
    created = await c.post("contacts", json=CONTACT, headers={"Prefer": "return=representation"})
    assert created.status_code == 201
    row = created.json()
    assert row["fullname"] == "Ada Lovelace" and row["@odata.etag"] and row["modifiedon"]
    contact_id = row["contactid"]
    assert (
        await c.patch(f"contacts({contact_id})", json={"firstname": "Augusta"})
    ).status_code == 204
    got = (await c.get(f"contacts({contact_id})?$select=firstname,lastname")).json()
    assert (got["firstname"], got["lastname"]) == ("Augusta", "Lovelace")
    assert got["@odata.etag"] != row["@odata.etag"]
    assert (await c.delete(f"contacts({contact_id})")).status_code == 204
    assert (await c.delete(f"contacts({contact_id})")).status_code == 404
    missing = await c.get(f"contacts({contact_id})")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "0x80040217"


async def test_upsert_and_conditional_headers(emulated_dynamics: httpx.AsyncClient) -> None:
    c = emulated_dynamics
    new_id = str(uuid.uuid4())
    only_update = await c.patch(f"contacts({new_id})", json=CONTACT, headers={"If-Match": "*"})
    assert only_update.status_code == 404
    assert (await c.patch(f"contacts({new_id})", json=CONTACT)).status_code == 204
    assert (await c.patch(f"contacts({new_id})", json={"lastname": "King"})).status_code == 204
    only_create = await c.patch(f"contacts({new_id})", json=CONTACT, headers={"If-None-Match": "*"})
    assert only_create.status_code == 412
    assert (
        await c.patch(f"contacts({new_id})", json={"donotemail": True}, headers={"If-Match": "*"})
    ).status_code == 204
    got = (await c.get(f"contacts({new_id})")).json()
    assert got["lastname"] == "King" and got["donotemail"] is True
    stale = await c.patch(
        f"contacts({new_id})", json={"jobtitle": "x"}, headers={"If-Match": 'W/"1"'}
    )
    assert stale.status_code == 412


async def test_alternate_keys_single_and_multi_part(emulated_dynamics: httpx.AsyncClient) -> None:
    c = emulated_dynamics
    assert (
        await c.patch("crmsync_emailopens(crmsync_eventid='ev-1')", json={"subject": "s"})
    ).status_code == 204
    assert (
        await c.patch("crmsync_emailopens(crmsync_eventid='EV-1')", json={"subject": "t"})
    ).status_code == 204
    rows = (await c.get("crmsync_emailopens")).json()["value"]
    assert [r["subject"] for r in rows] == ["t"]  # keys compare case-insensitively
    key = "new_purchases(new_ordernumber='o-1',new_product='tea')"
    assert (await c.patch(key, json={"new_amount": 3.5})).status_code == 204
    got = (await c.get(key)).json()
    assert (got["new_ordernumber"], got["new_product"], got["new_amount"]) == ("o-1", "tea", 3.5)
    not_a_key = await c.get("contacts(emailaddress1='ada@example.com')")
    assert not_a_key.status_code == 400
    assert "The key in the request URI is not valid" in not_a_key.json()["error"]["message"]
    partial = await c.get("new_purchases(new_ordernumber='o-1')")
    assert partial.status_code == 400


async def test_lookup_binds_need_an_existing_record(emulated_dynamics: httpx.AsyncClient) -> None:
    c = emulated_dynamics
    contact_id = await _create(c, "contacts", CONTACT)
    event = {
        "subject": "sent",
        "regardingobjectid_contact_crmsync_emailsend@odata.bind": f"/contacts({contact_id})",
    }
    event_id = await _create(c, "crmsync_emailsends", event)
    got = (await c.get(f"crmsync_emailsends({event_id})")).json()
    assert got["_regardingobjectid_value"] == contact_id
    dangling = {
        **event,
        "regardingobjectid_contact_crmsync_emailsend@odata.bind": f"/contacts({uuid.uuid4()})",
    }
    assert (await c.post("crmsync_emailsends", json=dangling)).status_code == 404
    wrong_set = {
        **event,
        "regardingobjectid_contact_crmsync_emailsend@odata.bind": f"/accounts({contact_id})",
    }
    assert (await c.post("crmsync_emailsends", json=wrong_set)).status_code == 400


async def test_invalid_writes_are_rejected_in_the_real_shape(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    c = emulated_dynamics
    cases = [
        ({"nosuchfield": 1}, "0x80048d19"),
        ({"firstname": 5}, "0x80048d19"),
        ({"donotemail": "yes"}, "0x80048d19"),
        ({"firstname": "x" * 51}, "0x80044331"),
        ({"modifiedon": "2024-01-01T00:00:00Z"}, "0x80048d19"),
        ({"_modifiedby_value": str(uuid.uuid4())}, "0x80048d19"),
    ]
    for body, code in cases:
        response = await c.post("contacts", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == code, body
    garbage = await c.post(
        "contacts", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert garbage.status_code == 400
    unknown = await c.get("widgets")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "0x8006088a"
    assert (await c.get("contacts")).json()["value"] == []


async def test_filter_select_top_and_paging(emulated_dynamics: httpx.AsyncClient) -> None:
    c = emulated_dynamics
    for i in range(7):
        await _create(
            c,
            "contacts",
            {"firstname": f"P{i}", "lastname": "O'Hara", "donotbulkemail": i % 2 == 0},
        )
    query = "contacts?$select=firstname&$filter=lastname eq 'o''hara' and donotbulkemail eq true"
    rows = (await c.get(query)).json()["value"]
    assert sorted(r["firstname"] for r in rows) == ["P0", "P2", "P4", "P6"]
    assert set(rows[0]) == {"@odata.etag", "firstname", "contactid"}
    top = (await c.get("contacts?$top=2&$orderby=firstname desc")).json()
    assert [r["firstname"] for r in top["value"]] == ["P6", "P5"]
    assert "@odata.nextLink" not in top
    seen, url = [], "contacts?$select=firstname"
    while url:
        page = (await c.get(url, headers={"Prefer": "odata.maxpagesize=3"})).json()
        assert len(page["value"]) <= 3
        seen += [r["firstname"] for r in page["value"]]
        url = page.get("@odata.nextLink", "")
    assert sorted(seen) == [f"P{i}" for i in range(7)]
    for bad in ("firstname eq 5", "nosuch eq 'a'", "firstname eq", "(((", "firstname eq 'a' and"):
        response = await c.get("contacts", params={"$filter": bad})
        assert response.status_code == 400, bad
    assert (await c.get("contacts?$skip=1")).status_code == 400
    assert (await c.get("contacts?$select=nosuch")).status_code == 400


async def test_change_tracking_reports_changes_and_deletions(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    c = emulated_dynamics
    keep = await _create(c, "contacts", CONTACT)
    gone = await _create(c, "contacts", {**CONTACT, "firstname": "Gone"})
    initial = await c.get(
        "contacts?$select=firstname,emailaddress1", headers={"Prefer": "odata.track-changes"}
    )
    assert len(initial.json()["value"]) == 2
    delta_link = initial.json()["@odata.deltaLink"]
    assert "$deltatoken=" in delta_link
    quiet = (await c.get(delta_link)).json()
    assert quiet["value"] == []
    await c.patch(f"contacts({keep})", json={"firstname": "Kept"})
    await c.delete(f"contacts({gone})")
    added = await _create(c, "contacts", {**CONTACT, "firstname": "New"})
    delta = (await c.get(quiet["@odata.deltaLink"])).json()
    changed = {r["contactid"]: r["firstname"] for r in delta["value"] if "contactid" in r}
    deleted = [r for r in delta["value"] if r.get("reason") == "deleted"]
    assert changed == {keep: "Kept", added: "New"}
    assert [d["id"] for d in deleted] == [gone]
    assert deleted[0]["@odata.context"].endswith("$deletedEntity")
    assert (await c.get(delta["@odata.deltaLink"])).json()["value"] == []
    bogus = await c.get("contacts?$select=firstname&$deltatoken=banana")
    assert bogus.status_code == 400


async def test_expired_delta_token_asks_for_a_full_sync(tmp_path: Any) -> None:
    from crmsync.deploy.emulators.server import running_emulators

    async with (
        running_emulators(
            tmp_path, dynamics_port=0, campaign_port=0, dynamics_delta_token_ttl_s=1
        ) as emu,
        httpx.AsyncClient() as client,
    ):
        token = (
            await client.post(
                emu.dynamics_token_url,
                data={
                    "client_id": emu.client_id,
                    "client_secret": emu.client_secret,
                    "grant_type": "client_credentials",
                    "scope": f"{emu.dynamics_url}/.default",
                },
            )
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Prefer": "odata.track-changes"}
        first = await client.get(
            f"{emu.dynamics_api_url}/contacts?$select=firstname", headers=headers
        )
        await asyncio.sleep(2.1)
        expired = await client.get(first.json()["@odata.deltaLink"], headers=headers)
    assert expired.status_code == 400
    assert "full sync" in expired.json()["error"]["message"]
