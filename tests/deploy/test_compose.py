"""deploy/compose: valid against the Compose Specification's schema, and a sound cluster."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from crmsync.streams.catalog import NAMES as WORKFLOWS
from tests.deploy.manifests import COMPOSE_FILE, is_crmsync, load_documents

Compose = dict[str, Any]


def compose_schema() -> Any:
    """The compose-spec JSON schema that check-jsonschema ships (read as a file: no network, and
    no import of check-jsonschema, whose CLI wants a newer click than Faust allows)."""
    path = metadata.distribution("check-jsonschema").locate_file(
        "check_jsonschema/builtin_schemas/vendor/compose-spec.json"
    )
    return json.loads(Path(str(path)).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> Compose:
    (document,) = load_documents(COMPOSE_FILE)
    return document


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def test_the_file_validates_against_the_compose_spec(compose: Compose) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors


def test_the_schema_check_refuses_a_misspelt_key(compose: Compose) -> None:
    schema = compose_schema()
    broken = json.loads(json.dumps(compose))
    broken["services"]["control"]["helthcheck"] = broken["services"]["control"].pop("healthcheck")
    assert not jsonschema.validators.validator_for(schema)(schema).is_valid(broken)


def _kafka_services(compose: Compose) -> dict[str, Any]:
    return {
        n: s
        for n, s in compose["services"].items()
        if s.get("image", "").startswith("apache/kafka:")
    }


def test_three_kraft_nodes_of_a_pinned_apache_kafka_4(compose: Compose) -> None:
    kafka = _kafka_services(compose)
    assert len(kafka) == 3
    node_ids, voters = set(), set()
    for name, service in kafka.items():
        tag = service["image"].partition(":")[2]
        assert re.fullmatch(r"4\.\d+\.\d+", tag), f"{name}: pin a 4.x release, not {tag!r}"
        env = service["environment"]
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        node_ids.add(env["KAFKA_NODE_ID"])
        voters.add(env["KAFKA_CONTROLLER_QUORUM_VOTERS"])
        assert f"PLAINTEXT://{name}:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
        assert service["healthcheck"]["test"]
        volume, _, target = service["volumes"][0].partition(":")
        assert target == env["KAFKA_LOG_DIRS"] and volume in compose["volumes"]
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == 2
    assert node_ids == {1, 2, 3}
    (quorum,) = voters
    assert quorum == ",".join(f"{i}@kafka-{i}:9093" for i in (1, 2, 3))
    assert len({s["environment"]["CLUSTER_ID"] for s in kafka.values()}) == 1


def _crmsync_services(compose: Compose) -> dict[str, Any]:
    return {n: s for n, s in compose["services"].items() if is_crmsync(s.get("image", ""))}


def test_crmsync_services_use_the_cluster_and_wait_for_the_topics(compose: Compose) -> None:
    kafka = _kafka_services(compose)
    topics = compose["services"]["topics"]
    assert topics["command"][:2] == ["topics", "create"]
    assert all(
        condition["condition"] == "service_healthy" for condition in topics["depends_on"].values()
    )
    assert set(topics["depends_on"]) == set(kafka)
    for name, service in _crmsync_services(compose).items():
        if service["command"][0] == "emulators":
            continue
        servers = service["environment"]["KAFKA_BOOTSTRAP_SERVERS"].split(",")
        assert servers == [f"{k}:9092" for k in sorted(kafka)], name
        if name != "topics":
            assert (
                service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
            ), name


def test_workers_per_workflow_control_and_source(compose: Compose) -> None:
    services = _crmsync_services(compose)
    commands = {tuple(s["command"]): (n, s) for n, s in services.items()}
    partitions = int(services["control"]["environment"]["CRMSYNC_TOPIC_PARTITIONS"])
    for workflow in WORKFLOWS:
        name, worker = commands[("worker", workflow)]
        assert 1 <= worker["deploy"]["replicas"] <= partitions, name
        assert _seconds(worker["stop_grace_period"]) >= 60, name
    _, source = commands[("source", "d365")]
    assert source["deploy"]["replicas"] == 1
    _, control = commands[("control",)]
    assert "127.0.0.1:8080:8080" in control["ports"]
    assert control["environment"]["CRMSYNC_HTTP_HOST"] == "0.0.0.0"
    assert control["healthcheck"]["test"] == ["CMD", "crmsync-healthcheck"]


def test_the_emulators_are_reachable_on_the_compose_network(compose: Compose) -> None:
    """They listen on loopback only; the gateway in their network namespace forwards to them."""
    gateway = compose["services"]["emulators-gateway"]
    assert gateway["network_mode"] == "service:emulators"
    forwarded = dict(
        re.findall(r"TCP-LISTEN:(\d+)\S* TCP:127\.0\.0\.1:(\d+)", gateway["command"][0])
    )
    assert forwarded == {"18081": "8081", "18082": "8082"}
    env = compose["services"]["control"]["environment"]
    assert env["CRMSYNC_DYNAMICS_URL"] == "http://emulators:18081"
    assert env["CRMSYNC_CAMPAIGN_URL"] == "http://emulators:18082"
