"""In a real browser: a workflow stopped by schema drift shows why on its row, and an edit is
tried on recent records (side by side, changed cells marked) before Save and before Start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Locator, Page, expect

from crmsync.streams import preflight
from crmsync.streams.catalog import NAMES, default_config
from tests.e2e.conftest import Stack, shoot, sign_in
from tests.integration.harness import contacts, wait_for
from tests.integration.workflow_helpers import (
    create_contacts_in_dynamics,
    email_event,
    publish_email_events,
)

D2C, C2D = "d365-to-campaign", "campaign-to-d365"
DROPPED = "crmsync_emailsends.crmsync_campaignname"


def _row(page: Page, name: str) -> Locator:
    return page.locator(f'tr[data-name="{name}"]')


async def test_a_workflow_stopped_by_drift_shows_the_reason_and_what_changed_on_its_row(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    await stack.ensure(C2D, "RUNNING")
    await sign_in(page, stack)
    row = _row(page, C2D)
    await expect(row.locator('[data-field="drift"]')).to_be_hidden()
    people = contacts(2)
    await create_contacts_in_dynamics(stack.cluster, people)
    async with httpx.AsyncClient(base_url=stack.cluster.emulators.dynamics_url) as admin:
        dropped = await admin.delete(
            "/_admin/entity-sets/crmsync_emailsends/columns/crmsync_campaignname"
        )
        assert dropped.status_code == 200, dropped.text
    try:
        events = [email_event("send", p["contactid"], n) for n, p in enumerate(people)]
        await publish_email_events(stack.cluster, events)

        # the row changes by itself (no reload): STOPPED, the reason, the table of changes
        await expect(row.locator('[data-field="status-text"]')).to_have_text(
            "STOPPED", timeout=90_000
        )
        reason = row.locator('[data-field="reason"]')
        await expect(reason).to_have_text(
            f"stopped_by: drift — {DROPPED}: was String(200), now missing"
        )
        changes = row.locator('[data-field="drift"]')
        await expect(changes).to_be_visible()
        change = changes.locator("li", has_text=DROPPED)
        await expect(change).to_contain_text("String(200)")
        await expect(change).to_contain_text("missing")
        await expect(page.locator("#live")).to_contain_text("STOPPED")
        await shoot(page, tmp_path, "drift-row")
    finally:
        client = stack.cluster.dynamics_client()
        try:
            await preflight.setup_dynamics({n: default_config(n) for n in NAMES}, client)
        finally:
            await client.aclose()
    await _row(page, C2D).locator('[data-field="toggle"]').click()
    await expect(row.locator('[data-field="status-text"]')).to_have_text("RUNNING", timeout=30_000)
    await expect(reason).to_be_hidden()


async def test_an_edit_is_previewed_side_by_side_before_save_and_again_before_start(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    await stack.ensure(D2C, "STOPPED")
    people = contacts(4, tag="pv")
    await stack.cluster.publish_contacts(people)
    await sign_in(page, stack)
    link = _row(page, D2C).locator('[data-field="preview-link"]')
    await expect(link).to_be_hidden()  # no pending edit yet
    await page.get_by_role("link", name="Edit Microsoft Dynamics 365 to Campaign").click()

    # before Save: the form's edit on the newest records, the changed cell marked
    await page.get_by_label("Mapping 2: max length").fill("3")
    await page.get_by_role("button", name="Preview on recent records").click()
    table = page.locator("#preview table.preview")
    await expect(table).to_be_visible()
    first = people[0]
    record = table.locator(f'tbody.record[data-key="{first["contactid"]}"]')
    cell = record.locator("tr.changed", has_text="firstName")
    await expect(cell.locator("td.active")).to_have_text(first["firstname"])
    await expect(cell.locator("td.pending.changed")).to_contain_text(first["firstname"][:3])
    unchanged = record.locator("tr", has_text="lastName")
    await expect(unchanged).not_to_have_class("changed")
    await expect(page.locator('[data-field="preview-summary"]')).to_contain_text("changed")
    await shoot(page, tmp_path, "edit-preview")
    assert stack.workflows()[D2C]["pending_changes"] is False  # a preview saves nothing
    await page.get_by_role("button", name="Save as pending").click()
    await page.wait_for_url(stack.url + "/")

    # before Start: the pending edit previewed again, Start from there
    await expect(link).to_be_visible()
    await link.click()
    await expect(page.get_by_text("This workflow has pending changes")).to_be_visible()
    again = page.locator("table.preview").locator(f'tbody.record[data-key="{first["contactid"]}"]')
    await expect(
        again.locator("td.pending.changed", has_text=first["firstname"][:3])
    ).to_be_visible()
    await shoot(page, tmp_path, "start-preview")
    await page.get_by_role("button", name="Start with these changes").click()
    await page.wait_for_url(stack.url + "/")
    await expect(_row(page, D2C).locator('[data-field="status-text"]')).to_have_text(
        "RUNNING", timeout=30_000
    )

    async def synced() -> dict[str, Any] | None:
        profiles = await stack.cluster.profiles()
        return profiles if all(p["contactid"] in profiles for p in people) else None

    profiles = await wait_for(synced, 60, "the previewed contacts in Campaign")
    assert [profiles[p["contactid"]]["firstName"] for p in people] == [
        p["firstname"][:3] for p in people
    ]
