"""DynamicsClient and DynamicsSink against the Dynamics emulator over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from crmsync.streams.sinks.base import SinkRecord
from crmsync.streams.sinks.dynamics import DynamicsSink
from crmsync.targets._http import RetryPolicy
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.errors import Fatal, RecordRejected, Retryable
from crmsync.targets.settings import DynamicsTarget

pytestmark = pytest.mark.timeout(60)


def target(emulators: Any, **overrides: Any) -> DynamicsTarget:
    settings: dict[str, Any] = {
        "url": emulators.dynamics_url,
        "tenant": emulators.tenant,
        "client_id": emulators.client_id,
        "client_secret": emulators.client_secret,
    }
    return DynamicsTarget(**{**settings, **overrides})


async def admin(emulators: Any, method: str, path: str, body: Any = None) -> Any:
    async with httpx.AsyncClient(base_url=emulators.dynamics_url) as http:
        response = await http.request(method, f"/_admin/{path}", json=body)
        response.raise_for_status()
        return response.json()


def guid(n: int) -> str:
    return str(uuid.UUID(int=n))


async def test_upsert_create_update_and_delete_round_trip(emulators: Any) -> None:
    async with DynamicsClient(target(emulators)) as client:
        key = guid(1)
        await client.upsert("contacts", key, {"firstname": "Ada", "lastname": "Lovelace"})
        await client.upsert("contacts", key, {"emailaddress1": "ada@example.org"})
        created = await client.get("contacts", key, select=["firstname", "emailaddress1"])
        # create-only on an existing record changes nothing and counts as done
        await client.upsert("contacts", key, {"firstname": "Other"}, mode="create")
        await client.upsert("contacts", key, {"lastname": "King"}, mode="update")
        updated = await client.get("contacts", key, select=["firstname", "lastname"])
        with pytest.raises(RecordRejected, match=r"(?i)does not exist"):
            await client.upsert("contacts", guid(2), {"firstname": "X"}, mode="update")
        await client.delete("contacts", key)
        await client.delete("contacts", key)  # already gone: still a success
        gone = await client.get("contacts", key)

    assert created is not None and created["firstname"] == "Ada"
    assert created["emailaddress1"] == "ada@example.org"
    assert updated is not None and (updated["firstname"], updated["lastname"]) == ("Ada", "King")
    assert gone is None


async def test_alternate_keys_bind_to_a_contact_and_queries_filter(emulators: Any) -> None:
    bind = "regardingobjectid_contact_crmsync_emailsend@odata.bind"
    async with DynamicsClient(target(emulators)) as client:
        await client.upsert("contacts", guid(7), {"lastname": "O'Brien"})
        for event in ("ev/1 o'clock", "ev-2"):
            await client.upsert(
                "crmsync_emailsends",
                {"crmsync_eventid": event},
                {"subject": event, bind: f"/contacts({guid(7)})"},
                mode="create",
            )
        found = [r async for r in client.query("contacts", filter="lastname eq 'O''Brien'")]
        activity = await client.get("crmsync_emailsends", {"crmsync_eventid": "ev/1 o'clock"})

    assert [r["contactid"] for r in found] == [guid(7)]
    assert activity is not None and activity["_regardingobjectid_value"] == guid(7)


async def test_the_same_batch_twice_leaves_the_same_records(emulators: Any) -> None:
    records = [
        SinkRecord("contacts", guid(100 + n), fields={"firstname": f"F{n}", "lastname": "Batch"})
        for n in range(250)
    ]
    bad = SinkRecord("contacts", guid(999), fields={"firstname": "x" * 51})
    events = [
        SinkRecord(
            "crmsync_emailopens",
            f"open-{n}",
            fields={
                "subject": "s",
                "regardingobjectid_contact_crmsync_emailopen@odata.bind": f"/contacts({guid(100)})",
            },
            key_field="crmsync_eventid",
            mode="create",
        )
        for n in range(20)
    ]
    batch = [*records[:100], bad, *events, *records[100:]]
    # A small batch limit makes the sink split into several $batch requests.
    client = DynamicsClient(target(emulators), max_batch_requests=100)
    sink = DynamicsSink(client)
    first = await sink.write_batch(batch)
    second = await sink.write_batch(batch)
    counts = (await admin(emulators, "GET", "stats"))["counts"]
    rows = [r async for r in client.query("contacts", filter="lastname eq 'Batch'", page_size=50)]
    await sink.aclose()

    for outcomes in (first, second):
        assert isinstance(outcomes[100], RecordRejected) and "firstname" in outcomes[100].reason
        assert outcomes[:100] == [None] * 100 and outcomes[101:] == [None] * 170
    assert counts["contacts"] == 250 and counts["crmsync_emailopens"] == 20
    assert sorted(r["firstname"] for r in rows) == sorted(f"F{n}" for n in range(250))


async def test_a_429_pauses_every_request_until_retry_after(emulators: Any) -> None:
    async with DynamicsClient(target(emulators)) as client:
        await client.upsert("contacts", guid(1), {"firstname": "warm"})  # token + connection
        await admin(
            emulators, "POST", "faults", {"fail_next": [{"status": 429, "retry_after_s": 2}]}
        )
        started = time.monotonic()

        async def second() -> float:
            await asyncio.sleep(0.3)  # after the first one heard its 429
            await client.upsert("contacts", guid(2), {"firstname": "b"})
            return time.monotonic() - started

        first_task = asyncio.create_task(client.upsert("contacts", guid(1), {"firstname": "a"}))
        second_done = await second()
        await first_task
        first_done = time.monotonic() - started
        row = await client.get("contacts", guid(1))

    assert first_done >= 2.0 and second_done >= 2.0
    assert row is not None and row["firstname"] == "a"


async def test_an_outage_is_reported_retryable_or_ridden_out(emulators: Any) -> None:
    await admin(emulators, "POST", "faults", {"outage_s": 4})
    started = time.monotonic()
    # A short policy hands the record back at once with the server's Retry-After ...
    async with DynamicsClient(target(emulators), retry=RetryPolicy(budget_s=1)) as impatient:
        with pytest.raises(Retryable) as caught:
            await impatient.upsert("contacts", guid(1), {"firstname": "a"})
    # ... the default one rides the outage out.
    async with DynamicsClient(target(emulators)) as client:
        await client.upsert("contacts", guid(1), {"firstname": "a"})
        row = await client.get("contacts", guid(1))

    assert caught.value.retry_after is not None and caught.value.retry_after >= 3
    assert time.monotonic() - started >= 3.5
    assert row is not None


async def test_a_revoked_token_is_refreshed_and_refused_credentials_are_fatal(
    emulators: Any,
) -> None:
    async with DynamicsClient(target(emulators)) as client:
        await client.upsert("contacts", guid(1), {"firstname": "a"})
        await admin(emulators, "POST", "faults", {"revoke_tokens": True})
        await client.upsert("contacts", guid(1), {"firstname": "b"})  # 401 → new token → 204
        await admin(emulators, "POST", "faults", {"token_lifetime_s": 1})
        await client.upsert("contacts", guid(2), {"firstname": "c"})
        await asyncio.sleep(1.1)  # the token has expired: renewed before or after a 401
        await client.upsert("contacts", guid(2), {"firstname": "d"})
    wrong = target(emulators, client_secret="wrong")
    async with DynamicsClient(wrong) as refused:
        with pytest.raises(Fatal, match="invalid_client"):
            await refused.upsert("contacts", guid(1), {"firstname": "x"})
    sink = DynamicsSink.for_target(wrong)
    outcomes = await sink.write_batch([SinkRecord("contacts", guid(3), fields={"firstname": "y"})])
    await sink.aclose()

    assert isinstance(outcomes[0], Fatal)


async def test_a_missing_entity_set_is_fatal_and_the_dop_hint_lowers_concurrency(
    emulators: Any,
) -> None:
    async with DynamicsClient(target(emulators, max_concurrency=16)) as client:
        with pytest.raises(Fatal, match="segment"):
            await client.upsert("nopes", guid(1), {"name": "x"})
        sink = DynamicsSink(client)
        outcomes = await sink.write_batch([SinkRecord("nopes", guid(1), fields={"a": 1})])

        assert isinstance(outcomes[0], Fatal)
        assert client.concurrency < 16
