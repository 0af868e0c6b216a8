"""The one backoff formula every retry loop of crmsync waits by (clients, runtime, source)."""

from __future__ import annotations

import random

#: Doublings stop here (0.5 s base → 512 s): the cap is reached long before, and the power of an
#: attempt count that grows while a target stays down never overflows.
_MAX_DOUBLINGS = 10


def backoff(attempt: int, *, base_s: float = 0.5, cap_s: float) -> float:
    """The wait after failed try number ``attempt`` (1-based) when the server named none.

    Capped exponential backoff with "equal jitter": ``min(cap, base * 2**(attempt-1))`` scaled by
    a random factor in [0.5, 1], so a wait is never less than half its ceiling and a few tries do
    span an outage, while retries of many clients spread out.
    """
    doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
    ceiling = min(cap_s, base_s * 2.0**doublings)
    return float(ceiling * random.uniform(0.5, 1.0))
