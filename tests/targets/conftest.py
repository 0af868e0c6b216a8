"""Fixtures for tests against the local API emulators."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from crmsync.deploy.emulators.server import Emulators, running_emulators
from tests.integration.harness import set_up_d365


@pytest.fixture
async def emulators(tmp_path: Path) -> AsyncIterator[Emulators]:
    """Both emulators on free loopback ports over a fresh data dir, crmsync's activity tables
    created the way a user creates them (``crmsync targets setup d365``'s function).

    Attributes: dynamics_url, campaign_url (bases), tenant, org, client_id, client_secret,
    data_dir; plus dynamics_api_url, dynamics_token_url, campaign_api_url, campaign_token_url.
    """
    async with running_emulators(
        tmp_path / "emulators", dynamics_port=0, campaign_port=0
    ) as running:
        await set_up_d365(
            running.dynamics_url,
            tenant=running.tenant,
            client_id=running.client_id,
            client_secret=running.client_secret,
        )
        yield running


async def _dynamics_token(emulators: Emulators, client: httpx.AsyncClient) -> str:
    response = await client.post(
        emulators.dynamics_token_url,
        data={
            "client_id": emulators.client_id,
            "client_secret": emulators.client_secret,
            "grant_type": "client_credentials",
            "scope": f"{emulators.dynamics_url}/.default",
        },
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


async def _campaign_token(emulators: Emulators, client: httpx.AsyncClient) -> str:
    response = await client.post(
        emulators.campaign_token_url,
        data={
            "client_id": emulators.client_id,
            "client_secret": emulators.client_secret,
            "grant_type": "client_credentials",
            "scope": "openid,AdobeID,read_organizations",
        },
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


@pytest.fixture
async def emulated_dynamics(emulators: Emulators) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the Dynamics emulator's Web API root, already holding a token."""
    async with httpx.AsyncClient(timeout=10) as plain:
        token = await _dynamics_token(emulators, plain)
    async with httpx.AsyncClient(
        base_url=emulators.dynamics_api_url + "/",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
        },
        timeout=10,
    ) as client:
        yield client


@pytest.fixture
async def emulated_campaign(emulators: Emulators) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the Campaign emulator's API root, with token and API key."""
    async with httpx.AsyncClient(timeout=10) as plain:
        token = await _campaign_token(emulators, plain)
    async with httpx.AsyncClient(
        base_url=emulators.campaign_api_url + "/",
        headers={"Authorization": f"Bearer {token}", "X-Api-Key": emulators.client_id},
        timeout=10,
    ) as client:
        yield client
