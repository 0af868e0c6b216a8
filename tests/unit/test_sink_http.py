"""Retry bounds, Retry-After parsing, the client-wide 429 pause and the shared token cache."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from crmsync.targets._http import (
    RetryPolicy,
    Throttle,
    TokenCache,
    parse_retry_after,
    with_retries,
)
from crmsync.targets.errors import Fatal, Halted, RecordRejected, Retryable


def test_retry_after_is_seconds_or_an_http_date() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)

    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after(date, now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(backoff_base_s=0.5, backoff_cap_s=4)
    for attempt, ceiling in [(1, 0.5), (2, 1), (3, 2), (4, 4), (9, 4)]:
        waits = [policy.backoff(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1


async def test_retries_a_transient_failure_then_succeeds() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Retryable("503", retry_after=0.01)
        return "ok"

    assert await with_retries(RetryPolicy(attempts=5), flaky, "t") == "ok"
    assert calls == 3


async def test_gives_up_after_the_attempts_with_the_last_retryable() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise Retryable(f"down {calls}", retry_after=0.01)

    with pytest.raises(Retryable, match="down 3") as caught:
        await with_retries(RetryPolicy(attempts=3), down, "t")
    assert caught.value.retry_after == 0.01


async def test_gives_up_at_once_when_the_wait_would_pass_the_budget() -> None:
    started = time.monotonic()

    async def throttled() -> None:
        raise Retryable("429", retry_after=60)

    with pytest.raises(Retryable) as caught:
        await with_retries(RetryPolicy(attempts=10, budget_s=5), throttled, "t")
    assert time.monotonic() - started < 1
    assert caught.value.retry_after == 60  # the runtime learns how long to back off


@pytest.mark.parametrize("error", [RecordRejected("bad"), Fatal("forbidden")])
async def test_rejections_and_fatal_errors_are_not_retried(error: Exception) -> None:
    calls = 0

    async def refuse() -> None:
        nonlocal calls
        calls += 1
        raise error

    with pytest.raises(type(error)):
        await with_retries(RetryPolicy(attempts=5), refuse, "t")
    assert calls == 1


async def test_a_pause_holds_every_request_of_the_client() -> None:
    throttle = Throttle(4)
    throttle.pause(0.3)
    started = time.monotonic()

    async def request() -> float:
        async with throttle.slot():
            return time.monotonic() - started

    waited = await asyncio.gather(*(request() for _ in range(3)))
    assert min(waited) >= 0.29


async def test_a_lowered_cap_limits_requests_in_flight() -> None:
    throttle = Throttle(8)
    await throttle.set_cap(2)
    running = peak = 0

    async def request() -> None:
        nonlocal running, peak
        async with throttle.slot():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(request() for _ in range(10)))
    assert peak == 2


async def test_tokens_are_fetched_once_for_concurrent_callers_and_refreshed_once() -> None:
    fetched: list[str] = []

    async def fetch() -> tuple[str, float]:
        await asyncio.sleep(0.01)
        fetched.append(f"t{len(fetched) + 1}")
        return fetched[-1], 3600

    tokens = TokenCache(fetch)
    first = await asyncio.gather(*(tokens.get() for _ in range(5)))
    # A burst of 401s for the same token yields a single new token.
    refreshed = await asyncio.gather(*(tokens.refresh("t1") for _ in range(5)))

    assert first == ["t1"] * 5
    assert refreshed == ["t2"] * 5
    assert await tokens.get() == "t2"


async def test_a_token_is_renewed_before_it_expires() -> None:
    lifetimes = iter([0.05, 3600])
    count = 0

    async def fetch() -> tuple[str, float]:
        nonlocal count
        count += 1
        return f"t{count}", next(lifetimes)

    tokens = TokenCache(fetch)
    assert await tokens.get() == "t1"
    await asyncio.sleep(0.06)
    assert await tokens.get() == "t2"


async def test_a_cap_raised_again_restores_the_concurrency() -> None:
    throttle = Throttle(6)
    await throttle.set_cap(2)
    await throttle.set_cap(6)
    running = peak = 0

    async def request() -> None:
        nonlocal running, peak
        async with throttle.slot():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(request() for _ in range(20)))
    assert peak == 6


async def test_lowering_the_cap_while_requests_run_takes_effect_as_they_finish() -> None:
    throttle = Throttle(4)
    running = 0
    concurrency_seen: list[int] = []

    async def request() -> None:
        nonlocal running
        async with throttle.slot():
            running += 1
            concurrency_seen.append(running)
            await asyncio.sleep(0.01)
            running -= 1

    tasks = [asyncio.create_task(request()) for _ in range(12)]
    await asyncio.sleep(0.001)  # four are in flight now
    await throttle.set_cap(1)
    await asyncio.gather(*tasks)
    assert concurrency_seen[:4] == [1, 2, 3, 4]
    assert max(concurrency_seen[4:]) == 1


async def test_a_held_throttle_lets_sent_requests_finish_and_starts_no_other() -> None:
    throttle = Throttle(2)
    answered: list[int] = []

    async def request(n: int) -> int:
        async with throttle.slot():
            await asyncio.sleep(0.05)
            answered.append(n)
            return n

    requests = [asyncio.create_task(request(n)) for n in range(6)]
    await asyncio.sleep(0.01)  # two are sent, four wait for a slot
    throttle.hold()
    outcomes = await asyncio.gather(*requests, return_exceptions=True)
    assert outcomes[:2] == [0, 1] and answered == [0, 1]
    assert all(isinstance(o, Halted) for o in outcomes[2:])
    throttle.hold()  # two writes stopping side by side: held until both release
    throttle.release()
    with pytest.raises(Halted):
        await request(8)
    throttle.release()
    assert await request(9) == 9


async def test_a_halted_request_is_not_retried() -> None:
    calls = 0

    async def halted() -> str:
        nonlocal calls
        calls += 1
        raise Halted("not sent: the workflow is stopping")

    with pytest.raises(Halted):
        await with_retries(RetryPolicy(attempts=5, backoff_base_s=0.01), halted, "t")
    assert calls == 1
