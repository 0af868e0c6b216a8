#!/usr/bin/env python3
"""The container health check of the crmsync image: it probes what the running command serves."""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def command(cmdline: bytes) -> list[str]:
    """The crmsync arguments of a /proc/<pid>/cmdline: what follows the `crmsync` program."""
    argv = [part.decode() for part in cmdline.split(b"\0") if part]
    for index, part in enumerate(argv):
        if Path(part).name == "crmsync":
            return argv[index + 1 :]
    return []


def probe_urls(args: list[str], environ: dict[str, str]) -> list[str]:
    """The URLs that must answer 200 for this command; none for workers and the source."""
    positional = [arg for arg in args if not arg.startswith("-")]
    if not positional:
        return []
    if positional[0] == "control":
        port = environ.get("CRMSYNC_HTTP_PORT", "8080")
        return [f"http://127.0.0.1:{port}/healthz"]
    if positional[0] == "emulators":
        ports = {"--dynamics-port": "8081", "--campaign-port": "8082"}
        for flag in ports:
            if flag in args and args.index(flag) + 1 < len(args):
                ports[flag] = args[args.index(flag) + 1]
        return [f"http://127.0.0.1:{port}/_admin/stats" for port in ports.values()]
    return []


def main() -> int:
    args = command(Path("/proc/1/cmdline").read_bytes())
    for url in probe_urls(args, dict(os.environ)):
        try:
            with urllib.request.urlopen(url, timeout=4) as response:
                if response.status != 200:
                    print(f"unhealthy: {url} answered {response.status}", file=sys.stderr)
                    return 1
        except OSError as error:
            print(f"unhealthy: {url}: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
