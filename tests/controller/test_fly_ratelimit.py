"""Token buckets with an injected clock: schedules are checked exactly, nothing sleeps."""

from __future__ import annotations

import pytest

from controller.ratelimit import KeyedRateLimiter, Limit, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_bucket_serves_its_burst_at_once_then_one_token_per_period() -> None:
    bucket = TokenBucket(Limit(rate=1.0, burst=3), now=0.0)
    waits = [bucket.reserve(0.0) for _ in range(5)]
    assert waits == [0.0, 0.0, 0.0, 1.0, 2.0]


def test_bucket_refills_with_time_but_never_above_burst() -> None:
    bucket = TokenBucket(Limit(rate=2.0, burst=3), now=0.0)
    for _ in range(3):
        bucket.reserve(0.0)
    assert bucket.tokens(0.5) == pytest.approx(1.0)
    assert bucket.tokens(100.0) == pytest.approx(3.0)


def test_reservation_over_max_wait_is_refused_without_consuming() -> None:
    bucket = TokenBucket(Limit(rate=1.0, burst=1), now=0.0)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0, max_wait=0.5) is None
    assert bucket.tokens(0.0) == pytest.approx(0.0)
    assert bucket.reserve(0.0, max_wait=1.0) == pytest.approx(1.0)


def test_drain_makes_the_next_reservation_wait_a_full_period() -> None:
    bucket = TokenBucket(Limit(rate=1.0, burst=3), now=0.0)
    bucket.drain(0.0)
    assert bucket.reserve(0.0) == pytest.approx(1.0)


def test_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Limit(rate=0.0, burst=3)
    with pytest.raises(ValueError):
        Limit(rate=1.0, burst=0)


async def test_keyed_limiter_keeps_separate_buckets_per_action_and_scope() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter({"get": Limit(5.0, 10)}, Limit(1.0, 3), clock=clock, sleep=clock.sleep)
    for _ in range(3):
        assert await limiter.acquire("start", "m1") == 0.0
    # Another machine and another action have their own full buckets.
    assert await limiter.acquire("start", "m2") == 0.0
    assert await limiter.acquire("stop", "m1") == 0.0
    assert clock.slept == []
    # The fourth start on m1 waits one period, and the wait really happens (on the fake clock).
    assert await limiter.acquire("start", "m1") == pytest.approx(1.0)
    assert clock.slept == [pytest.approx(1.0)]
    assert limiter.limit_for("get") == Limit(5.0, 10)
    assert limiter.limit_for("anything") == Limit(1.0, 3)


async def test_sustained_calls_never_exceed_the_rate_over_any_window() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter({}, Limit(1.0, 3), clock=clock, sleep=clock.sleep)
    sent_at = []
    for _ in range(20):
        await limiter.acquire("create", "app")
        sent_at.append(clock.now)
    # In any window of length w at most burst + rate*w calls go out.
    for i, start in enumerate(sent_at):
        in_window = [t for t in sent_at[i:] if t - start < 5.0]
        assert len(in_window) <= 3 + 5
    assert sent_at[-1] - sent_at[0] == pytest.approx(17.0)


async def test_acquire_over_max_wait_returns_none_and_sleeps_not() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter({}, Limit(1.0, 1), clock=clock, sleep=clock.sleep)
    await limiter.acquire("start", "m1")
    assert await limiter.acquire("start", "m1", max_wait=0.2) is None
    assert clock.slept == []


def test_penalize_empties_the_bucket() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter({}, Limit(1.0, 3), clock=clock, sleep=clock.sleep)
    limiter.penalize("start", "m1")
    assert limiter.reserve("start", "m1") == pytest.approx(1.0)


def test_idle_buckets_are_pruned_when_there_are_too_many() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter({}, Limit(1.0, 3), clock=clock, sleep=clock.sleep, max_buckets=10)
    for i in range(10):
        limiter.reserve("start", f"m{i}")
    clock.now += 10.0  # every bucket is full again
    limiter.reserve("start", "new")
    assert len(limiter) == 1


def test_replicas_sharing_an_app_limit_each_get_their_part_of_rate_and_burst() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter({}, Limit(rate=1.0, burst=3), clock=clock, sleep=clock.sleep)
    assert limiter.reserve("create", "app") == 0.0  # a bucket that exists before the change
    limiter.set_limit("create", Limit(rate=1.0, burst=3).shared(0.5))
    # Two replicas: half the rate each (2 s per token), burst 1 (saved tokens capped to it).
    waits = [limiter.reserve("create", "app") for _ in range(3)]
    assert waits == [0.0, 2.0, 4.0]
    assert limiter.reserve("start", "app/m1") == 0.0
    assert limiter.limit_for("start") == Limit(rate=1.0, burst=3)
    assert Limit(rate=1.0, burst=3).shared(0.25) == Limit(rate=0.25, burst=1)
