"""The Workflows page's history chart and source row in Chromium: a backlog built while stopped
and drained after Start is drawn; the source's FAILED reason and its lost heartbeat show."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from playwright.async_api import Locator, Page, expect

from tests.e2e.conftest import Stack, shoot, sign_in
from tests.integration.harness import contacts
from tests.integration.test_source import start_source

D2C = "d365-to-campaign"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "images"


def _row(page: Page, name: str) -> Locator:
    return page.locator(f'tr[data-name="{name}"]')


def _heights(points: str) -> list[float]:
    return [float(pair.split(",")[1]) for pair in points.split()]


async def test_the_chart_draws_a_backlog_built_while_stopped_and_drained_after_start(
    page: Page, stack: Stack
) -> None:
    await stack.ensure(D2C, "STOPPED")
    sent = await stack.cluster.publish_contacts(contacts(200, tag="c"))
    await sign_in(page, stack)
    row = _row(page, D2C)
    await expect(row.locator('[data-field="backlog"]')).to_have_text(f"{sent:,}", timeout=20_000)
    await asyncio.sleep(2)
    started = await asyncio.to_thread(stack.api, "POST", f"/api/v1/workflows/{D2C}/start")
    assert started.status_code == 202, started.text
    await stack.wait_status(D2C, "RUNNING")
    await expect(row.locator('[data-field="backlog"]')).to_have_text("0", timeout=60_000)
    await expect(row.locator('[data-field="eta"]')).to_have_text("caught up", timeout=10_000)
    await expect(row.locator('[data-field="peak"]')).to_have_text(f"{sent:,}")

    line = row.locator('[data-field="backlog-line"]')
    heights = _heights(await line.get_attribute("points") or "")
    assert min(heights) < 2, "the peak reaches the chart's top"
    assert heights[-1] > 38, "and the line ends at the bottom: drained"
    rate = _heights(await row.locator('[data-field="rate-line"]').get_attribute("points") or "")
    assert min(rate) < 2, "records written per second rose while it drained"
    label = await row.locator('[data-field="chart"]').get_attribute("aria-label") or ""
    assert f"peaked at {sent:,}" in label and "caught up" in label
    box = await row.locator("figure.history svg").bounding_box()
    assert box is not None and box["width"] >= 200 and box["height"] >= 30, box
    await row.locator("a.dlq-link").click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text("Dead letters of")
    await page.go_back()
    await shoot(page, SCREENSHOTS, "workflows-history")


async def test_the_source_row_shows_its_failure_then_its_lost_heartbeat(
    page: Page, stack: Stack
) -> None:
    source = start_source(stack.cluster, CRMSYNC_DYNAMICS_CLIENT_SECRET="wrong")

    async def reported() -> bool:
        answer = await asyncio.to_thread(stack.api, "GET", "/api/v1/sources")
        found = answer.json()["sources"]
        return bool(found) and found[0]["status"] == "FAILED"

    for _ in range(120):
        if await reported():
            break
        await asyncio.sleep(0.5)
    await sign_in(page, stack)
    row = page.locator('tr[data-source="d365"]')
    sources = page.locator("table.sources")
    workflows = page.locator("table.workflows:not(.sources)")
    sources_box, workflows_box = await sources.bounding_box(), await workflows.bounding_box()
    assert sources_box and workflows_box and sources_box["y"] < workflows_box["y"], "above"
    await expect(row.locator('[data-field="status-text"]')).to_have_text("FAILED")
    await expect(row.locator('[data-field="reason"]')).to_contain_text("Invalid client secret")
    await expect(row.locator(".status")).to_have_class(re.compile("status-failed"))
    await shoot(page, SCREENSHOTS, "workflows-source-failed")

    source.kill()  # its last record says FAILED; without heartbeats that no longer holds
    status = row.locator('[data-field="status-text"]')
    await expect(status).to_have_text("NO HEARTBEAT", timeout=20_000)
    await expect(row.locator('[data-field="reason"]')).to_contain_text("no heartbeat for")
