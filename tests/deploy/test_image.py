"""deploy/Dockerfile and .dockerignore, the image's health check, and the commands every
container runs: each one must be a valid `crmsync` command line."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from crmsync.control.cli import _parser
from tests.deploy.manifests import (
    COMPOSE_FILE,
    DEPLOY,
    K8S,
    ROOT,
    dockerfile_instructions,
    dockerignore_includes,
    dockerignore_patterns,
    is_crmsync,
    load_documents,
    pod_containers,
    render,
)


def _healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dockerfile_builds_a_wheel_and_runs_slim_and_unprivileged() -> None:
    instructions = dockerfile_instructions()
    stages = [i.arguments for i in instructions if i.keyword == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS builder")
    base = next(
        i.arguments
        for i in instructions
        if i.keyword == "ARG" and i.arguments.startswith("PYTHON_IMAGE=")
    )
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11(\.\d+)?-slim(-\w+)?", base), base
    second_from = [n for n, i in enumerate(instructions) if i.keyword == "FROM"][1]
    runtime = instructions[second_from:]
    runs = " ".join(i.arguments for i in runtime if i.keyword == "RUN")
    assert "--no-index" in runs and "--find-links=/wheels" in runs
    assert "[dev]" not in " ".join(i.arguments for i in instructions)
    assert "pip wheel" in " ".join(
        i.arguments for i in instructions[: len(instructions) - len(runtime)]
    )
    (user,) = [i.arguments for i in runtime if i.keyword == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (entrypoint,) = [i.json_args() for i in instructions if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["crmsync"]
    (healthcheck,) = [i.arguments for i in instructions if i.keyword == "HEALTHCHECK"]
    assert healthcheck.endswith('CMD ["crmsync-healthcheck"]')


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    patterns = dockerignore_patterns()
    sources = []
    for instruction in dockerfile_instructions():
        if instruction.keyword == "COPY" and "--from=" not in instruction.arguments:
            words = [w for w in instruction.arguments.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [f for f in files if dockerignore_includes(f.relative_to(ROOT).as_posix(), patterns)]
        assert kept, f"{source} is excluded by .dockerignore"
    # The package data the wheel needs, and nothing of the developer's machine.
    for needed in (
        "schemas/crmsync/schemas/ChangeEvent.v1.avsc",
        "deploy/crmsync/deploy/local/pom.xml",
        "control/crmsync/control/templates/index.html",
        "streams/crmsync/targets/dynamics.py",
        "README.md",
    ):
        assert dockerignore_includes(needed, patterns), needed
    for left_out in (
        ".venv/bin/python",
        ".local/admin-token",
        ".git/config",
        "tests/conftest.py",
        "streams/crmsync/streams/__pycache__/settings.cpython-311.pyc",
        "deploy/compose/compose.yaml",
        "deploy/k8s/base/workers.yaml",
        "crmsync.egg-info/PKG-INFO",
    ):
        assert not dockerignore_includes(left_out, patterns), left_out


@pytest.mark.parametrize(
    ("cmdline", "probes"),
    [
        (
            b"/usr/local/bin/python3.11\0/usr/local/bin/crmsync\0control\0",
            ["http://127.0.0.1:9000/healthz"],
        ),
        (
            b"/sbin/docker-init\0--\0crmsync\0emulators\0--data-dir\0/d\0--campaign-port\09082\0",
            ["http://127.0.0.1:8081/_admin/stats", "http://127.0.0.1:9082/_admin/stats"],
        ),
        (b"/usr/local/bin/python3.11\0/usr/local/bin/crmsync\0worker\0opt-in-out\0", []),
        (b"/usr/local/bin/python3.11\0/usr/local/bin/crmsync\0source\0d365\0", []),
    ],
)
def test_the_health_check_probes_what_the_command_serves(cmdline: bytes, probes: list[str]) -> None:
    healthcheck = _healthcheck()
    args = healthcheck.command(cmdline)
    assert healthcheck.probe_urls(args, {"CRMSYNC_HTTP_PORT": "9000"}) == probes


def _commands() -> list[tuple[str, list[str]]]:
    """Every crmsync command line that deploy/ runs: image default, compose, Kubernetes."""
    found = []
    for instruction in dockerfile_instructions():
        if instruction.keyword == "CMD":
            found.append(("Dockerfile CMD", instruction.json_args()))
    (compose,) = load_documents(COMPOSE_FILE)
    for name, service in compose["services"].items():
        if is_crmsync(service.get("image", "")):
            found.append((f"compose {name}", list(service["command"])))
    for overlay in (K8S / "base", K8S / "overlays" / "local"):
        for obj in render(overlay):
            for container in pod_containers(obj):
                if is_crmsync(container["image"]):
                    assert "command" not in container, "keep the image's ENTRYPOINT (crmsync)"
                    found.append((f"k8s {obj['metadata']['name']}", list(container["args"])))
    return found


@pytest.fixture(scope="module")
def help_commands() -> set[str]:
    """The commands `crmsync --help` lists, from the installed entry point."""
    crmsync = Path(sys.executable).with_name("crmsync")
    result = subprocess.run(
        [str(crmsync), "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    return set(re.findall(r"^    ([a-z][a-z0-9-]*)(?:\s|$)", result.stdout, flags=re.MULTILINE))


@pytest.mark.parametrize(
    ("where", "argv"), _commands(), ids=lambda v: v if isinstance(v, str) else None
)
def test_every_command_is_a_valid_crmsync_command_line(
    where: str, argv: list[str], help_commands: set[str]
) -> None:
    assert argv[0] in help_commands, f"{where}: `crmsync {argv[0]}` is not in crmsync --help"
    try:
        _parser().parse_args(argv)
    except SystemExit as usage:
        pytest.fail(f"{where}: `crmsync {' '.join(argv)}` is refused (exit {usage.code})")
