"""deploy/kafka/acls.yaml, the documented Kafka ACLs: every topic and group each component
touches is allowed to it, and nothing that parses records may write control or audit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crmsync.streams import catalog
from crmsync.streams.catalog import default_config
from crmsync.streams.kafka import topics
from tests.deploy.manifests import K8S, is_crmsync, load_documents, pod_containers, render

ROOT = Path(__file__).resolve().parents[2]
ACLS: dict[str, list[dict[str, Any]]] = load_documents(ROOT / "deploy" / "kafka" / "acls.yaml")[0][
    "principals"
]
DLQS = [topics.dead_letters(w) for w in catalog.NAMES]
EVERY_TOPIC = [s.name for s in catalog.topic_specs()] + DLQS


def allowed(principal: str, resource: str, name: str, operation: str) -> bool:
    """Kafka's matching: a literal name, or a prefixed pattern (All implies every operation)."""
    for acl in ACLS.get(principal, []):
        matches = (
            acl["name"] == name if acl["pattern"] == "literal" else name.startswith(acl["name"])
        )
        ops = acl["operations"]
        if acl["resource"] == resource and matches and (operation in ops or "All" in ops):
            return True
    return False


def _needs() -> list[tuple[str, str, str, str]]:
    """(principal, resource, name, operation) for what each component's code does."""
    needs = []
    for workflow in catalog.NAMES:
        worker = f"crmsync-worker-{workflow}"
        for topic in default_config(workflow).source_topics():
            needs += [(worker, "topic", topic, "Read"), ("crmsync-control", "topic", topic, "Read")]
            needs += [("crmsync-control", "topic", topic, "Write")]  # a re-drive
        needs += [
            (worker, "topic", topics.CONTROL, "Read"),
            (worker, "topic", topics.STATUS, "Write"),
            (worker, "topic", topics.dead_letters(workflow), "Write"),
            (worker, "group", f"crmsync.{workflow}", "Read"),
            *((worker, "topic", t, "Describe") for t in EVERY_TOPIC),
            ("crmsync-control", "topic", topics.dead_letters(workflow), "Read"),
            ("crmsync-control", "topic", topics.dead_letters(workflow), "Write"),  # markers
            ("crmsync-control", "group", f"crmsync.{workflow}", "Read"),  # a replay's commit
            ("crmsync-control", "group", f"crmsync.{workflow}", "Describe"),  # backlog
        ]
    needs += [
        ("crmsync-worker-opt-in-out", "topic", topics.OPTOUT_STATE, op) for op in ("Read", "Write")
    ]
    needs += [
        ("crmsync-control", "topic", t, op)
        for t in (topics.CONTROL, topics.AUDIT)
        for op in ("Read", "Write")
    ]
    needs += [("crmsync-control", "topic", topics.STATUS, "Read")]
    needs += [
        ("crmsync-source", "topic", topics.CONTROL, "Read"),
        ("crmsync-source", "topic", topics.STATUS, "Write"),
        ("crmsync-source", "topic", topics.SOURCE_OFFSETS, "Read"),
        ("crmsync-source", "topic", topics.SOURCE_OFFSETS, "Write"),
        ("crmsync-source", "topic", topics.CONTACT_CHANGES, "Write"),
        ("crmsync-source", "topic", topics.entity_changes("new_purchase"), "Write"),
    ]
    needs += [("crmsync-admin", "topic", t, "Create") for t in EVERY_TOPIC]
    return needs


@pytest.mark.parametrize("need", _needs(), ids=lambda n: "-".join(n))
def test_the_documented_acls_cover_what_each_component_touches(
    need: tuple[str, str, str, str],
) -> None:
    assert allowed(*need), f"{need[0]} may not {need[3]} {need[1]} {need[2]}"


@pytest.mark.parametrize("principal", [p for p in ACLS if p != "crmsync-control"])
@pytest.mark.parametrize("topic", [topics.CONTROL, topics.AUDIT])
def test_only_the_control_plane_writes_control_and_audit(principal: str, topic: str) -> None:
    assert not allowed(principal, "topic", topic, "Write")


def test_a_worker_writes_only_its_status_its_dead_letters_its_outcomes_and_its_state() -> None:
    for workflow in catalog.NAMES:
        worker = f"crmsync-worker-{workflow}"
        written = {t for t in EVERY_TOPIC if allowed(worker, "topic", t, "Write")}
        own = {topics.STATUS, topics.dead_letters(workflow), topics.outcomes(workflow)}
        assert written == own | ({topics.OPTOUT_STATE} if workflow == "opt-in-out" else set())


def test_the_operations_guide_points_at_the_acl_file() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "deploy/kafka/acls.yaml" in guide


def test_each_kubernetes_component_loads_its_own_kafka_principal() -> None:
    """Every Deployment's credentials come from a Secret named for a principal of the ACL set."""
    seen = set()
    for obj in render(K8S / "base"):
        for container in pod_containers(obj):
            if not is_crmsync(container["image"]) or obj["kind"] != "Deployment":
                continue
            args = container.get("args", [])
            component = "-".join(args[:2]) if args[0] == "worker" else args[0]
            secrets = {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e}
            assert f"crmsync-kafka-{component}" in secrets, (obj["metadata"]["name"], secrets)
            assert f"crmsync-{component}" in ACLS, component
            seen.add(component)
    assert seen == {"control", "source", *(f"worker-{w}" for w in catalog.NAMES)}
