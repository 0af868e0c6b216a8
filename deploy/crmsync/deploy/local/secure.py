"""The local cluster with SASL/SCRAM and crmsync's ACLs (`crmsync kafka run --brokers 3
--secure`): one SCRAM principal per component of deploy/kafka/acls.yaml, and a superuser."""

from __future__ import annotations

import itertools
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

#: The principal the brokers use among themselves and the one that creates topics and ACLs.
SUPERUSER = "crmsync-superuser"
MECHANISM = "SCRAM-SHA-256"
ACL_FILE = Path(__file__).resolve().parents[3] / "kafka" / "acls.yaml"

Acls = Mapping[str, Sequence[Mapping[str, Any]]]


def load_acls(path: Path = ACL_FILE) -> Acls:
    principals: Acls = yaml.safe_load(path.read_text())["principals"]
    return principals


def passwords(data_dir: Path, principals: Sequence[str]) -> dict[str, str]:
    """Each principal's password, made once and kept 0600 in the cluster's data folder."""
    path = data_dir / "scram-passwords.json"
    kept: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    wanted = {name: kept.get(name) or secrets.token_hex(16) for name in (SUPERUSER, *principals)}
    if wanted != kept:
        data_dir.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with os.fdopen(os.open(path, flags, 0o600), "w") as out:
            json.dump(wanted, out)
    return wanted


def broker_settings(port: int, controller_port: int, superuser_password: str) -> dict[str, str]:
    """Clients and brokers speak SASL_PLAINTEXT/SCRAM; the controller listener (loopback only)
    stays PLAINTEXT, its ANONYMOUS principal a superuser as KRaft needs."""
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{SUPERUSER}" password="{superuser_password}";'
    )
    return {
        "listeners": f"SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{port}",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        f"listener.name.sasl_plaintext.{MECHANISM.lower()}.sasl.jaas.config": jaas,
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{SUPERUSER};User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": "false",
    }


def scram_format_args(kept: Mapping[str, str]) -> list[str]:
    """`kafka-storage format` arguments that create every principal's SCRAM credentials."""
    return list(
        itertools.chain.from_iterable(
            ("--add-scram", f"{MECHANISM}=[name={name},password={password}]")
            for name, password in kept.items()
        )
    )


def client_options(principal: str, password: str) -> dict[str, Any]:
    """aiokafka options of a client that signs in as `principal`."""
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": MECHANISM,
        "sasl_plain_username": principal,
        "sasl_plain_password": password,
    }


def acl_commands(acls: Acls, principals: Sequence[str] | None = None) -> list[list[str]]:
    """`kafka-acls --add` arguments: one call per principal, pattern and set of operations
    (a call takes many resources), so a few JVM starts apply the whole set."""
    calls: dict[tuple[str, str, tuple[str, ...]], list[tuple[str, str]]] = {}
    for principal, entries in acls.items():
        if principals is not None and principal not in principals:
            continue
        for entry in entries:
            key = (principal, str(entry["pattern"]), tuple(entry["operations"]))
            calls.setdefault(key, []).append((str(entry["resource"]), str(entry["name"])))
    commands = []
    for (principal, pattern, operations), resources in calls.items():
        args = ["--add", "--allow-principal", f"User:{principal}"]
        args += itertools.chain.from_iterable(("--operation", op) for op in operations)
        for resource, name in resources:
            args += ["--cluster"] if resource == "cluster" else [f"--{resource}", name]
        args += ["--resource-pattern-type", pattern]
        commands.append(args)
    return commands


def command_config(data_dir: Path, superuser_password: str) -> Path:
    """The admin client properties Kafka's tools sign in with (0600)."""
    path = data_dir / "superuser.properties"
    text = (
        "security.protocol=SASL_PLAINTEXT\n"
        f"sasl.mechanism={MECHANISM}\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{SUPERUSER}" password="{superuser_password}";\n'
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    with os.fdopen(os.open(path, flags, 0o600), "w") as out:
        out.write(text)
    return path
