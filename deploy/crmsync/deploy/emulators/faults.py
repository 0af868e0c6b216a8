"""Fault injection shared by both emulators: latency, error rates, outages, scripted failures."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

InjectableStatus = Literal["408", "429", "500", "502", "503", "504"]
Rate = Annotated[float, Field(ge=0, le=1)]


class FailNext(BaseModel):
    """One scripted failure, consumed by the next API request."""

    model_config = ConfigDict(extra="forbid")

    status: int = Field(ge=400, le=599)
    retry_after_s: float | None = Field(default=None, ge=0, le=3600)


class FaultSpec(BaseModel):
    """Body of `POST /_admin/faults`; it replaces whatever faults were set before."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: int = Field(default=0, ge=0, le=60_000)
    error_rates: dict[InjectableStatus, Rate] = Field(default_factory=dict)
    retry_after_s: float = Field(default=1, ge=0, le=3600)
    outage_s: float = Field(default=0, ge=0, le=86_400)
    revoke_tokens: bool = False
    fail_next: list[FailNext] = Field(default_factory=list)
    seed: int | None = None
    token_lifetime_s: float | None = Field(default=None, gt=0, le=86_400 * 7)

    @model_validator(mode="after")
    def _rates_are_a_distribution(self) -> FaultSpec:
        if sum(self.error_rates.values()) > 1:
            raise ValueError("error_rates must add up to at most 1")
        return self


class Injected(NamedTuple):
    """A failure to answer instead of serving the request."""

    status: int
    retry_after_s: float | None
    reason: str


def retry_after_header(seconds: float) -> str:
    """Retry-After in whole seconds, never 0 so a client really pauses."""
    return str(max(1, math.ceil(seconds)))


class Faults:
    """The faults currently injected into one emulator."""

    def __init__(self) -> None:
        self._spec = FaultSpec()
        self._rng = random.Random()
        self._fail_next: deque[FailNext] = deque()
        self._outage_until = 0.0

    def apply(self, spec: FaultSpec) -> None:
        self._spec = spec
        self._rng = random.Random(spec.seed)
        self._fail_next = deque(spec.fail_next)
        self._outage_until = time.monotonic() + spec.outage_s if spec.outage_s else 0.0

    def clear(self) -> None:
        self.apply(FaultSpec())

    def describe(self) -> dict[str, Any]:
        state = self._spec.model_dump(exclude={"fail_next", "revoke_tokens", "outage_s"})
        state["fail_next"] = [f.model_dump() for f in self._fail_next]
        state["outage_remaining_s"] = round(max(0.0, self._outage_until - time.monotonic()), 3)
        return state

    async def delay(self, since: float | None = None) -> None:
        """The injected latency, waited while the request holds its concurrency slot: with
        ``since`` (the ``time.monotonic()`` the request arrived) the answer leaves
        ``latency_ms`` after that, its processing included, as a server that answers in that
        time does; one that took longer to process answers at once."""
        if self._spec.latency_ms:
            wait_s = self._spec.latency_ms / 1000
            if since is not None:
                wait_s -= time.monotonic() - since
            if wait_s > 0:
                await asyncio.sleep(wait_s)

    def failure(self) -> Injected | None:
        """The failure (if any) the next API request gets instead of an answer."""
        remaining = self._outage_until - time.monotonic()
        if remaining > 0:
            return Injected(503, remaining, "outage")
        if self._fail_next:
            nxt = self._fail_next.popleft()
            retry = nxt.retry_after_s
            return Injected(nxt.status, retry, "fail_next")
        if self._spec.error_rates:
            roll = self._rng.random()
            for status, rate in sorted(self._spec.error_rates.items()):
                if roll < rate:
                    retry = self._spec.retry_after_s if status == "429" else None
                    return Injected(int(status), retry, "error_rate")
                roll -= rate
        return None
