"""The Workflows page in a real browser: sign-in, live rows, Stop/Start, edits, roles, CSRF."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer
from playwright.async_api import Locator, Page, Route, expect

from crmsync.streams.control_protocol import WorkerStatus
from crmsync.streams.kafka import topics
from tests.e2e.conftest import OPERATOR, VIEWER, WORKFLOWS, Stack, shoot, sign_in
from tests.integration.harness import contacts

D2C = "d365-to-campaign"
TIP = "edited; changes apply on the next Stop + Start"


def _row(page: Page, name: str) -> Locator:
    return page.locator(f'tr[data-name="{name}"]')


def _status(page: Page, name: str) -> Locator:
    return _row(page, name).locator('[data-field="status-text"]')


def _toggle(page: Page, name: str) -> Locator:
    return _row(page, name).locator('[data-field="toggle"]')


async def test_stop_publish_start_without_reloading(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    for name in WORKFLOWS:
        await stack.ensure(name, "RUNNING")
    await sign_in(page, stack)
    await expect(page.get_by_role("heading", name="Workflows")).to_be_visible()
    await expect(page.locator("tbody tr[data-name]")).to_have_count(3)
    for name in WORKFLOWS:
        await expect(_status(page, name)).to_have_text("RUNNING")
        await expect(_row(page, name).locator('[data-field="backlog"]')).to_have_text(
            re.compile(r"^\d[\d,]*$")
        )
        await expect(_toggle(page, name)).to_have_text(re.compile("Stop"))
    await expect(_row(page, D2C).locator("th")).to_contain_text(
        "Microsoft Dynamics 365 to Campaign"
    )
    await shoot(page, tmp_path, "running")

    # Stop: the button turns into Start, the status into STOPPED, and the API agrees
    await _toggle(page, D2C).click()
    await expect(_status(page, D2C)).to_have_text("STOPPED", timeout=30_000)
    await expect(_toggle(page, D2C)).to_have_text(re.compile("Start"))
    assert stack.workflows()[D2C]["status"] == "STOPPED"

    # contacts published while stopped: the backlog rises on the page without a reload
    marker = await page.evaluate("window.__marker = Math.random()")
    await stack.cluster.publish_contacts(contacts(300, tag="e2e"))
    backlog = _row(page, D2C).locator('[data-field="backlog"]')
    await expect(backlog).to_have_text("300", timeout=20_000)
    await expect(_row(page, D2C).locator('[data-field="trend"]')).to_have_text(
        re.compile("stalled|growing|steady")
    )
    assert await page.evaluate("window.__marker") == marker  # the same document: no reload
    await shoot(page, tmp_path, "stopped-backlog")

    # Start: STARTING (button disabled with a spinner), then RUNNING, and the backlog drains
    await _toggle(page, D2C).click()
    await expect(_status(page, D2C)).to_have_text(re.compile("STARTING|RUNNING"))
    await expect(_status(page, D2C)).to_have_text("RUNNING", timeout=30_000)
    await expect(_toggle(page, D2C)).to_have_text(re.compile("Stop"))
    await expect(_toggle(page, D2C)).not_to_have_attribute("aria-disabled", "true")
    await expect(backlog).to_have_text("0", timeout=60_000)
    assert stack.workflows()[D2C]["status"] == "RUNNING"
    assert await page.evaluate("window.__marker") == marker


async def test_starting_shows_a_disabled_toggle_with_a_spinner(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    await stack.ensure(D2C, "STOPPED")
    await sign_in(page, stack)

    async def slowly(route: Route) -> None:
        # the real answers, late: STARTING (the start's own answer) stays on screen a moment
        await asyncio.sleep(3)
        await route.continue_()

    await page.route("**/workflows.json", slowly)
    await _toggle(page, D2C).click()
    button = _toggle(page, D2C)
    await expect(button).to_have_attribute("aria-disabled", "true", timeout=5_000)
    await expect(button.locator(".spinner")).to_be_visible()
    await expect(_status(page, D2C)).to_have_text("STARTING")
    await shoot(page, tmp_path, "starting")
    await expect(_status(page, D2C)).to_have_text("RUNNING", timeout=30_000)
    await expect(button).not_to_have_attribute("aria-disabled", "true")


async def test_edit_error_then_pending_mark_until_stop_start(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    await stack.ensure(D2C, "RUNNING")
    await sign_in(page, stack)
    await page.get_by_role("link", name="Edit Microsoft Dynamics 365 to Campaign").click()
    await expect(page.get_by_text("Changes apply on the next Stop + Start.")).to_be_visible()

    # an invalid field name: the error sits next to that field
    target = page.get_by_label("Mapping 2: Campaign field")
    await target.fill("first name")
    await page.get_by_role("button", name="Review changes").click()
    error = page.locator("#f-mappings-1-target-error")
    await expect(error).to_contain_text("must be a field name")
    await expect(page.get_by_label("Mapping 2: Campaign field")).to_have_attribute(
        "aria-invalid", "true"
    )
    await expect(page.locator("#error-summary")).to_be_focused()
    await expect(page.get_by_role("button", name="Save as pending")).to_have_count(0)
    await shoot(page, tmp_path, "edit-error")

    # fixed, with a new max length and a mapping added: the review shows the diff before saving
    await page.get_by_label("Mapping 2: Campaign field").fill("firstName")
    await page.get_by_label("Mapping 2: max length").fill("5")
    await page.get_by_role("button", name="Add a mapping").click()
    await expect(page.get_by_label("Mapping 7: Dynamics 365 field")).to_be_focused()
    # a field the target has (Start checks the targets first): the contact id into the
    # profile extension field cusCrmId
    await page.get_by_label("Mapping 7: Dynamics 365 field").fill("contactid")
    await page.get_by_label("Mapping 7: Campaign field").fill("cusCrmId")
    await page.get_by_role("button", name="Review changes").click()
    diff = page.locator("#review table.changes")
    await expect(diff).to_contain_text("mappings[1].max_length")
    await expect(diff.locator("tr", has_text="mappings[1].max_length")).to_contain_text("30")
    await expect(diff.locator("tr", has_text="mappings[1].max_length")).to_contain_text("5")
    await expect(diff).to_contain_text("mappings[6]")
    await expect(diff).to_contain_text("cusCrmId")
    await shoot(page, tmp_path, "edit-review")
    assert stack.workflows()[D2C]["pending_changes"] is False  # nothing saved by a review
    await page.get_by_role("button", name="Save as pending").click()
    await page.wait_for_url(stack.url + "/")

    # the warning mark on Stop, with its tooltip; the API agrees
    mark = _row(page, D2C).locator('[data-field="mark"]')
    await expect(mark).to_be_visible()
    await _toggle(page, D2C).hover()
    tip = page.locator(f"#tip-{D2C}")
    await expect(tip).to_be_visible()
    await expect(tip).to_have_text(TIP)
    await expect(_toggle(page, D2C)).to_have_accessible_description(TIP)
    detail = stack.workflow(D2C)
    assert detail["pending_changes"] is True
    assert {"path": "mappings[1].max_length", "active": 30, "pending": 5} in (
        detail["pending_diff"]
    )
    await shoot(page, tmp_path, "pending-mark")

    # Stop + Start: the mark is gone and the edit is active
    await _toggle(page, D2C).click()
    await expect(_status(page, D2C)).to_have_text("STOPPED", timeout=30_000)
    await expect(mark).to_be_hidden()
    await _toggle(page, D2C).click()
    await expect(_status(page, D2C)).to_have_text("RUNNING", timeout=30_000)
    await expect(mark).to_be_hidden()
    detail = stack.workflow(D2C)
    assert detail["pending_changes"] is False
    assert detail["active_config"]["mappings"][1]["max_length"] == 5


async def test_viewer_and_operator_see_only_what_they_may_use(page: Page, stack: Stack) -> None:
    await sign_in(page, stack, VIEWER)
    await expect(page.locator("tbody tr[data-name]")).to_have_count(3)
    await expect(page.locator("form.toggle")).to_have_count(0)
    await expect(page.get_by_role("button", name=re.compile("^(Start|Stop)"))).to_have_count(0)
    await page.get_by_role("link", name="View the config of Opt-in/Opt-out").click()
    await expect(page.get_by_label("Direction")).to_have_value("bidirectional")
    await page.get_by_role("button", name="Review changes").click()
    await expect(page.get_by_role("button", name="Save as pending")).to_have_count(0)
    # the server refuses what the page does not offer
    refused = await page.request.post(
        f"{stack.url}/workflows/{D2C}/stop",
        form={"csrf": await _csrf(page)},
        headers={"Accept": "application/json"},
    )
    assert refused.status == 403

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("Access token")).to_be_visible()
    await sign_in(page, stack, OPERATOR)
    await expect(page.locator("form.toggle")).to_have_count(3)
    await page.get_by_role("link", name="View the config of Opt-in/Opt-out").click()
    await page.get_by_role("button", name="Review changes").click()
    await expect(page.get_by_role("button", name="Save as pending")).to_have_count(0)


async def _csrf(page: Page) -> str:
    return str(await page.locator('input[name="csrf"]').first.get_attribute("value"))


async def test_a_post_without_the_csrf_token_is_refused(page: Page, stack: Stack) -> None:
    await stack.ensure(D2C, "RUNNING")
    await sign_in(page, stack)
    attempts: list[tuple[str, dict[str, str | float | bool]]] = [
        (f"/workflows/{D2C}/stop", {}),
        (f"/workflows/{D2C}/stop", {"csrf": "forged"}),
        (f"/workflows/{D2C}/edit", {"action": "save"}),
        ("/logout", {}),
    ]
    for path, form in attempts:
        answer = await page.request.post(stack.url + path, form=form)
        assert answer.status == 403, (path, form, answer.status)
    assert stack.workflows()[D2C]["status"] == "RUNNING"
    # a wrong token does not sign in
    await page.context.clear_cookies()
    await page.goto(stack.url + "/login")
    await page.get_by_label("Access token").fill("not-a-token")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_text("That token is not valid.")).to_be_visible()
    await expect(page.get_by_label("Access token")).to_have_attribute("aria-invalid", "true")


async def test_keyboard_only_toggling(page: Page, stack: Stack) -> None:
    await stack.ensure("opt-in-out", "RUNNING")
    await sign_in(page, stack)
    await expect(_status(page, "opt-in-out")).to_have_text("RUNNING")
    toggle = _toggle(page, "opt-in-out")
    for _ in range(40):
        await page.keyboard.press("Tab")
        if await toggle.evaluate("element => element === document.activeElement"):
            break
    else:
        raise AssertionError("Tab never reached the opt-in-out toggle")
    await expect(toggle).to_have_text(re.compile("Stop"))
    await page.keyboard.press("Enter")
    await expect(_status(page, "opt-in-out")).to_have_text("STOPPED", timeout=30_000)
    await expect(toggle).to_have_text(re.compile("Start"))
    await expect(toggle).to_be_focused()  # the focus stays on the button that changed
    await expect(page.locator("#live")).to_contain_text("Opt-in/Opt-out: STOPPED")
    await page.keyboard.press("Space")
    await expect(_status(page, "opt-in-out")).to_have_text("RUNNING", timeout=30_000)
    await expect(toggle).to_be_focused()


async def test_a_failed_workflow_shows_its_reason(page: Page, stack: Stack, tmp_path: Path) -> None:
    await stack.ensure("campaign-to-d365", "RUNNING")
    await sign_in(page, stack)
    generation = stack.workflow("campaign-to-d365")["generation"]
    reason = "Fatal: Dynamics 365 refused the credentials (401 after a token refresh)"
    failed = WorkerStatus(
        workflow="campaign-to-d365",
        worker_id="e2e-failed-worker",
        state="FAILED",
        generation=generation,
        config_version=stack.workflow("campaign-to-d365")["active_version"],
        error=reason,
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.cluster.bootstrap, acks="all")
    await producer.start()

    async def heartbeat() -> None:
        while True:
            await producer.send_and_wait(topics.STATUS, _fresh(failed), key=failed.key.encode())
            await asyncio.sleep(0.4)

    beating = asyncio.create_task(heartbeat())
    try:
        row = _row(page, "campaign-to-d365")
        status = row.locator('[data-field="status-text"]')
        await expect(status).to_have_text("FAILED", timeout=20_000)
        await expect(row.locator('[data-field="reason"]')).to_have_text(reason)
        await expect(row.locator(".status")).to_have_class(re.compile("status-failed"))
        await expect(page.locator("#live")).to_contain_text("FAILED")
        await shoot(page, tmp_path, "failed")
    finally:
        beating.cancel()
        await producer.send_and_wait(topics.STATUS, None, key=failed.key.encode())
        await producer.stop()
    await expect(_status(page, "campaign-to-d365")).to_have_text("RUNNING", timeout=20_000)
    await expect(_row(page, "campaign-to-d365").locator('[data-field="reason"]')).to_be_hidden()


def _fresh(status: WorkerStatus) -> bytes:
    return status.model_copy(update={"heartbeat_ms": int(time.time() * 1000)}).encode()
