"""Microsoft's Python SDK for Dataverse drives the Dynamics emulator, unchanged.

``PowerPlatform-Dataverse-Client`` (github.com/microsoft/PowerPlatform-DataverseClient-Python) is
synchronous; each test runs it in a worker thread while the emulator serves on the event loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from PowerPlatform.Dataverse.client import DataverseClient
from PowerPlatform.Dataverse.core.errors import HttpError

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")


async def run(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


async def test_create_read_with_select_update_and_delete(dataverse: DataverseClient) -> None:
    def scenario() -> None:
        contact_id = dataverse.records.create(
            "contact", {"firstname": "Ada", "lastname": "Lovelace"}
        )
        uuid.UUID(contact_id)
        got = dataverse.records.retrieve("contact", contact_id, select=["firstname", "lastname"])
        assert got is not None and (got["firstname"], got["lastname"]) == ("Ada", "Lovelace")
        assert "emailaddress1" not in got.data  # $select honoured
        dataverse.records.update("contact", contact_id, {"lastname": "King"})
        again = dataverse.records.retrieve("contact", contact_id, select=["lastname"])
        assert again is not None and again["lastname"] == "King"
        dataverse.records.delete("contact", contact_id)
        assert dataverse.records.retrieve("contact", contact_id) is None
        status = None
        try:
            dataverse.records.update("contact", contact_id, {"lastname": "Gone"})
        except HttpError as error:  # not pytest.raises: it would keep the open response alive
            status = error.status_code
        assert status == 404

    await run(scenario)


async def test_paging_follows_next_links(dataverse: DataverseClient) -> None:
    def scenario() -> list[int]:
        ids = dataverse.records.create(
            "contact", [{"firstname": f"P{n}", "lastname": "Paged"} for n in range(12)]
        )
        assert len(ids) == 12
        pages = list(
            dataverse.records.list_pages(
                "contact", select=["firstname"], filter="lastname eq 'Paged'", page_size=5
            )
        )
        return [len(list(page)) for page in pages]

    assert await run(scenario) == [5, 5, 2]


async def test_alternate_key_upserts_single_and_multiple(dataverse: DataverseClient) -> None:
    def scenario() -> dict[str, Any]:
        dataverse.records.upsert(
            "crmsync_emailsend",
            [{"alternate_key": {"crmsync_eventid": "ev-1"}, "record": {"subject": "one"}}],
        )
        dataverse.records.upsert(
            "crmsync_emailsend",
            [
                {"alternate_key": {"crmsync_eventid": "ev-1"}, "record": {"subject": "one again"}},
                {"alternate_key": {"crmsync_eventid": "ev-2"}, "record": {"subject": "two"}},
            ],
        )
        rows = list(
            dataverse.records.list("crmsync_emailsend", select=["crmsync_eventid", "subject"])
        )
        return {r["crmsync_eventid"]: r["subject"] for r in rows}

    assert await run(scenario) == {"ev-1": "one again", "ev-2": "two"}


async def test_batch_change_set_commits_and_rolls_back(dataverse: DataverseClient) -> None:
    def scenario() -> tuple[list[int], list[int], int]:
        batch = dataverse.batch.new()
        with batch.changeset() as cs:
            cs.records.create("contact", {"firstname": "In", "lastname": "Set"})
            cs.records.create("contact", {"firstname": "Also", "lastname": "Set"})
        committed = batch.execute()
        failing = dataverse.batch.new()
        with failing.changeset() as cs:
            cs.records.create("contact", {"firstname": "Rolled", "lastname": "Back"})
            cs.records.create("contact", {"firstname": "x" * 51, "lastname": "Back"})
        rolled = failing.execute()
        left = list(dataverse.records.list("contact", filter="lastname eq 'Back'"))
        return (
            [r.status_code for r in committed.responses],
            [r.status_code for r in rolled.responses],
            len(left),
        )

    committed, rolled, left = await run(scenario)
    assert committed == [204, 204]
    assert any(status >= 400 for status in rolled)
    assert left == 0  # the change set rolled back as a whole


async def test_create_multiple_and_update_multiple(dataverse: DataverseClient) -> None:
    def scenario() -> list[str]:
        ids = dataverse.records.create(
            "contact", [{"firstname": f"B{n}", "lastname": "Bulk"} for n in range(3)]
        )
        dataverse.records.update("contact", ids, {"lastname": "Bulked"})
        got = [dataverse.records.retrieve("contact", i, select=["lastname"]) for i in ids]
        return [r["lastname"] if r is not None else "missing" for r in got]

    assert await run(scenario) == ["Bulked"] * 3
