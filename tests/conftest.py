"""Shared fixtures: one real Kafka broker per test session, unique topic names per test."""

from __future__ import annotations

import os
import random
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from crmsync.deploy.local.kafka import LocalKafka

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return int(low), int(high)


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports, below the kernel's ephemeral range.

    A cluster's nodes take consecutive ports and start one after another; a port from the
    ephemeral range can meanwhile become the local end of the first nodes' own connections."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, low - count)
        if all(_bindable(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports below {low}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` spreads tests over pytest-xdist workers (`--dist loadgroup`), each with its own
    broker. The tests of a module that share a module-scoped fixture (a running stack, a secured
    broker, a server) stay on one worker, so the fixture is set up once."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d.scope == "module" for chain in defs for d in chain):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def kafka_cache() -> Path:
    return ROOT / ".cache"


@pytest.fixture(scope="session")
def local_kafka(
    tmp_path_factory: pytest.TempPathFactory, kafka_cache: Path
) -> Iterator[LocalKafka]:
    """The session's broker, started on free ports (never the developer's 9092)."""
    kafka = LocalKafka(
        cache_dir=kafka_cache,
        data_dir=tmp_path_factory.mktemp("kafka"),
        base_port=free_port(),
        controller_base_port=free_port(),
        heap="512m",
    )
    kafka.start()
    yield kafka
    kafka.stop()


@pytest.fixture(scope="session")
def bootstrap(request: pytest.FixtureRequest) -> str:
    """Bootstrap servers of the test cluster: KAFKA_BOOTSTRAP_SERVERS, or the session's broker."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
            pytest.fail(
                "KAFKA_BOOTSTRAP_SERVERS would be shared by every pytest-xdist worker, and the "
                "tests recreate the same topics: run them one at a time (`-n 0`)"
            )
        return external
    kafka: LocalKafka = request.getfixturevalue("local_kafka")
    return kafka.bootstrap_servers


@pytest.fixture
def topic() -> str:
    """A topic name no other test uses."""
    return f"test.{uuid.uuid4().hex[:12]}"
