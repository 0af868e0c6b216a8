"""In a real browser: from a workflow's row to what happened to one record."""

from __future__ import annotations

import uuid
from pathlib import Path

from playwright.async_api import Page, expect

from crmsync.streams.kafka import topics
from tests.e2e.conftest import Stack, shoot, sign_in
from tests.integration.workflow_helpers import contact_change, publish_changes

D2C = "d365-to-campaign"


async def test_a_row_leads_to_the_trace_of_a_contact_written_and_one_refused(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    await stack.ensure(D2C, "RUNNING")
    written, refused = str(uuid.uuid4()), str(uuid.uuid4())
    await publish_changes(
        stack.cluster,
        topics.CONTACT_CHANGES,
        [
            contact_change(written, {"contactid": written, "firstname": "Grace", "lastname": "H"}),
            # an update without its new values: the mapping refuses it
            contact_change(refused, None),
        ],
    )
    await sign_in(page, stack)
    await page.locator(f'tr[data-name="{D2C}"]').get_by_role("link", name="Trace a record").click()
    search = page.get_by_label("Contact id, profile externalId, email event id or record id")

    await search.fill(written)
    await page.get_by_role("button", name="Trace").click()
    event = page.locator("tr.trace-event").first
    for _ in range(30):  # indexed within a second or two of the write
        if await event.count():
            break
        await page.wait_for_timeout(500)
        await page.reload()
    mine = event.locator("li.outcome", has_text=D2C)
    await expect(mine.locator(".result")).to_have_text("written")
    await expect(mine).to_contain_text("profileAndServicesExt/profile")
    await expect(event.locator(".fields")).to_contain_text("firstname")
    await shoot(page, tmp_path, "trace")

    await search.fill(refused)
    await page.get_by_role("button", name="Trace").click()
    outcome = page.locator("tr.trace-event li.outcome", has_text=D2C).first
    for _ in range(30):
        if await outcome.count():
            break
        await page.wait_for_timeout(500)
        await page.reload()
    await expect(outcome.locator(".result")).to_have_text("dead-lettered")
    await expect(outcome.locator(".why")).to_contain_text("has no after")

    await search.fill(str(uuid.uuid4()))
    await page.get_by_role("button", name="Trace").click()
    await expect(page.locator("p.empty")).to_contain_text("Nothing found")
