"""Leader election on a real Redis: one leader, fenced writes, prompt step-down, takeover after a crash."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import Phase, SessionSpec, SessionStatus
from api.store_controller import ControllerStore
from controller.leader import LeaderElector, LeaderTiming
from tests.controller.world import renewals
from tests.store import Store

FAST = LeaderTiming(lease_seconds=1.0, renew_deadline_seconds=0.6, retry_period_seconds=0.1)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(elector: LeaderElector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(elector.run())
    try:
        yield task
    finally:
        elector.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_only_one_of_two_candidates_leads(redis_client: aioredis.Redis) -> None:
    a = LeaderElector(ControllerStore(redis_client), holder_id="a", timing=FAST)
    b = LeaderElector(ControllerStore(redis_client), holder_id="b", timing=FAST)
    async with running(a), running(b):
        await until(lambda: a.is_leader() or b.is_leader())
        for _ in range(20):
            assert a.is_leader() != b.is_leader()
            await asyncio.sleep(0.05)
        leader, standby = (a, b) if a.is_leader() else (b, a)
        assert standby.current_holder == leader.holder_id


async def test_each_term_gets_a_larger_fencing_token(redis_client: aioredis.Redis) -> None:
    a = LeaderElector(ControllerStore(redis_client), holder_id="a", timing=FAST)
    async with running(a):
        await until(a.is_leader)
        first = a.token
    b = LeaderElector(ControllerStore(redis_client), holder_id="b", timing=FAST)
    async with running(b):
        await until(b.is_leader)
        assert first is not None and b.token is not None and b.token > first


async def test_a_stale_leader_cannot_write_status_after_a_new_leader_took_over(
    redis_client: aioredis.Redis,
) -> None:
    store = Store(redis_client)
    await store.create_or_get(store.new_session("s1", SessionSpec(prompt="p")))
    old = LeaderElector(ControllerStore(redis_client), holder_id="old", timing=FAST)
    async with running(old):
        await until(old.is_leader)
        stale_fence = old.fence
    assert stale_fence is not None
    new = LeaderElector(ControllerStore(redis_client), holder_id="new", timing=FAST)
    async with running(new):
        await until(new.is_leader)
        assert new.fence is not None
        assert (
            await store.write_status("s1", SessionStatus(phase=Phase.RUNNING), fence=stale_fence) == "fenced"
        )
        assert (
            await store.write_status("s1", SessionStatus(phase=Phase.RUNNING), fence=new.fence) == "written"
        )


async def test_leader_that_cannot_renew_steps_down_before_its_lease_expires(
    redis_client: aioredis.Redis,
) -> None:
    stopped = asyncio.Event()

    async def on_stopped() -> None:
        stopped.set()

    a = LeaderElector(ControllerStore(redis_client), holder_id="a", timing=FAST, on_stopped=on_stopped)
    async with running(a):
        await until(a.is_leader)
        # Freeze Redis for this client: every renew now times out.
        blocker = aioredis.Redis.from_url(_url(redis_client))
        pause_ms = 3000
        await blocker.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(5):
                await stopped.wait()
            assert not a.is_leader()
            assert a.remaining() == 0.0
        finally:
            await blocker.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
            await blocker.aclose()


async def test_standby_takes_over_after_the_leader_dies_without_releasing(
    redis_client: aioredis.Redis,
) -> None:
    a = LeaderElector(ControllerStore(redis_client), holder_id="a", timing=FAST)
    task = asyncio.create_task(a.run())
    await until(a.is_leader)
    b = LeaderElector(ControllerStore(redis_client), holder_id="b", timing=FAST)
    async with running(b):
        # b has campaigned (it saw a holding the lease) and a has renewed since: b had its chance.
        await until(lambda: b.current_holder == "a")
        await renewals(redis_client, 2)
        assert not b.is_leader()
        # A crash: the task dies, nothing is released (we skip run()'s finally by cancelling the
        # renew loop after removing its ability to release).
        a._value = "not-ours-any-more"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await redis_client.exists(keys.LEADER)
        await until(b.is_leader, timeout=FAST.lease_seconds * 5)
        assert b.current_holder == "b"


async def test_release_on_stop_lets_the_standby_lead_at_once(redis_client: aioredis.Redis) -> None:
    a = LeaderElector(ControllerStore(redis_client), holder_id="a", timing=LeaderTiming(30.0, 20.0, 0.1))
    b = LeaderElector(ControllerStore(redis_client), holder_id="b", timing=LeaderTiming(30.0, 20.0, 0.1))
    async with running(a):
        await until(a.is_leader)
    assert not await redis_client.exists(keys.LEADER)
    async with running(b):
        # Far sooner than the 30 s lease: the lease was released, not left to expire.
        await until(b.is_leader, timeout=5)


def test_timing_must_step_down_before_the_lease_ends() -> None:
    with pytest.raises(ValueError):
        LeaderTiming(lease_seconds=10, renew_deadline_seconds=10, retry_period_seconds=1)
    with pytest.raises(ValueError):
        LeaderTiming(lease_seconds=10, renew_deadline_seconds=5, retry_period_seconds=6)


def _url(client: aioredis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"
