"""Preflight against the emulators: all the default configs need is there, until it is not."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from crmsync.control.cli import main
from crmsync.streams import preflight
from crmsync.streams.catalog import default_config, parse_config
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.settings import CampaignTarget, DynamicsTarget

pytestmark = pytest.mark.timeout(60)
WORKFLOWS = ("d365-to-campaign", "campaign-to-d365", "opt-in-out")


async def requirements(emulators: Any) -> list[preflight.Requirement]:
    dynamics = DynamicsTarget(
        url=emulators.dynamics_url,
        tenant=emulators.tenant,
        client_id=emulators.client_id,
        client_secret=emulators.client_secret,
    )
    campaign = CampaignTarget(
        url=emulators.campaign_url,
        org=emulators.org,
        client_id=emulators.client_id,
        client_secret=emulators.client_secret,
    )
    configs = {name: default_config(name) for name in WORKFLOWS}
    async with DynamicsClient(dynamics) as d, CampaignClient(campaign) as c:
        return await preflight.check(configs, d, c)


async def test_every_requirement_is_present_then_a_dropped_key_and_filter_are_named(
    emulators: Any,
) -> None:
    found = await requirements(emulators)
    kinds = {r.kind for r in found}
    assert kinds == {"table", "column", "key", "navigation", "resource", "field", "filter"}
    assert preflight.missing(found) == []
    names = {r.name for r in found}
    assert "crmsync_emailsends(crmsync_eventid)" in names
    assert "crmsync_emailopens.regardingobjectid_contact_crmsync_emailopen" in names

    async with httpx.AsyncClient() as admin:
        dropped = await admin.delete(
            f"{emulators.dynamics_url}/_admin/entity-sets/crmsync_emailsends/keys/crmsync_eventid"
        )
        assert dropped.status_code == 200
        gone = await admin.delete(
            f"{emulators.campaign_url}/_admin/resources/profile/filters/byExternalId"
        )
        assert gone.status_code == 200
    missing = preflight.missing(await requirements(emulators))
    assert {(r.workflow, r.kind, r.name) for r in missing} == {
        ("campaign-to-d365", "key", "crmsync_emailsends(crmsync_eventid)"),
        (
            "d365-to-campaign",
            "filter",
            "profileAndServicesExt/profile/byExternalId?externalId_parameter=",
        ),
        (
            "opt-in-out",
            "filter",
            "profileAndServicesExt/profile/byExternalId?externalId_parameter=",
        ),
    }
    assert all(r.fix for r in missing)


async def test_the_check_command_exits_1_naming_what_is_missing(
    emulators: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRMSYNC_DYNAMICS_URL", emulators.dynamics_url)
    monkeypatch.setenv("CRMSYNC_CAMPAIGN_URL", emulators.campaign_url)
    assert await _run(["targets", "check"]) == 0
    async with httpx.AsyncClient() as admin:
        await admin.delete(
            f"{emulators.dynamics_url}/_admin/entity-sets/crmsync_emailclicks/columns/crmsync_url"
        )
    capsys.readouterr()
    assert await _run(["targets", "check"]) == 1
    out = capsys.readouterr().out
    assert "MISSING  campaign-to-d365" in out and "crmsync_emailclicks.crmsync_url" in out


async def _run(argv: list[str]) -> int:
    import asyncio

    return await asyncio.to_thread(main, argv)


async def test_setup_creates_the_missing_activity_tables_columns_and_keys_once(
    emulators: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    """MicrosoftDocs/powerapps-docs, .../webapi/create-update-entity-definitions-using-web-api.md
    (``POST [Organization URI]/api/data/v9.2/EntityDefinitions`` with an ``EntityMetadata`` body,
    ``"IsActivity"``, ``"Attributes": [{"@odata.type": "Microsoft.Dynamics.CRM.
    StringAttributeMetadata", "IsPrimaryName": true, ...}]`` → ``204 No Content``), .../webapi/
    create-update-column-definitions-using-web-api.md (``POST .../EntityDefinitions(LogicalName=
    '...')/Attributes``) and define-alternate-keys-entity.md (``EntityKeyMetadata`` with
    ``KeyAttributes``). A config naming tables the org lacks: check names them, setup creates
    them (a dry run only prints), and a second setup has nothing left to do."""
    monkeypatch.setenv("CRMSYNC_DYNAMICS_URL", emulators.dynamics_url)
    monkeypatch.setenv("CRMSYNC_CAMPAIGN_URL", emulators.campaign_url)
    config = tmp_path / "c2d.json"
    config.write_text(
        '{"events": {"send": {"entity_set": "crmsync_mailsends"},'
        ' "bounce": {"entity_set": "crmsync_mailbounces"}}}'
    )
    given = ["--config", f"campaign-to-d365={config}"]
    assert await _run(["targets", "check", *given]) == 1
    capsys.readouterr()
    assert await _run(["targets", "setup", "d365", "--dry-run", *given]) == 0
    dry = capsys.readouterr().out
    assert "POST EntityDefinitions\n" in dry and '"IsActivity": true' in dry
    assert "POST EntityDefinitions(LogicalName='crmsync_mailbounce')/Keys" in dry
    assert await _run(["targets", "check", *given]) == 1  # the dry run changed nothing
    assert await _run(["targets", "setup", "d365", *given]) == 0
    assert await _run(["targets", "check", *given]) == 0
    capsys.readouterr()
    assert await _run(["targets", "setup", "d365", *given]) == 0
    assert "nothing to create" in capsys.readouterr().out


async def test_campaign_fields_the_mappings_write_are_read_from_the_metadata_mechanism(
    emulators: Any,
) -> None:
    """AdobeDocs/campaign-standard.en, help/api/using/metadata-mechanism.md (``GET
    /profileAndServices/resourceType/<resourceName>``, fields under ``content`` by ``apiName``):
    the preflight reads each resource's fields there, so a profile extension field a mapping
    writes (``cusCrmId``) or a custom resource's field (``cusPurchase.product``) that is not in
    the org is named, with the Campaign UI steps to add it (extensions are made only there)."""
    mapped = {
        "mappings": [
            {"source": "contactid", "target": "externalId"},
            {"source": "contactid", "target": "cusCrmId"},
            {"source": "lastname", "target": "lastName"},
        ]
    }
    configs = {name: default_config(name) for name in WORKFLOWS}
    configs["d365-to-campaign"] = parse_config("d365-to-campaign", mapped)
    found = await _requirements_of(emulators, configs)
    fields = {r.name for r in found if r.kind == "field"}
    assert {
        "profileAndServicesExt/profile.cusCrmId",
        "profileAndServicesExt/profile.externalId",
        "profileAndServicesExt/profile.blackListEmail",
        "profileAndServicesExt/cusPurchase.product",
        "profileAndServicesExt/cusPurchase.profile",
    } <= fields
    assert preflight.missing(found) == []
    async with httpx.AsyncClient(base_url=emulators.campaign_url) as admin:
        for resource, field in (("profile", "cusCrmId"), ("cusPurchase", "product")):
            dropped = await admin.delete(f"/_admin/resources/{resource}/fields/{field}")
            assert dropped.status_code == 200
    missing = preflight.missing(await _requirements_of(emulators, configs))
    assert {(r.workflow, r.kind, r.name) for r in missing} == {
        ("d365-to-campaign", "field", "profileAndServicesExt/profile.cusCrmId"),
        ("d365-to-campaign", "field", "profileAndServicesExt/cusPurchase.product"),
    }
    fixes = {r.name: r.fix for r in missing}
    assert "profile's extension" in fixes["profileAndServicesExt/profile.cusCrmId"]
    assert "Profiles & Services Ext API" in fixes["profileAndServicesExt/profile.cusCrmId"]
    assert "custom resource cusPurchase" in fixes["profileAndServicesExt/cusPurchase.product"]


async def _requirements_of(emulators: Any, configs: dict[str, Any]) -> list[preflight.Requirement]:
    dynamics = DynamicsTarget(
        url=emulators.dynamics_url,
        tenant=emulators.tenant,
        client_id=emulators.client_id,
        client_secret=emulators.client_secret,
    )
    campaign = CampaignTarget(
        url=emulators.campaign_url,
        org=emulators.org,
        client_id=emulators.client_id,
        client_secret=emulators.client_secret,
    )
    async with DynamicsClient(dynamics) as d, CampaignClient(campaign) as c:
        return await preflight.check(configs, d, c)


async def test_a_key_whose_index_is_still_being_built_is_not_ready(tmp_path: Any) -> None:
    """MicrosoftDocs/powerapps-docs, define-alternate-keys-entity.md, "Monitor index creation for
    alternate keys": Dataverse builds a new key's index in a background job, and
    ``EntityKeyIndexStatus`` is Pending, In Progress, Active or Failed. Until it is Active the
    preflight names the key as missing (wait, don't create it again), and the setup does not
    send the key a second time."""
    from crmsync.deploy.emulators.server import running_emulators
    from tests.integration.harness import set_up_d365

    async with running_emulators(
        tmp_path, dynamics_port=0, campaign_port=0, dynamics_key_index_delay_s=600
    ) as emu:
        assert await set_up_d365(emu.dynamics_url) > 0
        missing = preflight.missing(await requirements(emu))
        assert {r.name for r in missing} == {
            f"crmsync_email{t}s(crmsync_eventid)" for t in ("send", "open", "click", "bounce")
        }
        assert all("Pending" in r.fix and "background" in r.fix for r in missing)
        assert await set_up_d365(emu.dynamics_url) == 0
