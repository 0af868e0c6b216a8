"""The one `crmsync` namespace package across the card's code folders: what a wheel installs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("schemas", "streams", "control", "deploy")


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def _source_packages() -> dict[str, Path]:
    """Every folder of Python code under the code folders, by its dotted import name."""
    found: dict[str, Path] = {}
    for folder in CODE_FOLDERS:
        base = ROOT / folder
        for module in (base / "crmsync").rglob("*.py"):
            package = module.parent.relative_to(base)
            found[".".join(package.parts)] = module.parent
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # Built from a copy of what git would check out: setuptools leaves build/ in the tree it
    # builds, and a stale build/ would put removed modules into the wheel.
    source = tmp_path_factory.mktemp("source") / "crmsync"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".cache", ".local", "build", "*.egg-info", "__pycache__", "*_cache"
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        check=True,
        timeout=240,
        capture_output=True,
    )
    (built,) = out.glob("crmsync-*.whl")
    return zipfile.ZipFile(built)


def test_the_root_shows_the_cards_folders() -> None:
    for folder in (*CODE_FOLDERS, "tests", "bench", "docs"):
        assert (ROOT / folder).is_dir(), folder
    assert not (ROOT / "crmsync").exists(), "the package lives in the code folders, not at the root"
    for folder in CODE_FOLDERS:
        # PEP 420: no folder may claim the `crmsync` name for itself.
        assert not (ROOT / folder / "crmsync" / "__init__.py").exists(), folder


def test_every_source_package_is_in_the_wheel_with_all_its_modules(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for dotted, path in _source_packages().items():
        for module in path.glob("*.py"):
            inside = "/".join([*dotted.split("."), module.name])
            assert inside in names, f"{inside} is missing from the wheel: is {dotted} packaged?"


def test_the_wheel_installs_crmsync_only_with_its_data_files(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"crmsync"}
    assert "crmsync/__init__.py" not in names
    for data in (
        "crmsync/schemas/ChangeEvent.v1.avsc",
        "crmsync/schemas/EmailEvent.v1.avsc",
        "crmsync/deploy/local/pom.xml",
        "crmsync/deploy/local/log4j2.properties",
        "crmsync/control/templates/index.html",
        "crmsync/control/static/page.js",
    ):
        assert data in names, data
    assert not [n for n in names if n.startswith("crmsync/") and "/tests/" in n]


def test_mypy_checks_every_top_level_part_of_the_package() -> None:
    tool = _pyproject()["tool"]
    assert isinstance(tool, dict)
    mypy = tool["mypy"]
    assert mypy["mypy_path"] == list(CODE_FOLDERS)
    parts = {".".join(name.split(".")[:2]) for name in _source_packages() if name != "crmsync"}
    assert parts == set(mypy["packages"]), "mypy's packages list and the code folders differ"
    missing_ok = {
        m for o in mypy["overrides"] if o.get("ignore_missing_imports") for m in o["module"]
    }
    assert {m.split(".")[0] for m in missing_ok} == {"aiokafka", "msal"}
