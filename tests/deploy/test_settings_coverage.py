"""Settings ↔ deploy files: every variable the manifests set is a crmsync setting, every process
gets what production needs, secrets come from Secrets, and every setting is documented."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from crmsync.streams.settings import Settings
from tests.deploy.manifests import (
    COMPOSE_FILE,
    K8S,
    ROOT,
    container_env,
    dockerfile_env,
    dockerfile_instructions,
    interpolate,
    is_crmsync,
    load_documents,
    pod_containers,
    render,
    secret_env_names,
    settings_env_names,
)

KAFKA = {"KAFKA_BOOTSTRAP_SERVERS"}
DYNAMICS = {
    "CRMSYNC_DYNAMICS_URL", "CRMSYNC_DYNAMICS_TENANT", "CRMSYNC_DYNAMICS_CLIENT_ID",
    "CRMSYNC_DYNAMICS_CLIENT_SECRET",
}  # fmt: skip
CAMPAIGN = {
    "CRMSYNC_CAMPAIGN_URL", "CRMSYNC_CAMPAIGN_ORG", "CRMSYNC_CAMPAIGN_CLIENT_ID",
    "CRMSYNC_CAMPAIGN_CLIENT_SECRET",
}  # fmt: skip
# What each process cannot do without in production (their defaults point at 127.0.0.1).
REQUIRED = {
    "worker": KAFKA | DYNAMICS | CAMPAIGN,
    "source": KAFKA | DYNAMICS,
    "control": KAFKA | {"CRMSYNC_ADMIN_TOKEN", "CRMSYNC_HTTP_HOST"},
    "topics": KAFKA | {"CRMSYNC_TOPIC_PARTITIONS", "CRMSYNC_TOPIC_REPLICATION"},
    "emulators": set(),
}


def _processes() -> Iterator[tuple[str, str, dict[str, str | None], set[str], set[str]]]:
    """(where, command, environment, names from Secrets, names from ConfigMaps/plain values)."""
    image_env = {k: v for k, v in dockerfile_env(dockerfile_instructions()).items()}
    (compose,) = load_documents(COMPOSE_FILE)
    for name, service in compose["services"].items():
        if is_crmsync(service.get("image", "")):
            env = {k: interpolate(str(v)) for k, v in (service.get("environment") or {}).items()}
            yield f"compose {name}", service["command"][0], {**image_env, **env}, set(), set()
    for overlay in ("base", "overlays/local"):
        objects = render(K8S / overlay)
        for obj in objects:
            for container in pod_containers(obj):
                if is_crmsync(container["image"]):
                    resolved = container_env(container, objects)
                    plain = set(resolved.values) - resolved.from_secret
                    yield (
                        f"k8s {overlay} {obj['metadata']['name']}",
                        container["args"][0],
                        {**image_env, **resolved.values},
                        resolved.from_secret,
                        plain,
                    )


PROCESSES = list(_processes())
IDS = [where for where, *_ in PROCESSES]


def test_the_image_sets_only_settings() -> None:
    known = settings_env_names()
    env = dockerfile_env(dockerfile_instructions())
    ours = {name for name in env if name.startswith(("CRMSYNC_", "KAFKA_"))}
    assert ours and ours <= set(known), ours - set(known)


def test_every_config_map_key_is_a_setting() -> None:
    known = settings_env_names()
    for overlay in ("base", "overlays/local"):
        for obj in render(K8S / overlay):
            if obj["kind"] in ("ConfigMap", "Secret") and obj["metadata"]["name"].startswith(
                "crmsync"
            ):
                keys = set(obj.get("data", {})) | set(obj.get("stringData", {}))
                assert keys <= set(known), (obj["metadata"]["name"], keys - set(known))


@pytest.mark.parametrize(("where", "command", "env", "secret", "plain"), PROCESSES, ids=IDS)
def test_every_variable_is_a_setting_and_production_needs_are_set(
    where: str, command: str, env: dict[str, str | None], secret: set[str], plain: set[str]
) -> None:
    known = settings_env_names()
    ours = {
        name
        for name in env
        if not name.startswith("PYTHON") and name != "PIP_DISABLE_PIP_VERSION_CHECK"
    }
    assert ours <= set(known), f"{where}: not crmsync settings: {sorted(ours - set(known))}"
    missing = REQUIRED[command] - {name for name, value in env.items() if value != ""}
    assert not missing, f"{where}: {command} needs {sorted(missing)}"
    if command == "control":
        assert env["CRMSYNC_HTTP_HOST"] == "0.0.0.0", f"{where}: unreachable from outside the pod"


@pytest.mark.parametrize(("where", "command", "env", "secret", "plain"), PROCESSES, ids=IDS)
def test_every_environment_makes_a_valid_settings_object(
    where: str,
    command: str,
    env: dict[str, str | None],
    secret: set[str],
    plain: set[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, "from-the-cluster" if value is None else value)
    try:
        Settings()
    except ValidationError as error:
        pytest.fail(f"{where}: {error}")


def test_secrets_come_from_kubernetes_secrets() -> None:
    secrets = secret_env_names()
    assert {"CRMSYNC_DYNAMICS_CLIENT_SECRET", "CRMSYNC_ADMIN_TOKEN"} <= secrets
    for where, _, _, _, plain in PROCESSES:
        if where.startswith("k8s"):
            assert not plain & secrets, f"{where}: {sorted(plain & secrets)} outside a Secret"


def test_every_setting_is_documented_for_operators() -> None:
    """The settings table of docs/operations.md names every variable Settings reads."""
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    missing = sorted(name for name in settings_env_names() if f"`{name}`" not in guide)
    missing = [m for m in missing if m != "CRMSYNC_KAFKA_BOOTSTRAP_SERVERS"]  # an alias
    assert not missing, f"document these in docs/operations.md (Settings): {missing}"
