"""Microsoft's Python SDK for Dataverse against the Dynamics emulator, with nothing bent but TLS.

The SDK (``PowerPlatform-Dataverse-Client``) and ``azure-identity`` accept only https URLs, as the
real services are only served over https. Rather than re-spelling URLs inside a transport, the
emulators are served over real TLS on loopback with a certificate made for this test session,
and ``REQUESTS_CA_BUNDLE`` (which ``requests``, used by both libraries, honours) trusts it. That
is the one accommodation, and it lives here: the SDK and azure-identity run unchanged, sign in
through the emulator's token endpoint with a real ``ClientSecretCredential``, and find everything
else (entity sets, keys, primary ids) through the Web API like against a real org.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from azure.identity import ClientSecretCredential
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PowerPlatform.Dataverse.client import DataverseClient

from crmsync.deploy.emulators.server import Emulators, running_emulators
from tests.integration.harness import set_up_d365


def _loopback_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crmsync emulator (tests)")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "loopback.pem", directory / "loopback.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _loopback_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def tls_emulators(
    tmp_path: Path, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Emulators]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_files[0]))  # the SDK's requests
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))  # crmsync's httpx
    async with running_emulators(
        tmp_path / "emulators", dynamics_port=0, campaign_port=0, tls=tls_files
    ) as running:
        # crmsync's activity tables, created as a user creates them on a real org.
        await set_up_d365(
            running.dynamics_url,
            tenant=running.tenant,
            client_id=running.client_id,
            client_secret=running.client_secret,
        )
        yield running
        # The SDK closed its connections from a worker thread; let the server see them go
        # (TLS closes take a few loop turns) before it stops.
        await asyncio.sleep(0.2)


@pytest.fixture
def dataverse(tls_emulators: Emulators) -> Iterator[DataverseClient]:
    """The SDK's client, signed in through the emulator's Entra-style token endpoint."""
    credential = ClientSecretCredential(
        tenant_id=tls_emulators.tenant,
        client_id=tls_emulators.client_id,
        client_secret=tls_emulators.client_secret,
        # The emulator is its own authority; azure-identity's documented option for authorities
        # it cannot look up in Microsoft's instance discovery (private clouds, Azure Stack).
        authority=tls_emulators.dynamics_url,
        disable_instance_discovery=True,
    )
    with DataverseClient(tls_emulators.dynamics_url, credential) as client:
        yield client
    credential.close()
