"""deploy/k8s: the base and the local overlay render and validate against the Kubernetes schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from crmsync.streams import catalog
from crmsync.streams.catalog import NAMES as WORKFLOWS
from tests.deploy.manifests import (
    K8S,
    Obj,
    UnsupportedKustomization,
    container_env,
    find,
    is_crmsync,
    load_documents,
    pod_containers,
    pod_spec,
    render,
)

# The oldest Kubernetes these manifests claim (policy/v1 PDBs, seccompProfile fields) and the
# newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-v2.20.2-scaledobject.json"
# Every metadata key of KEDA's `kafka` scaler (kedacore/keda v2.20.2, pkg/scalers/kafka_scaler.go);
# `<key>FromEnv` reads the value from the scale target's container environment.
KAFKA_SCALER_KEYS = {
    "bootstrapServers", "consumerGroup", "topic", "partitionLimitation", "lagThreshold",
    "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers", "excludePersistentLag",
    "scaleToZeroOnInvalidOffset", "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions", "version", "tls", "unsafeSsl", "sasl",
    "saslTokenProvider", "awsRegion",
}  # fmt: skip
KAFKA_SCALER_FROM_ENV = {"bootstrapServers", "consumerGroup", "topic"}
OVERLAYS = {"base": K8S / "base", "local": K8S / "overlays" / "local"}


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(OVERLAYS[request.param])


def test_every_yaml_file_parses() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        for document in load_documents(path):
            assert isinstance(document, dict), path
            assert "apiVersion" in document and "kind" in document, path


def test_the_local_overlay_renders_onto_the_base() -> None:
    base, local = render(OVERLAYS["base"]), render(OVERLAYS["local"])
    assert len(local) > len(base)  # kafka + emulators
    settings = find(local, "ConfigMap", "crmsync-settings")["data"]
    assert settings["KAFKA_BOOTSTRAP_SERVERS"] == "kafka-0.kafka:9092"
    assert settings["CRMSYNC_DYNAMICS_URL"] == "http://emulators:8081"
    # Keys the overlay does not patch keep the base's values.
    assert settings["CRMSYNC_TOPIC_PARTITIONS"] == "6"
    assert all(obj["metadata"]["namespace"] == "crmsync-local" for obj in local)
    images = {c["image"] for obj in local for c in pod_containers(obj) if is_crmsync(c["image"])}
    assert images == {"crmsync:local"}


def test_kubernetes_objects_validate_against_their_schemas(rendered: list[Obj]) -> None:
    """Strict schemas: an unknown or misspelt field fails, as with server-side field validation."""
    native = [obj for obj in rendered if not obj["apiVersion"].startswith("keda.sh/")]
    assert {obj["kind"] for obj in native} >= {
        "Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "ServiceAccount",
    }  # fmt: skip
    for version in KUBERNETES_VERSIONS:
        for obj in native:
            kubernetes_validate.validate(obj, version, strict=True)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused where it lists properties (the API server's
    strict field validation; pruning would silently drop them instead)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def test_scaled_objects_validate_against_the_keda_crd_schema(rendered: list[Obj]) -> None:
    schema = _strict(json.loads(KEDA_SCHEMA.read_text()))
    validator = jsonschema.Draft7Validator(schema)
    scaled = [obj for obj in rendered if obj["kind"] == "ScaledObject"]
    assert len(scaled) == len(WORKFLOWS)
    for obj in scaled:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
        assert not errors, (obj["metadata"]["name"], errors)


def _partitions(objects: list[Obj]) -> int:
    return int(find(objects, "ConfigMap", "crmsync-settings")["data"]["CRMSYNC_TOPIC_PARTITIONS"])


def _args(obj: Obj) -> list[str]:
    containers = [c for c in pod_containers(obj) if is_crmsync(c["image"])]
    return list(containers[0].get("args", [])) if containers else []


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_each_workflow_has_a_deployment_a_budget_and_a_lag_scaler(
    rendered: list[Obj], workflow: str
) -> None:
    partitions = _partitions(rendered)
    deployment = find(rendered, "Deployment", f"crmsync-worker-{workflow}")
    assert _args(deployment) == ["worker", workflow]
    assert 1 <= deployment["spec"]["replicas"] <= partitions
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= 60  # type: ignore[index]
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    budget = find(rendered, "PodDisruptionBudget", f"crmsync-worker-{workflow}")
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    others = [
        find(rendered, "Deployment", f"crmsync-worker-{other}")
        for other in WORKFLOWS
        if other != workflow
    ]
    assert all(
        not selector.items() <= o["spec"]["template"]["metadata"]["labels"].items() for o in others
    )

    scaled = find(rendered, "ScaledObject", f"crmsync-worker-{workflow}")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["maxReplicaCount"] == partitions
    assert scaled["minReplicaCount"] >= 1
    container = next(c for c in pod_containers(deployment) if is_crmsync(c["image"]))
    env = container_env(container, rendered).values
    topics = set()
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "kafka"
        metadata = trigger["metadata"]
        keys = {key.removesuffix("FromEnv") if key.endswith("FromEnv") else key for key in metadata}
        assert keys <= KAFKA_SCALER_KEYS, keys - KAFKA_SCALER_KEYS
        for key in metadata:
            if key.endswith("FromEnv"):
                assert key.removesuffix("FromEnv") in KAFKA_SCALER_FROM_ENV
                assert env.get(metadata[key]), f"{metadata[key]} is not in the worker's environment"
        assert "bootstrapServers" in keys
        assert metadata["consumerGroup"] == f"crmsync.{workflow}"
        assert int(metadata["lagThreshold"]) > 0
        assert metadata.get("offsetResetPolicy") == "earliest"  # the workers' auto_offset_reset
        assert metadata.get("allowIdleConsumers", "false") == "false"
        topics.add(metadata["topic"])
    assert topics == set(catalog.default_config(workflow).source_topics())


def test_the_control_plane_is_probed_on_its_health_endpoints(rendered: list[Obj]) -> None:
    deployment = find(rendered, "Deployment", "crmsync-control")
    assert deployment["spec"]["replicas"] == 1  # the only writer of crmsync.control
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    container = next(c for c in pod_containers(deployment) if is_crmsync(c["image"]))
    assert container["args"] == ["control"]
    env = container_env(container, rendered).values
    port = int(env["CRMSYNC_HTTP_PORT"] or 8080)
    assert env["CRMSYNC_HTTP_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == port
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        assert container[probe]["httpGet"]["path"] == path, probe
        assert container[probe]["httpGet"]["port"] in ("http", port), probe

    service = find(rendered, "Service", "crmsync-control")
    selector = service["spec"]["selector"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_the_source_is_a_singleton(rendered: list[Obj]) -> None:
    deployment = find(rendered, "Deployment", "crmsync-source-d365")
    assert _args(deployment) == ["source", "d365"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= 60  # type: ignore[index]
    assert not [
        o
        for o in rendered
        if o["kind"] == "ScaledObject"
        and o["spec"]["scaleTargetRef"]["name"] == "crmsync-source-d365"
    ]


def test_pods_run_unprivileged_with_resources(rendered: list[Obj]) -> None:
    for obj in rendered:
        spec = pod_spec(obj)
        if spec is None:
            continue
        name = obj["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in pod_containers(obj):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            assert resources["requests"]["memory"] and resources["limits"]["memory"], name
            if is_crmsync(container["image"]):
                assert context["readOnlyRootFilesystem"] is True, name
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert "/var/lib/crmsync" in mounts, f"{name}: CRMSYNC_HOME must be writable"


def test_the_checks_bite() -> None:
    """The validators refuse what they exist to refuse (so a green run means something)."""
    objects = render(OVERLAYS["base"])
    deployment = find(objects, "Deployment", "crmsync-control")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)

    scaled = find(objects, "ScaledObject", "crmsync-worker-opt-in-out")
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    validator = jsonschema.Draft7Validator(_strict(json.loads(KEDA_SCHEMA.read_text())))
    assert not validator.is_valid(scaled)


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator: []\n")
    with pytest.raises(UnsupportedKustomization):
        render(tmp_path)
    overlay = tmp_path / "overlay"  # files are read once per path: a new folder
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{K8S / 'base'}]\npatches: [{{path: p.yaml}}]\n"
    )
    (overlay / "p.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: crmsync-control}\n"
        "spec: {template: {spec: {containers: [{name: control, image: other}]}}}\n"
    )
    with pytest.raises(UnsupportedKustomization, match="list"):
        render(overlay)
