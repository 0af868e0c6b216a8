"""Drift read from the targets' metadata, changed through the emulators' admin endpoints the way
an admin changes a column or field in the vendor's UI.

Vendor facts this relies on:
- Dataverse: a string column's length is ``StringAttributeMetadata.MaxLength``
  (https://learn.microsoft.com/en-us/dotnet/api/microsoft.xrm.sdk.metadata.stringattributemetadata.maxlength),
  read from ``EntityDefinitions`` with ``$expand=Attributes`` (derived-type properties come only
  without a nested ``$select``).
- Campaign: ``GET <root>/resourceType/<name>`` lists each field under ``content`` with its
  ``apiName`` and ``type`` (https://experienceleague.adobe.com/docs/campaign-standard/using/working-with-apis/global-concepts/metadata-mechanism.html).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from crmsync.streams.catalog import default_config
from crmsync.streams.drift import DriftWatch, reason
from crmsync.targets.settings import CampaignTarget, DynamicsTarget

pytestmark = pytest.mark.timeout(60)


def watch(emulators: Any, workflow: str) -> DriftWatch:
    return DriftWatch(
        workflow,
        DynamicsTarget(
            url=emulators.dynamics_url,
            tenant=emulators.tenant,
            client_id=emulators.client_id,
            client_secret=emulators.client_secret,
        ),
        CampaignTarget(
            url=emulators.campaign_url,
            org=emulators.org,
            client_id=emulators.client_id,
            client_secret=emulators.client_secret,
        ),
    )


async def test_a_dropped_activity_column_is_named_with_its_type(emulators: Any) -> None:
    drift = watch(emulators, "campaign-to-d365")
    assert await drift.baseline(default_config("campaign-to-d365")) == []
    assert await drift.check() == []
    async with httpx.AsyncClient(base_url=emulators.dynamics_url) as admin:
        dropped = await admin.delete(
            "/_admin/entity-sets/crmsync_emailsends/columns/crmsync_campaignname"
        )
        assert dropped.status_code == 200
    found = await drift.check()
    assert reason(found) == (
        "crmsync_emailsends.crmsync_campaignname: was String(200), now missing"
    )
    assert drift.names_a_dependency(
        "HTTP 400 0x80060888: Invalid property 'crmsync_campaignname' was found"
    )
    assert not drift.names_a_dependency("HTTP 400: The value is not valid")


async def test_a_shorter_campaign_field_breaks_a_longer_one_and_a_new_field_do_not(
    emulators: Any,
) -> None:
    drift = watch(emulators, "d365-to-campaign")
    assert await drift.baseline(default_config("d365-to-campaign")) == []
    async with httpx.AsyncClient(base_url=emulators.campaign_url) as admin:
        longer = await admin.patch(
            "/_admin/resources/profile/fields/lastName", json={"max_length": 80}
        )
        added = await admin.put(
            "/_admin/resources/profile/fields/cusNickname", json={"max_length": 40}
        )
        assert (longer.status_code, added.status_code) == (200, 200)
        assert await drift.check() == []
        reported = {d.text() for d in drift.differences}
        assert "profileAndServicesExt/profile.cusNickname: was absent, now present" in reported
        assert "profileAndServicesExt/profile.lastName: was string(50), now string(80)" in reported

        shorter = await admin.patch(
            "/_admin/resources/profile/fields/firstName", json={"max_length": 10}
        )
        assert shorter.status_code == 200
        assert reason(await drift.check()) == (
            "profileAndServicesExt/profile.firstName: was string(30), now string(10)"
        )
        restored = await admin.patch(
            "/_admin/resources/profile/fields/firstName", json={"max_length": 30}
        )
        assert restored.status_code == 200
    assert await drift.check() == []


async def test_a_removed_custom_filter_and_a_changed_column_type_break(emulators: Any) -> None:
    drift = watch(emulators, "opt-in-out")
    assert await drift.baseline(default_config("opt-in-out")) == []
    async with (
        httpx.AsyncClient(base_url=emulators.campaign_url) as acs,
        httpx.AsyncClient(base_url=emulators.dynamics_url) as d365,
    ):
        gone = await acs.delete("/_admin/resources/profile/filters/byExternalId")
        retyped = await d365.patch(
            "/_admin/entity-sets/contacts/columns/donotbulkemail", json={"type": "string",
                                                                         "max_length": 5}
        )  # fmt: skip
        assert (gone.status_code, retyped.status_code) == (200, 200)
        assert reason(await drift.check()) == (
            "profileAndServicesExt/profile/byExternalId?externalId_parameter=: was present, "
            "now missing; contacts.donotbulkemail: was Boolean, now String(5)"
        )
        back = await acs.put(
            "/_admin/resources/profile/filters/byExternalId",
            json={"field": "externalId", "parameter": "externalId_parameter"},
        )
        assert back.status_code == 200
        refused = await d365.patch("/_admin/entity-sets/contacts/columns/nope", json={})
        assert refused.status_code == 404
        invalid = await d365.patch(
            "/_admin/entity-sets/contacts/columns/firstname", json={"max_length": 0}
        )
        assert invalid.status_code == 422


WRONG = SecretStr("not-the-secret")


@pytest.mark.parametrize("system", ["d365", "campaign"])
async def test_refused_credentials_are_no_verdict_never_drift(emulators: Any, system: str) -> None:
    """A target that refuses the worker's credentials hides its metadata: nothing is "missing"
    (the writes fail the workflow with the credentials' reason instead)."""
    drift = watch(emulators, "d365-to-campaign")
    if system == "d365":
        drift.dynamics = drift.dynamics.model_copy(update={"client_secret": WRONG})
    else:
        drift.campaign = drift.campaign.model_copy(update={"client_secret": WRONG})
    assert await drift.baseline(default_config("d365-to-campaign")) == []
    assert await drift.check() == []
    assert drift.differences == []


async def test_a_restarted_worker_compares_with_the_shapes_its_config_was_first_started_with(
    emulators: Any,
) -> None:
    first_name = "campaign|field|profileAndServicesExt/profile.firstName"
    last_name = "campaign|field|profileAndServicesExt/profile.lastName"
    first = watch(emulators, "d365-to-campaign")
    assert await first.baseline(default_config("d365-to-campaign")) == []
    kept = first.shapes()
    assert (kept[first_name], kept[last_name]) == ("string(30)", "string(50)")
    async with httpx.AsyncClient(base_url=emulators.campaign_url) as admin:
        shorter = await admin.patch(
            "/_admin/resources/profile/fields/firstName", json={"max_length": 10}
        )
        longer = await admin.patch(
            "/_admin/resources/profile/fields/lastName", json={"max_length": 80}
        )
        assert (shorter.status_code, longer.status_code) == (200, 200)
        try:
            later = watch(emulators, "d365-to-campaign")
            found = await later.baseline(default_config("d365-to-campaign"), kept)
            assert reason(found) == (
                "profileAndServicesExt/profile.firstName: was string(30), now string(10)"
            )
            # What it was is what it stays compared with; a longer field is the new baseline.
            assert (later.shapes()[first_name], later.shapes()[last_name]) == (
                "string(30)",
                "string(80)",
            )
            assert reason(await later.check()) == reason(found)
            # Without what was kept, the narrowed field would be taken as normal.
            unaware = watch(emulators, "d365-to-campaign")
            assert await unaware.baseline(default_config("d365-to-campaign")) == []
        finally:
            await admin.patch("/_admin/resources/profile/fields/firstName", json={"max_length": 30})
            await admin.patch("/_admin/resources/profile/fields/lastName", json={"max_length": 50})
