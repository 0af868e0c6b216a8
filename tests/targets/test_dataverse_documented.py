"""Dataverse behaviours as Microsoft documents them, checked on the emulator and the client.

Each test quotes the documented request/response shape it is written from (MicrosoftDocs
repositories on GitHub, the sources of learn.microsoft.com).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from crmsync.streams.catalog import default_config, parse_config
from crmsync.streams.config import CampaignToD365Config
from crmsync.streams.mapping import email_event_writes
from crmsync.streams.sinks.base import SinkRecord
from crmsync.streams.sinks.dynamics import MIN_CHUNK_RECORDS, DynamicsSink
from crmsync.streams.source import TrackedEntity, events_of
from crmsync.targets._http import RetryPolicy
from crmsync.targets._multipart import BatchRequest, ChangeSet
from crmsync.targets.dynamics import DynamicsClient, NotModified, default_authority
from crmsync.targets.errors import Fatal, RecordRejected
from crmsync.targets.settings import DynamicsTarget

pytestmark = pytest.mark.timeout(60)
FAST = RetryPolicy(attempts=2, budget_s=2, backoff_base_s=0.05, backoff_cap_s=0.1)


def guid(n: int) -> str:
    return str(uuid.UUID(int=n))


def target(emulators: Any, **overrides: Any) -> DynamicsTarget:
    settings: dict[str, Any] = {
        "url": emulators.dynamics_url,
        "tenant": emulators.tenant,
        "client_id": emulators.client_id,
        "client_secret": emulators.client_secret,
    }
    return DynamicsTarget(**{**settings, **overrides})


@pytest.fixture
async def client(emulators: Any) -> AsyncIterator[DynamicsClient]:
    async with DynamicsClient(target(emulators), retry=FAST) as dynamics:
        yield dynamics


def email_event(kind: str, event_id: str, contact: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "type": kind,
        "ts_ms": 1_714_564_800_000,
        "contact_id": contact,
        "email": "ada@x.org",
        "campaign_id": "CMP1",
        "campaign_name": "Spring",
        "delivery_id": "DLV1",
        "delivery_name": "Wave 1",
        "mirror_page_url": "https://m.x.org/1",
        "url": None,
        "bounce_type": None,
        "bounce_reason": None,
    }


async def test_an_activity_links_its_contact_through_the_per_table_regarding_property(
    emulated_dynamics: httpx.AsyncClient, client: DynamicsClient
) -> None:
    """MicrosoftDocs/dynamics-365-customer-engagement, progref/webapireference/entitytypes/task.md
    (task EntityType, "Single-valued navigation properties"): ``regardingobjectid_contact_task |
    contact EntityType | Contact_Tasks`` — the regarding lookup's navigation property is named
    per activity table, and MicrosoftDocs/powerapps-docs, .../webapi/execute-batch-operations-
    using-web-api.md creates a task with ``"regardingobjectid_account_task@odata.bind":
    "accounts(00000000-0000-0000-0000-000000000001)"``. There is no ``regardingobjectid_contact``.
    """
    contact = guid(41)
    await client.upsert("contacts", contact, {"lastname": "Lovelace"})
    wrong = {"subject": "s", "regardingobjectid_contact@odata.bind": f"/contacts({contact})"}
    refused = await emulated_dynamics.post("crmsync_emailsends", json=wrong)
    assert refused.status_code == 400
    assert "regardingobjectid_contact" in refused.json()["error"]["message"]

    config = default_config("campaign-to-d365")
    assert isinstance(config, CampaignToD365Config)
    sink = DynamicsSink(client)
    for kind, table in (("send", "crmsync_emailsend"), ("open", "crmsync_emailopen")):
        (write,) = email_event_writes(email_event(kind, f"{kind}-1", contact), config)
        assert f"regardingobjectid_contact_{table}@odata.bind" in write.record.fields
        assert await sink.write_batch([write.record]) == [None]
    rows = [r async for r in client.query("crmsync_emailopens")]
    assert [r["_regardingobjectid_value"] for r in rows] == [contact]

    # Configurable per event type, for tables named otherwise.
    custom = parse_config(
        "campaign-to-d365",
        {"events": {"send": {"entity_set": "new_mails", "logical_name": "new_mail"}}},
    )
    assert isinstance(custom, CampaignToD365Config)
    (write,) = email_event_writes(email_event("send", "send-2", contact), custom)
    assert "regardingobjectid_contact_new_mail@odata.bind" in write.record.fields


async def test_a_batch_without_continue_on_error_answers_400_and_no_change_set_is_split(
    emulated_dynamics: httpx.AsyncClient, client: DynamicsClient
) -> None:
    """MicrosoftDocs/powerapps-docs, powerapps-docs/developer/data-platform/webapi/
    execute-batch-operations-using-web-api.md: "Without setting the `Prefer:
    odata.continue-on-error` request header, the batch fails on the first request in the batch.
    The batch error represents the error of the first failing request." Response:
    ``HTTP/1.1 400 BadRequest`` / ``--batchresponse_...`` / ``HTTP/1.1 400 Bad Request`` /
    ``{"error":{"code":"0x80044331","message":"A validation error occurred. ..."}}``.
    A change set is atomic: after such an answer nothing of it may be re-sent piecemeal.
    """
    boundary = "batch_431faf5a"
    parts = [
        '{"firstname": "' + "x" * 51 + '"}',
        '{"firstname": "Task 2 in batch"}',
    ]
    body = (
        "".join(
            f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary"
            f"\r\n\r\nPOST contacts HTTP/1.1\r\nContent-Type: application/json; type=entry"
            f"\r\n\r\n{part}\r\n"
            for part in parts
        )
        + f"--{boundary}--\r\n"
    )
    stopped = await emulated_dynamics.post(
        "$batch",
        content=body.encode(),
        headers={"Content-Type": f'multipart/mixed; boundary="{boundary}"'},
    )
    assert stopped.status_code == 400
    assert stopped.headers["content-type"].startswith("multipart/mixed")
    assert "0x80044331" in stopped.text and "HTTP/1.1 204" not in stopped.text

    too_long = {"firstname": "x" * 51}
    contacts = client.url("contacts")
    answers = await client.batch(
        [
            BatchRequest("PATCH", contacts + f"({guid(1)})", {}, {"lastname": "One"}),
            ChangeSet(
                [
                    BatchRequest("PATCH", contacts + f"({guid(2)})", {}, {"lastname": "Two"}),
                    BatchRequest("PATCH", contacts + f"({guid(3)})", {}, too_long),
                ]
            ),
            BatchRequest("PATCH", contacts + f"({guid(4)})", {}, {"lastname": "Four"}),
        ],
        continue_on_error=False,
    )
    assert answers[0].status == 204
    assert 400 in [a.status for a in answers[1:3]]
    assert answers[3].status == 424  # never run: the batch stopped
    # The change set rolled back as a whole and was not split into single writes afterwards.
    assert await client.get("contacts", guid(2)) is None
    assert await client.get("contacts", guid(4)) is None
    assert (await client.get("contacts", guid(1)) or {}).get("lastname") == "One"


async def test_alternate_key_values_urls_cannot_carry_are_written_by_id_instead(
    emulated_dynamics: httpx.AsyncClient, client: DynamicsClient
) -> None:
    """MicrosoftDocs/powerapps-docs, powerapps-docs/developer/data-platform/
    define-alternate-keys-entity.md: "If the data within a column used in an alternate key
    contains one of the following characters `/`,`<`,`>`,`*`,`%`,`&`,`:`,`\\\\`,`?`,`+`, then
    retrieve (`GET`), update, or upsert (`PATCH`) actions don't work." The documented way around:
    query the record (``$filter``), then write it by its primary key or create it with ``POST``.
    """
    refused = await emulated_dynamics.patch(
        "crmsync_emailsends(crmsync_eventid='a%2Fb')", json={"subject": "s"}
    )
    assert refused.status_code == 400  # the emulator refuses what the real service cannot do

    contact = guid(42)
    await client.upsert("contacts", contact, {"lastname": "K"})
    bind = {"regardingobjectid_contact_crmsync_emailsend@odata.bind": f"/contacts({contact})"}
    odd = ["a/b", "50% off", "x<y>z", "p&q", "k:v", "back\\slash", "why?", "1+1", "a*"]
    sink = DynamicsSink(client)
    records = [
        SinkRecord(
            "crmsync_emailsends",
            key,
            fields={"subject": f"first {key}", **bind},
            key_field="crmsync_eventid",
        )
        for key in odd
    ]
    assert await sink.write_batch(records) == [None] * len(odd)
    again = [
        SinkRecord(
            "crmsync_emailsends",
            r.key,
            fields={"subject": f"second {r.key}"},
            key_field="crmsync_eventid",
        )
        for r in records
    ]
    assert await sink.write_batch(again) == [None] * len(odd)
    rows = {r["crmsync_eventid"]: r async for r in client.query("crmsync_emailsends")}
    assert sorted(rows) == sorted(odd)  # one row per key: updated, not duplicated
    assert {k: r["subject"] for k, r in rows.items()} == {k: f"second {k}" for k in odd}
    got = await client.get("crmsync_emailsends", {"crmsync_eventid": "a/b"})
    assert got is not None and got["subject"] == "second a/b"
    await client.delete("crmsync_emailsends", {"crmsync_eventid": "a/b"})
    assert await client.get("crmsync_emailsends", {"crmsync_eventid": "a/b"}) is None


async def test_the_emulator_decodes_a_path_once(emulated_dynamics: httpx.AsyncClient) -> None:
    """RFC 3986 §2.4 and the Web API: a URL is percent-decoded once, so ``%2541`` in a key is the
    three characters ``%41`` (which Dataverse refuses in a key value, see the test above),
    never ``A``."""
    response = await emulated_dynamics.patch(
        "crmsync_emailsends(crmsync_eventid='ev%2541')", json={"subject": "s"}
    )
    assert response.status_code == 400
    rows = (await emulated_dynamics.get("crmsync_emailsends")).json()["value"]
    assert [r["crmsync_eventid"] for r in rows] == []


async def test_top_is_ignored_when_a_page_size_is_asked(
    emulated_dynamics: httpx.AsyncClient, client: DynamicsClient
) -> None:
    """MicrosoftDocs/powerapps-docs, powerapps-docs/developer/data-platform/webapi/query/
    page-results.md: "Don't use `$top` with the `Prefer: odata.maxpagesize` request header. If
    you include both, `$top` is ignored." So the client stops at top itself."""
    for n in range(5):
        await client.upsert("contacts", guid(100 + n), {"lastname": f"L{n}"})
    page = await emulated_dynamics.get(
        "contacts", params={"$top": "3"}, headers={"Prefer": "odata.maxpagesize=2"}
    )
    assert len(page.json()["value"]) == 2 and "@odata.nextLink" in page.json()
    got = [r async for r in client.query("contacts", top=3, page_size=2)]
    assert len(got) == 3


async def test_conditional_delete_and_read_follow_the_etag(
    emulated_dynamics: httpx.AsyncClient, client: DynamicsClient
) -> None:
    """MicrosoftDocs/powerapps-docs, powerapps-docs/developer/data-platform/webapi/
    perform-conditional-operations-using-web-api.md, "Conditional retrievals": ``GET
    .../accounts(00000000-...-000000000001)?$select=...`` with ``If-None-Match: W/"468026"`` →
    ``HTTP/1.1 304 Not Modified``; "Apply optimistic concurrency on delete": ``DELETE
    .../accounts(...)`` with ``If-Match: W/"470867"`` → ``HTTP/1.1 412 Precondition Failed``,
    ``"The version of the existing record doesn't match the RowVersion property provided."``"""
    await client.upsert("contacts", guid(7), {"lastname": "Old"})
    first = await client.get("contacts", guid(7))
    assert first is not None
    etag = first["@odata.etag"]
    unchanged = await emulated_dynamics.get(f"contacts({guid(7)})", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    assert isinstance(await client.get("contacts", guid(7), etag=etag), NotModified)

    await client.upsert("contacts", guid(7), {"lastname": "New"})
    changed = await client.get("contacts", guid(7), etag=etag)
    assert changed is not None and changed["lastname"] == "New"
    stale = await emulated_dynamics.delete(f"contacts({guid(7)})", headers={"If-Match": etag})
    assert stale.status_code == 412
    with pytest.raises(RecordRejected, match="412"):
        await client.delete("contacts", guid(7), etag=etag)
    await client.delete("contacts", guid(7), etag=changed["@odata.etag"])
    assert await client.get("contacts", guid(7)) is None


async def test_an_alternate_key_upsert_answers_its_url_in_key_form(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    """MicrosoftDocs/powerapps-docs, powerapps-docs/developer/data-platform/
    use-upsert-insert-update-record.md, "Create with upsert": ``PATCH .../example_records(
    example_key1=2,example_key2=2)`` → ``HTTP/1.1 204 No Content`` with ``OData-EntityId:
    .../example_records(example_key1=2,example_key2=2)`` — the URL in key form."""
    response = await emulated_dynamics.patch(
        "crmsync_emailsends(crmsync_eventid='Record For Create')", json={"subject": "s"}
    )
    assert response.status_code == 204
    assert response.headers["OData-EntityId"].endswith(
        "/crmsync_emailsends(crmsync_eventid='Record%20For%20Create')"
    )


async def test_a_delta_page_lists_changes_before_deletions(client: DynamicsClient) -> None:
    """MicrosoftDocs/powerapps-docs, powerapps-docs/developer/data-platform/webapi/
    use-change-tracking-synchronize-data-external-systems.md: "Usually, the caller will get all
    new or updated records first (sorted by version number) followed by deleted records"; the
    Web API example's delta page lists the new account, then ``{"@odata.context":
    "...$metadata#accounts/$deletedEntity", "id": "...", "reason": "deleted"}``."""
    await client.upsert("contacts", guid(1), {"lastname": "A"})
    await client.upsert("contacts", guid(2), {"lastname": "B"})
    initial = await client.read_changes("contacts")
    while initial.next_link:
        initial = await client.read_changes(link=initial.next_link)
    assert initial.delta_link is not None
    await client.delete("contacts", guid(1))
    await client.upsert("contacts", guid(3), {"lastname": "C"})
    page = await client.read_changes(link=initial.delta_link)
    kinds = ["deleted" if r.get("reason") == "deleted" else "row" for r in page.value]
    assert kinds == ["row", "deleted"]
    assert page.value[0]["contactid"] == guid(3) and page.value[1]["id"] == guid(1)


def test_a_sovereign_cloud_org_needs_its_authority_named() -> None:
    """MicrosoftDocs/power-platform, power-platform/admin/microsoft-dynamics-365-government.md
    and internet-url-us-government.md: US Government orgs run in separate environments (GCC on
    ``*.crm9.dynamics.com`` signs in through ``*.microsoftonline.com``; GCC High and DoD, and
    China's 21Vianet cloud, use their own domains and Entra authorities). So only
    ``*.dynamics.com`` maps to ``https://login.microsoftonline.com/<tenant>``; any other host must
    name its authority."""
    commercial = DynamicsTarget(url="https://contoso.crm.dynamics.com", tenant="t1")
    assert default_authority(commercial) == "https://login.microsoftonline.com/t1"
    for url in ("https://contoso.crm.microsoftdynamics.us", "https://contoso.crm.dynamics.cn"):
        with pytest.raises(Fatal, match="authority"):
            default_authority(DynamicsTarget(url=url))
        named = DynamicsTarget(url=url, authority="https://login.microsoftonline.us/t1")
        assert default_authority(named) == "https://login.microsoftonline.us/t1"


async def test_activity_tables_are_keyed_by_activityid(client: DynamicsClient) -> None:
    """MicrosoftDocs/dynamics-365-customer-engagement, progref/webapireference/entitytypes/task.md:
    ``Base Type: activitypointer EntityType`` / ``Primary Key: activityid`` — activity tables do
    not name their key ``<logical name>id``. The change-tracking source reads it from
    EntityDefinitions' ``PrimaryIdAttribute``, so activity rows are published with their ids."""
    assert await client.primary_id("crmsync_emailsends") == "activityid"
    assert await client.primary_id("contacts") == "contactid"
    await client.upsert("contacts", guid(5), {"lastname": "L"})
    bind = {"regardingobjectid_contact_crmsync_emailsend@odata.bind": f"/contacts({guid(5)})"}
    await client.upsert("crmsync_emailsends", {"crmsync_eventid": "e-1"}, {"subject": "s", **bind})
    page = await client.read_changes("crmsync_emailsends")
    entity = TrackedEntity(
        "crmsync_emailsend",
        "d365.entity.crmsync_emailsend.changes",
        "crmsync_emailsends",
        primary_key=await client.primary_id("crmsync_emailsends"),
    )
    keys = [key for key, event in events_of(entity, page.value, initial=True) if event]
    assert keys == [page.value[0]["activityid"]]


async def test_upserts_go_through_upsert_multiple_and_fall_back_to_batch(
    emulators: Any, emulated_dynamics: httpx.AsyncClient, client: DynamicsClient
) -> None:
    """MicrosoftDocs/powerapps-docs, powerapps-docs/developer/data-platform/bulk-operations.md
    ("Use bulk operation messages": CreateMultiple, UpdateMultiple, UpsertMultiple give the best
    throughput) and microsoft/PowerApps-Samples, BulkOperations/UpsertMultiple: ``POST
    /<EntitySetName>/Microsoft.Dynamics.CRM.UpsertMultiple`` with ``{"Targets": [{"@odata.type":
    "Microsoft.Dynamics.CRM.<logical name>", "<key>": ..., ...}]}``, all records or none."""

    async def requests() -> int:
        async with httpx.AsyncClient(base_url=emulators.dynamics_url) as http:
            return int((await http.get("/_admin/stats")).json()["requests"])

    sink = DynamicsSink(client)
    await client.primary_id("contacts")  # metadata read once, up front
    before = await requests()
    records = [
        SinkRecord("contacts", guid(1000 + n), fields={"lastname": f"L{n}"}) for n in range(250)
    ]
    assert await sink.write_batch(records) == [None] * 250
    # One UpsertMultiple call per chunk, not 250 PATCHes: the batch is split over the client's
    # concurrency, which follows the server's x-ms-dop-hint — "use the integer value returned
    # from the x-ms-dop-hint response header. This value provides a recommended degree of
    # parallelism" (https://learn.microsoft.com/en-us/power-apps/developer/data-platform/
    # send-parallel-requests, "Optimum degree of parallelism (DOP)").
    chunks = min(client.concurrency, 250 // MIN_CHUNK_RECORDS)
    assert 1 < chunks and await requests() - before == chunks
    rows = [r async for r in client.query("contacts", select=["lastname"])]
    assert len(rows) == 250

    raw = await emulated_dynamics.post(
        "crmsync_emailsends/Microsoft.Dynamics.CRM.UpsertMultiple",
        json={
            "Targets": [
                {
                    "@odata.type": "Microsoft.Dynamics.CRM.crmsync_emailsend",
                    "crmsync_eventid": "k/1",
                    "subject": "by key in the body",
                }
            ]
        },
    )
    assert raw.status_code == 200 and len(raw.json()["Ids"]) == 1
    unknown = await emulated_dynamics.post("contacts/Microsoft.Dynamics.CRM.NoSuchAction", json={})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] != "0x8006088a"

    mixed = [
        SinkRecord("contacts", guid(2000), fields={"lastname": "ok"}),
        SinkRecord("contacts", guid(2001), fields={"lastname": "x" * 51}),
        SinkRecord("contacts", guid(2002), fields={"lastname": "ok too"}),
    ]
    outcomes = await sink.write_batch(mixed)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], RecordRejected)  # found by the $batch fallback, alone
