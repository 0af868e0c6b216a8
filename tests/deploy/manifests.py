"""Reading the deploy/ files offline: YAML, a minimal Kustomize render, the Dockerfile, settings."""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shlex
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, SecretStr

from crmsync.streams.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
IMAGE = "crmsync"

Obj = dict[str, Any]


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(path: Path) -> list[Obj]:
    """Every non-empty YAML document of a file."""
    return copy.deepcopy(_load(path))


@functools.cache
def _load(path: Path) -> list[Obj]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.load_all(stream, Loader=_Loader) if doc is not None]


# -- settings ---------------------------------------------------------------------------------


def settings_env_names() -> dict[str, str]:
    """Environment variable → Settings field, exactly as pydantic-settings reads them."""
    prefix = Settings.model_config.get("env_prefix", "")
    names: dict[str, str] = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update({str(choice).upper(): field_name for choice in alias.choices})
        elif isinstance(alias, str):
            names[alias.upper()] = field_name
        else:
            names[f"{prefix}{field_name}".upper()] = field_name
    return names


def secret_env_names() -> set[str]:
    """The variables of SecretStr fields: they belong in Secrets, never in a ConfigMap."""
    secret_fields = {
        name
        for name, field in Settings.model_fields.items()
        if SecretStr in _types_in(field.annotation)
    }
    return {env for env, field in settings_env_names().items() if field in secret_fields}


def _types_in(annotation: Any) -> set[Any]:
    args = typing.get_args(annotation)
    return {annotation} | {t for arg in args for t in _types_in(arg)} if args else {annotation}


# -- a minimal Kustomize ----------------------------------------------------------------------


class UnsupportedKustomization(Exception):
    """The kustomization uses a feature this renderer does not implement: it refuses to guess."""


_KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "replicas",
    "patches",
}


def render(directory: Path) -> list[Obj]:
    """A fresh copy of the rendered objects of a kustomization (see _render)."""
    return copy.deepcopy(_render(directory))


@functools.cache
def _render(directory: Path) -> list[Obj]:
    """Renders a kustomization with the subset of Kustomize that deploy/k8s uses.

    Supported: `resources` (files and directories with a kustomization), `patches` given as a
    file of strategic-merge patches that only merge maps (any list in a patch is refused, since
    Kustomize merges lists by per-type keys this renderer does not know), `replicas`, `images`
    (newName/newTag) and `namespace`. Anything else raises UnsupportedKustomization.
    """
    kustomization = load_documents(directory / "kustomization.yaml")[0]
    unknown = set(kustomization) - _KUSTOMIZATION_FIELDS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise UnsupportedKustomization(f"{directory}: patch {patch} (only `path:` patches)")
        for document in load_documents(directory / patch["path"]):
            _merge(find(objects, document["kind"], document["metadata"]["name"]), document)
    for replicas in kustomization.get("replicas", []):
        scalable = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "ReplicaSet")]
        find(scalable, None, replicas["name"])["spec"]["replicas"] = replicas["count"]
    for image in kustomization.get("images", []):
        if set(image) - {"name", "newName", "newTag"}:
            raise UnsupportedKustomization(f"{directory}: image {image}")
        for obj in objects:
            for container in pod_containers(obj):
                name, _, _ = container["image"].partition(":")
                if name == image["name"]:
                    tag = image.get("newTag") or container["image"].partition(":")[2]
                    name = image.get("newName", name)
                    container["image"] = f"{name}:{tag}" if tag else name
    if "namespace" in kustomization:
        for obj in objects:
            obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def _merge(target: Obj, patch: Obj, path: str = "") -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            raise UnsupportedKustomization(f"directive {key} at {path}")
        if isinstance(value, list):
            raise UnsupportedKustomization(f"list at {path}/{key}: Kustomize merges lists by key")
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, f"{path}/{key}")
        else:
            target[key] = copy.deepcopy(value)


def find(objects: list[Obj], kind: str | None, name: str) -> Obj:
    """The one object of that kind (any kind if None) and name."""
    found = [
        obj
        for obj in objects
        if obj["metadata"]["name"] == name and (kind is None or obj["kind"] == kind)
    ]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} objects {kind}/{name}, expected one")
    return found[0]


def pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return typing.cast(Obj, obj["spec"]["template"]["spec"])
    return None


def pod_containers(obj: Obj) -> Iterator[Obj]:
    spec = pod_spec(obj)
    if spec is not None:
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


def is_crmsync(image: str) -> bool:
    return image.partition(":")[0] == IMAGE


@dataclass
class ContainerEnv:
    """The environment a container gets: name → value (None where it comes from a field ref)."""

    values: dict[str, str | None]
    from_secret: set[str]
    from_configmap: set[str]


def container_env(container: Obj, objects: list[Obj]) -> ContainerEnv:
    """Resolves envFrom (ConfigMaps, Secrets in the same render) and env of one container."""
    values: dict[str, str | None] = {}
    from_secret: set[str] = set()
    from_configmap: set[str] = set()
    for source in container.get("envFrom", []):
        for kind, ref_key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if ref_key not in source:
                continue
            ref = source[ref_key]
            matches = [
                o for o in objects if o["kind"] == kind and o["metadata"]["name"] == ref["name"]
            ]
            if not matches:
                if ref.get("optional"):
                    continue
                raise AssertionError(f"{kind} {ref['name']} is referenced but not rendered")
            data = {**matches[0].get("data", {}), **matches[0].get("stringData", {})}
            values.update({key: str(value) for key, value in data.items()})
            (from_secret if kind == "Secret" else from_configmap).update(data)
    for entry in container.get("env", []):
        name = entry["name"]
        from_secret.discard(name)
        from_configmap.discard(name)
        if "value" in entry:
            values[name] = str(entry["value"])
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            secret = find(objects, "Secret", ref["name"])
            data = {**secret.get("data", {}), **secret.get("stringData", {})}
            values[name] = str(data[ref["key"]])
            from_secret.add(name)
        else:
            values[name] = None  # fieldRef, resourceFieldRef: known only in the cluster
    return ContainerEnv(values, from_secret, from_configmap)


# -- Dockerfile and .dockerignore ---------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str

    def json_args(self) -> list[str]:
        value = json.loads(self.arguments)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self.arguments
        return value


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with continuation lines joined; comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    result = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip()))
    return result


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def dockerignore_includes(relative: str, patterns: list[str]) -> bool:
    """Whether the build context keeps a path: the last matching pattern decides (as Docker does).

    Supports the pattern forms .dockerignore uses here: `**`, `**/<glob>`, and plain paths (a
    directory pattern covers everything under it), each optionally negated with `!`.
    """
    included = True
    parts = relative.split("/")
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw[1:] if negated else raw
        if pattern == "**":
            matched = True
        elif pattern.startswith("**/"):
            matched = any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        else:
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            matched = any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
        if matched:
            included = negated
    return included


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


def interpolate(value: str, placeholder: str = "x" * 32) -> str:
    """A compose value with every ${VAR...} replaced, as if the operator had set them."""
    return _INTERPOLATION.sub(placeholder, value)
