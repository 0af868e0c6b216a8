"""The Dynamics emulator starts as a fresh org and keeps its metadata writes like its data.

Doc pages (MicrosoftDocs/powerapps-docs, powerapps-docs/developer/data-platform/):
- webapi/create-update-entity-definitions-using-web-api.md: ``POST [Organization URI]/api/data/
  v9.2/EntityDefinitions`` with an ``EntityMetadata`` body (``SchemaName``, ``IsActivity``, an
  ``Attributes`` array holding the primary name ``StringAttributeMetadata``) → ``204 No Content``
  and ``OData-EntityId: .../EntityDefinitions(<MetadataId>)``.
- webapi/create-update-column-definitions-using-web-api.md: ``POST .../EntityDefinitions(
  LogicalName='<table>')/Attributes`` with a ``StringAttributeMetadata`` /
  ``DateTimeAttributeMetadata`` body → 204.
- define-alternate-keys-entity.md: an ``EntityKeyMetadata`` (``SchemaName``, ``KeyAttributes``)
  posted to ``.../Keys``; Dataverse builds the key's index over the existing records, and
  cannot activate it when they hold duplicate values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.deploy.emulators.server import Emulators, running_emulators
from tests.integration.harness import set_up_d365

pytestmark = pytest.mark.timeout(60)

_LABEL = {"LocalizedLabels": [{"Label": "x", "LanguageCode": 1033}]}


async def _api(emu: Emulators) -> httpx.AsyncClient:
    async with httpx.AsyncClient() as plain:
        token = (
            await plain.post(
                emu.dynamics_token_url,
                data={
                    "client_id": emu.client_id,
                    "client_secret": emu.client_secret,
                    "grant_type": "client_credentials",
                    "scope": f"{emu.dynamics_url}/.default",
                },
            )
        ).json()["access_token"]
    return httpx.AsyncClient(
        base_url=emu.dynamics_api_url + "/", headers={"Authorization": f"Bearer {token}"}
    )


async def _tables(api: httpx.AsyncClient) -> set[str]:
    answer = await api.get("EntityDefinitions", params={"$select": "LogicalName"})
    assert answer.status_code == 200, answer.text
    return {d["LogicalName"] for d in answer.json()["value"]}


async def test_a_fresh_emulator_has_only_what_a_fresh_org_has(tmp_path: Path) -> None:
    async with running_emulators(tmp_path, dynamics_port=0, campaign_port=0) as emu:
        async with await _api(emu) as api:
            tables = await _tables(api)
            write = await api.post("crmsync_emailsends", json={"subject": "s"})
    assert {"contact", "new_purchase"} <= tables
    assert not {t for t in tables if t.startswith("crmsync_")}
    assert write.status_code == 404
    assert write.json()["error"]["code"] == "0x8006088a"


async def test_tables_columns_and_keys_created_through_the_web_api_survive_a_restart(
    tmp_path: Path,
) -> None:
    table: dict[str, Any] = {
        "@odata.type": "Microsoft.Dynamics.CRM.EntityMetadata",
        "SchemaName": "crmsync_probe",
        "DisplayName": _LABEL,
        "DisplayCollectionName": _LABEL,
        "OwnershipType": "UserOwned",
        "IsActivity": True,
        "HasActivities": False,
        "HasNotes": False,
        "Attributes": [
            {
                "@odata.type": "Microsoft.Dynamics.CRM.StringAttributeMetadata",
                "SchemaName": "Subject",
                "IsPrimaryName": True,
                "MaxLength": 400,
                "DisplayName": _LABEL,
            }
        ],
    }
    column = {
        "@odata.type": "Microsoft.Dynamics.CRM.StringAttributeMetadata",
        "SchemaName": "crmsync_ref",
        "MaxLength": 100,
        "DisplayName": _LABEL,
    }
    where = "EntityDefinitions(LogicalName='crmsync_probe')"
    async with running_emulators(tmp_path, dynamics_port=0, campaign_port=0) as emu:
        async with await _api(emu) as api:
            created = await api.post("EntityDefinitions", json=table)
            assert created.status_code == 204, created.text
            assert "EntityDefinitions(" in created.headers["OData-EntityId"]
            assert (await api.post(f"{where}/Attributes", json=column)).status_code == 204
            # Two records before the key exists: the key's index takes them in.
            first = await api.post("crmsync_probes", json={"subject": "a", "crmsync_ref": "R-1"})
            assert first.status_code == 204, first.text
            await api.post("crmsync_probes", json={"subject": "b", "crmsync_ref": "R-2"})
            key = {"SchemaName": "crmsync_probe_ref", "KeyAttributes": ["crmsync_ref"]}
            assert (await api.post(f"{where}/Keys", json=key)).status_code == 204
    async with running_emulators(tmp_path, dynamics_port=0, campaign_port=0) as emu:
        async with await _api(emu) as api:
            assert "crmsync_probe" in await _tables(api)
            definition = (await api.get(where, params={"$expand": "Attributes,Keys"})).json()
            by_key = await api.get("crmsync_probes(crmsync_ref='R-1')")
            again = await api.post(f"{where}/Attributes", json=column)
    assert "crmsync_ref" in {a["LogicalName"] for a in definition["Attributes"]}
    assert [k["KeyAttributes"] for k in definition["Keys"]] == [["crmsync_ref"]]
    assert by_key.status_code == 200 and by_key.json()["subject"] == "a"
    assert again.status_code == 400  # the column exists: a second create is refused


async def test_a_key_over_duplicate_values_is_refused(tmp_path: Path) -> None:
    where = "EntityDefinitions(LogicalName='contact')"
    async with running_emulators(tmp_path, dynamics_port=0, campaign_port=0) as emu:
        async with await _api(emu) as api:
            for _ in range(2):
                await api.post("contacts", json={"lastname": "Same"})
            refused = await api.post(
                f"{where}/Keys", json={"SchemaName": "contact_ln", "KeyAttributes": ["lastname"]}
            )
            keys = (await api.get(f"{where}/Keys")).json()["value"]
    assert refused.status_code == 400 and "duplicate" in refused.json()["error"]["message"]
    assert keys == []


async def test_admin_drift_persists_and_the_setup_repairs_it(tmp_path: Path) -> None:
    """A dropped key stays dropped across a restart (it is the org's state, not a process's);
    ``crmsync targets setup d365`` puts it back, and a second run sends nothing."""
    async with running_emulators(tmp_path, dynamics_port=0, campaign_port=0) as emu:
        assert await set_up_d365(emu.dynamics_url) > 0
        async with httpx.AsyncClient() as admin:
            dropped = await admin.delete(
                f"{emu.dynamics_url}/_admin/entity-sets/crmsync_emailsends/keys/crmsync_eventid"
            )
            assert dropped.status_code == 200
    async with running_emulators(tmp_path, dynamics_port=0, campaign_port=0) as emu:
        async with await _api(emu) as api:
            keys = (
                await api.get("EntityDefinitions(LogicalName='crmsync_emailsend')/Keys")
            ).json()["value"]
            assert keys == []
        assert await set_up_d365(emu.dynamics_url) == 1
        assert await set_up_d365(emu.dynamics_url) == 0
