"""Where and how to reach each target API: one frozen model per target."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from crmsync.targets._transport import HttpClient


class DynamicsTarget(BaseModel):
    """Where and how to reach a Dynamics 365 / Dataverse Web API."""

    model_config = ConfigDict(frozen=True)

    url: str = Field(description="Base URL of the org, e.g. https://contoso.crm.dynamics.com")
    api_version: str = "v9.2"
    tenant: str = "local"
    client_id: str = "crmsync-local"
    client_secret: SecretStr = SecretStr("crmsync-local")
    authority: str | None = Field(
        default=None,
        description="OAuth2 authority; None → login.microsoftonline.com/{tenant} for a real org, "
        "or {url}/{tenant} for the local emulator",
    )
    scope: str | None = Field(default=None, description="None → {url}/.default")
    max_concurrency: int = Field(default=16, ge=1, le=52)
    timeout_s: float = Field(default=30.0, gt=0)
    http_client: HttpClient = Field(
        default="aiohttp", description="the HTTP client requests go through: aiohttp or httpx"
    )


class CampaignTarget(BaseModel):
    """Where and how to reach an Adobe Campaign Standard REST API."""

    model_config = ConfigDict(frozen=True)

    url: str = Field(description="Base URL without the org, e.g. https://mc.adobe.io")
    org: str = "local"
    client_id: str = "crmsync-local"
    client_secret: SecretStr = SecretStr("crmsync-local")
    ims_url: str | None = Field(
        default=None, description="IMS base URL; None → the same host as url (the emulator)"
    )
    scope: str = "openid,AdobeID,read_organizations,additional_info.projectedProductContext"
    max_concurrency: int = Field(default=16, ge=1, le=256)
    timeout_s: float = Field(default=30.0, gt=0)
    http_client: HttpClient = Field(
        default="aiohttp", description="the HTTP client requests go through: aiohttp or httpx"
    )
