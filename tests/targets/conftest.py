"""Fixtures for tests against the local API emulators."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crmsync.deploy.emulators.server import Emulators, running_emulators


@pytest.fixture
async def emulators(tmp_path: Path) -> AsyncIterator[Emulators]:
    """Both emulators on free loopback ports over a fresh data dir.

    Attributes: dynamics_url, campaign_url (bases), tenant, org, client_id, client_secret,
    data_dir; plus dynamics_api_url, dynamics_token_url, campaign_api_url, campaign_token_url.
    """
    async with running_emulators(
        tmp_path / "emulators", dynamics_port=0, campaign_port=0
    ) as running:
        yield running
