"""Sharded controllers: replicas split the shards, take over a dead one's, and never act together.

Shard leases and membership on a real Redis (:class:`controller.shards.ShardManager`), and whole
controllers (in-process, real Fly client, the emulator over loopback, machines as real processes).
"Never two at once" is checked on the emulator's request log: every request carries its caller
(``flyswarm-controller/<replica id>``) and its arrival and answer times, and no two replicas'
mutations of one machine may overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import Phase, SessionStatus
from api.store_controller import ControllerStore
from controller.leader import LeaderTiming
from controller.shards import ShardManager, fair_share, shard_of
from tests.controller.world import RunningController, World

pytestmark = pytest.mark.timeout(120)

FAST = LeaderTiming(lease_seconds=1.0, renew_deadline_seconds=0.6, retry_period_seconds=0.1)
SHARDS = 4
#: Controller settings of these tests: resyncs slower than the list budget shared by replicas.
CTL: dict[str, Any] = {"shards": SHARDS, "resync_seconds": 1.0}


# -- shard arithmetic ------------------------------------------------------------------------------


def test_a_session_shard_is_stable_and_the_fair_shares_add_up_to_the_count() -> None:
    # CRC-32, not Python's salted hash(): every process computes the same shard.
    assert shard_of("s1", 7) == 0x141538F0 % 7 == 1
    for count in (1, 4, 16, 17):
        for n in range(1, 6):
            members = [f"r{i}" for i in range(n)]
            shares = [fair_share(count, members, m) for m in members]
            assert sum(shares) == count
            assert max(shares) - min(shares) <= 1


# -- shard leases on Redis -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def managing(manager: ShardManager) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(manager.run())
    try:
        yield task
    finally:
        manager.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def manager(redis_client: aioredis.Redis, name: str, count: int = 8) -> ShardManager:
    return ShardManager(ControllerStore(redis_client), holder_id=name, count=count, timing=FAST)


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def disjoint_and_complete(managers: list[ShardManager], count: int) -> bool:
    held = [s for m in managers for s in m.held]
    return len(held) == len(set(held)) == count


async def test_replicas_split_the_shards_rebalance_on_join_and_take_over_after_a_crash(
    redis_client: aioredis.Redis,
) -> None:
    a, b, c = (manager(redis_client, n) for n in ("a", "b", "c"))
    overlaps: list[tuple[int, ...]] = []

    async def watch() -> None:
        # Sampled all along: no shard is ever acted on by two replicas.
        while True:
            held = [s for m in (a, b, c) for s in m.held]
            if len(held) != len(set(held)):
                overlaps.append(tuple(held))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        async with managing(a):
            await until(lambda: a.held == list(range(8)))
            async with managing(b):
                await until(lambda: len(a.held) == 4 and len(b.held) == 4)
                assert disjoint_and_complete([a, b], 8)
                async with managing(c):
                    await until(lambda: sorted(len(m.held) for m in (a, b, c)) == [2, 3, 3])
                    assert disjoint_and_complete([a, b, c], 8)
                    # c dies without releasing anything: its leases and membership just expire.
                    c.release_on_exit = False
                # a and b take c's shards back once its leases expired.
                await until(lambda: len(a.held) == 4 and len(b.held) == 4)
                assert disjoint_and_complete([a, b], 8)
            # b left gracefully: a holds everything again.
            await until(lambda: a.held == list(range(8)))
            assert await redis_client.zrange(keys.CONTROLLER_MEMBERS, 0, -1) == ["a"]
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert overlaps == []


async def test_a_replica_that_lost_a_shard_cannot_write_its_sessions_status(
    redis_client: aioredis.Redis, world: World
) -> None:
    session = await world.create_session("fenced", mode="chat", idleTimeoutSeconds=0)
    shard = shard_of(session.id, 1)
    old = manager(redis_client, "old", count=1)
    async with managing(old):
        await until(lambda: old.held == [shard])
        stale = old.fence_for(session.id)
        old.release_on_exit = False  # it dies: no release, no renew
    assert stale is not None
    # By its own clock it stops acting (renew deadline) while its lease is still in Redis.
    await until(lambda: not old.is_leader_for(session.id))
    assert await redis_client.pttl(keys.shard_lease(shard)) > 0
    new = manager(redis_client, "new", count=1)
    async with managing(new):
        await until(lambda: new.held == [shard])
        fresh = new.fence_for(session.id)
        assert fresh is not None and fresh[1] > stale[1]
        status = SessionStatus(phase=Phase.RUNNING)
        assert await world.store.write_status(session.id, status, fence=stale) == "fenced"
        assert await world.store.write_status(session.id, status, fence=fresh) == "written"


# -- controllers over the emulator -----------------------------------------------------------------


def ids_in_every_shard(prefix: str, per_shard: int, count: int = SHARDS) -> list[str]:
    """Session ids, ``per_shard`` of them in each shard, so every replica has work."""
    found: dict[int, list[str]] = {s: [] for s in range(count)}
    i = 0
    while any(len(v) < per_shard for v in found.values()):
        sid = f"{prefix}{i}"
        if len(found[shard_of(sid, count)]) < per_shard:
            found[shard_of(sid, count)].append(sid)
        i += 1
    return [sid for ids in found.values() for sid in ids]


def overlapping_mutations(world: World) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of requests by two different replicas that changed one machine at overlapping times."""
    by_machine: dict[str, list[dict[str, Any]]] = {}
    for r in world.emulator.stats.recent:
        if r["method"] != "GET" and "/" in r["scope"] and r["caller"].startswith("flyswarm-controller/"):
            by_machine.setdefault(r["scope"], []).append(r)
    found = []
    for requests in by_machine.values():
        for i, first in enumerate(requests):
            for second in requests[i + 1 :]:
                if (
                    first["caller"] != second["caller"]
                    and first["start"] < second["t"]
                    and second["start"] < first["t"]
                ):
                    found.append((first, second))
    return found


def callers(world: World, op: str) -> set[str]:
    return {r["caller"] for r in world.emulator.stats.recent if r["op"] == op and r["status"] < 300}


def holds(running: RunningController, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(running.controller.shards.held) == count

    return check


async def converge(world: World, ids: list[str]) -> None:
    for sid in ids:
        await world.until_running(sid, timeout=60)


async def test_two_replicas_share_the_sessions_and_never_touch_one_machine_together(world: World) -> None:
    a = await world.start_controller(controller_id="ctl-a", **CTL)
    b = await world.start_controller(controller_id="ctl-b", **CTL)
    await world.until(holds(a, 2), what="a holds half the shards")
    await world.until(holds(b, 2), what="b holds half the shards")
    ids = ids_in_every_shard("pair", 2)
    for sid in ids:
        await world.create_session(sid, mode="chat", idleTimeoutSeconds=0)
    await converge(world, ids)
    # Both replicas worked: each created the machines of its own shards.
    assert callers(world, "Machines_create") == {"flyswarm-controller/ctl-a", "flyswarm-controller/ctl-b"}
    assert sorted(a.controller.shards.held + b.controller.shards.held) == list(range(SHARDS))
    # Restart work on every machine, from whichever replica owns it.
    for sid in ids:
        machine = world.live_machine(sid)
        assert machine is not None
        await world.admin("POST", f"/_admin/machines/{machine.id}/crash")
    await converge(world, ids)
    for sid in ids:
        assert len(world.machines(sid, live=False)) == 1
    assert overlapping_mutations(world) == []
    await world.assert_invariants(set(ids))


async def test_a_replica_killed_mid_action_has_its_shards_taken_over_and_its_sessions_converge(
    world: World,
) -> None:
    a = await world.start_controller(controller_id="ctl-a", **CTL)
    victim = await world.start_controller(controller_id="ctl-victim", **CTL)
    await world.until(holds(a, 2), what="a holds half the shards")
    await world.until(holds(victim, 2), what="the victim holds half the shards")
    victims = set(victim.controller.shards.held)
    ids = ids_in_every_shard("kill", 2)
    for sid in ids:
        await world.create_session(sid, mode="chat", idleTimeoutSeconds=0)

    async def victim_created() -> bool:
        return "flyswarm-controller/ctl-victim" in callers(world, "Machines_create")

    # Mid-action: the victim has begun creating its sessions' machines when it dies.
    await world.until(victim_created, what="the victim created a machine")
    victim.crash()
    # Its leases were not released: a takes its shards once they expire (lease 2 s).
    await world.until(holds(a, SHARDS), timeout=20, what="a holds every shard")
    await converge(world, ids)
    for sid in ids:
        assert len(world.machines(sid, live=False)) == 1, sid
    # A victim's session whose agent dies now is brought back by a.
    theirs = next(sid for sid in ids if shard_of(sid, SHARDS) in victims)
    machine = world.live_machine(theirs)
    assert machine is not None
    await world.admin("POST", f"/_admin/machines/{machine.id}/crash")
    await world.until_running(theirs, timeout=60)
    assert overlapping_mutations(world) == []
    await world.assert_invariants(set(ids))


async def test_a_joining_replica_gets_shards_released_by_the_other_without_two_acting(world: World) -> None:
    a = await world.start_controller(controller_id="ctl-a", **CTL)
    await world.until(holds(a, SHARDS), what="a alone holds every shard")
    first = ids_in_every_shard("early", 1)
    for sid in first:
        await world.create_session(sid, mode="chat", idleTimeoutSeconds=0)
    await converge(world, first)
    b = await world.start_controller(controller_id="ctl-b", **CTL)
    # Sessions arrive while the shards move.
    later = ids_in_every_shard("late", 2)
    for sid in later:
        await world.create_session(sid, mode="chat", idleTimeoutSeconds=0)
    await world.until(holds(b, 2), what="b got its share")
    await world.until(holds(a, 2), what="a released the rest")
    await converge(world, first + later)
    assert set(a.controller.shards.held).isdisjoint(b.controller.shards.held)
    assert "flyswarm-controller/ctl-b" in callers(world, "Machines_create")
    assert overlapping_mutations(world) == []
    for sid in first + later:
        assert len(world.machines(sid, live=False)) == 1, sid
    await world.assert_invariants(set(first + later))
