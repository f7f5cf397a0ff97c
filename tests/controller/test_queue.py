"""The work queue: dedup, one key per worker, delayed adds, per-key backoff; checked by state, not timing."""

from __future__ import annotations

import asyncio
import random

import pytest

from controller.backoff import Backoff, exponential_delay
from controller.queue import WorkQueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_key_added_many_times_is_handed_out_once() -> None:
    queue = WorkQueue()
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert await queue.get() == "a"
    assert await queue.get() == "b"
    assert len(queue) == 0


async def test_a_key_added_while_processing_waits_for_done_then_comes_back_once() -> None:
    queue = WorkQueue()
    queue.add("a")
    key = await queue.get()
    assert key == "a"
    queue.add("a")
    queue.add("a")
    # Not handed to a second worker while the first holds it.
    assert len(queue) == 0
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not second.done()
    queue.done("a")
    assert await asyncio.wait_for(second, 1) == "a"
    queue.done("a")
    assert len(queue) == 0


async def test_concurrent_workers_never_hold_the_same_key() -> None:
    queue = WorkQueue()
    holding: set[str] = set()
    overlaps: list[str] = []
    processed: list[str] = []

    async def worker() -> None:
        while (key := await queue.get()) is not None:
            if key in holding:
                overlaps.append(key)
            holding.add(key)
            await asyncio.sleep(0.001)
            processed.append(key)
            holding.discard(key)
            queue.done(key)

    workers = [asyncio.create_task(worker()) for _ in range(4)]
    for round_ in range(20):
        for key in ("a", "b", "c"):
            queue.add(key)
        if round_ % 3 == 0:
            await asyncio.sleep(0.002)
    while len(queue) or queue.processing:
        await asyncio.sleep(0.005)
    queue.shut_down()
    await asyncio.wait_for(asyncio.gather(*workers), 2)
    assert overlaps == []
    assert set(processed) == {"a", "b", "c"}


async def test_delayed_add_arrives_when_due_and_keeps_the_earliest_time() -> None:
    clock = FakeClock()
    queue = WorkQueue(clock=clock)
    queue.add_after("a", 10.0)
    queue.add_after("a", 30.0)  # later: ignored
    queue.add_after("b", 5.0)
    assert len(queue) == 0 and queue.delayed == 2
    clock.now += 5.0
    assert len(queue) == 1
    assert await queue.get() == "b"
    clock.now += 5.0
    assert await asyncio.wait_for(queue.get(), 1) == "a"
    clock.now += 100.0
    assert len(queue) == 0  # the superseded 30 s entry does not add it again


async def test_get_wakes_for_a_delayed_key_without_another_add() -> None:
    queue = WorkQueue()
    queue.add_after("a", 0.02)
    assert await asyncio.wait_for(queue.get(), 2) == "a"


async def test_failing_key_backs_off_exponentially_and_success_resets_it() -> None:
    queue = WorkQueue(backoff=Backoff(base=1.0, cap=8.0, jitter=0.0))
    delays = [queue.add_rate_limited("a") for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert queue.failures("a") == 5
    queue.forget("a")
    assert queue.failures("a") == 0
    assert queue.add_rate_limited("a") == 1.0


def test_jitter_keeps_delays_within_the_band_below_the_ceiling() -> None:
    rng = random.Random(7)
    draws = [exponential_delay(3, base=1.0, cap=100.0, jitter=0.5, rng=rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in draws)
    assert len({round(d, 6) for d in draws}) > 100


async def test_shut_down_releases_waiting_workers() -> None:
    queue = WorkQueue()
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.shut_down()
    assert await asyncio.wait_for(waiter, 1) is None
    queue.add("a")
    assert await queue.get() is None


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0.0)
    with pytest.raises(ValueError):
        Backoff(base=1.0, cap=10.0, jitter=1.0)


async def test_an_urgent_key_is_handed_out_before_the_resync_backlog_and_only_once() -> None:
    queue = WorkQueue()
    for i in range(100):
        queue.add(f"k{i}")
    queue.add("k50", urgent=True)  # already waiting: it moves up
    queue.add("new", urgent=True)
    assert len(queue) == 101
    got = [await queue.get() for _ in range(101)]
    assert got[:2] == ["k50", "new"]
    assert sorted(got) == sorted([f"k{i}" for i in range(100)] + ["new"])
    assert len(queue) == 0
