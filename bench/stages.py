"""CPU per record by stage of the worker (decode, map, batch/ack, fetch), from a py-spy profile.

`py-spy record --format raw` samples every thread of the process at a fixed rate; each sample's
stack is put into the first stage (innermost frame first) whose function it passes through, and
a sample whose innermost frame waits in the event loop's selector is idle. The measured CPU per
record is shared out in proportion to the busy samples, so the stages add up to it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

#: Stage → functions (py-spy's "Class.method (path" prefix) whose samples it owns; looked up from
#: the innermost frame out, so a decode inside the runtime's planning counts as decode.
STAGES: dict[str, tuple[str, ...]] = {
    "decode": ("EventSchema.decode ", "RegistryCodec.decode "),
    "map": ("StatelessWorkflow.plan ", "OptInOut.plan "),
    "batch/ack": ("WorkflowRuntime.handle_fetched ", "WorkflowRuntime.tick "),
    "fetch": ("Fetcher._fetcher ", "WorkerThread.run "),
    "bench probe": ("_lag ", "_written "),
}
_IDLE = re.compile(r"^(?:\w+Selector\.select|select|epoll_wait|poll) ")


def classify(frames: list[str]) -> str:
    """The stage of one sample (outermost frame first, as py-spy writes them)."""
    if frames and _IDLE.match(frames[-1]):
        return "idle"
    for frame in reversed(frames):
        for stage, names in STAGES.items():
            if frame.startswith(names):
                return stage
    return "other"


def stage_samples(raw: str) -> Counter[str]:
    """Samples per stage of a `py-spy record --format raw` output ("f1;f2;...;fn count")."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[classify(stack.split(";"))] += int(count)
    return counts


def per_record(counts: Counter[str], cpu_us_per_record: float) -> dict[str, float]:
    """CPU µs per record by stage: the measured figure shared out by busy samples."""
    busy = {stage: n for stage, n in counts.items() if stage != "idle"}
    total = sum(busy.values())
    if not total:
        return {}
    order = [*STAGES, "other"]
    return {stage: cpu_us_per_record * busy.get(stage, 0) / total for stage in order}


def available() -> str | None:
    """The py-spy executable, when installed (`pip install py-spy`)."""
    return shutil.which("py-spy") or shutil.which(str(Path(sys.executable).with_name("py-spy")))


class Profile:
    """A running py-spy sampling this process; `stop()` returns the raw samples."""

    def __init__(self, executable: str, rate: int = 250) -> None:
        self._out = Path(tempfile.mkstemp(prefix="crmsync-profile-", suffix=".txt")[1])
        # --nonblocking: the process is never paused to be sampled (its CPU is what is measured).
        self._spy = subprocess.Popen(
            [
                executable,
                "record",
                "--pid",
                str(os.getpid()),
                "--rate",
                str(rate),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self._out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> str:
        with contextlib.suppress(ProcessLookupError):
            self._spy.send_signal(signal.SIGINT)
        _, err = self._spy.communicate(timeout=60)
        try:
            raw = self._out.read_text()
        finally:
            self._out.unlink(missing_ok=True)
        if not raw and self._spy.returncode:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace').strip()}")
        return raw


@contextlib.contextmanager
def profiled(executable: str | None) -> Iterator[list[str]]:
    """Samples this process inside the block (nothing when `executable` is None); the raw
    samples are appended to the yielded list."""
    result: list[str] = []
    profile = Profile(executable) if executable else None
    try:
        yield result
    finally:
        if profile is not None:
            result.append(profile.stop())
