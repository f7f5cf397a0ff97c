"""Reliability under the faults production has: Redis restarts and outages, killed agents, sleep races.

Each test kills or restarts real processes (a redis-server with AOF of its own, the emulated
machine's agent process) and checks the state of Redis and the emulator afterwards: the same
machines, no extra restarts, every message's turn done once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import utcnow
from api.store_base import StoreUnavailable
from tests.controller.world import World, make_world
from tests.restartable_redis import RestartableRedis

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def aof_world(own_redis: RestartableRedis, tmp_path: Path) -> AsyncIterator[World]:
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        async with make_world(own_redis.url, client, tmp_path) as world:
            yield world
    finally:
        await client.aclose()


def _starts(world: World, session_id: str) -> int:
    """How often the emulator started the session's machines (Fly's own event log)."""
    return sum(1 for m in world.machines(session_id, live=False) for e in m.events if e["type"] == "start")


async def _passes_after(world: World, count: int) -> bool:
    """True once the leader has made ``count`` full resync passes with Redis and Fly readable."""
    controller = world.controllers[0].controller
    reconciler = getattr(controller, "reconciler", None)
    if reconciler is None:
        return False
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while len(seen) < count and time.monotonic() < deadline:
        stats = reconciler.last_pass
        if stats is not None and stats.ok and stats.reconcile_id not in seen:
            seen.append(stats.reconcile_id)
        await asyncio.sleep(0.05)
    return len(seen) >= count


async def test_redis_killed_longer_than_the_heartbeat_ttl_restarts_no_agent_and_loses_no_turn(
    aof_world: World, own_redis: RestartableRedis
) -> None:
    """Redis dies (kill -9) for longer than the heartbeat TTL and comes back from its AOF.

    ACL users are not in the AOF: the controller must give every agent its credentials back, and
    must not read the heartbeats that expired meanwhile as dead agents. Afterwards: the same
    machines, never restarted, ``restarts`` still 0, and a message sent then is answered once.
    """
    world = aof_world
    # A TTL with room for a loaded two-core CI machine (agents beat every TTL/3 through the gateway).
    ttl = 4.0
    grace = 10.0
    await world.start_controller(heartbeat_ttl_seconds=ttl, boot_grace_seconds=grace)
    ids = [f"keep{i}" for i in range(3)]
    for sid in ids:
        await world.create_session(sid, mode="chat", idleTimeoutSeconds=0)
    running = await asyncio.gather(*(world.until_running(sid) for sid in ids))
    machines = {s.id: s.status.machineId for s in running}
    starts = {sid: _starts(world, sid) for sid in ids}
    # Past every boot grace before the outage: afterwards a missing heartbeat must be held "unknown"
    # by the Redis-outage rule, not merely still inside a grace.
    started = max(s.status.lastStartAt or s.status.startedAt or utcnow() for s in running)
    await asyncio.sleep(max(0.0, (started - utcnow()).total_seconds() + grace))

    own_redis.kill()
    # Outage: the controller notices it (not ready), and stays away longer than the TTL.
    reconciler = world.controllers[0].controller.reconciler
    async with asyncio.timeout(30):  # world.until reads Redis: wait on the controller alone here
        while reconciler.redis_ok:
            await asyncio.sleep(0.05)
    await asyncio.sleep(ttl * 2)
    own_redis.start()
    await _reconnected(world)

    # Every agent beats again - so its ACL user is back - and the controller converges on it.
    for sid in ids:
        await world.until(
            lambda sid=sid: _fresh_beat(world, sid, machines[sid]), what=f"{sid} heart-beating again"
        )
    assert await _passes_after(world, 3)
    for sid in ids:
        session = await world.until_running(sid)
        assert session.status.machineId == machines[sid], "the machine was replaced"
        assert session.status.restarts == 0, f"{sid} was restarted: {session.status.reason}"
        assert _starts(world, sid) == starts[sid], f"{sid}'s machine was started again"
        assert [m.id for m in world.machines(sid)] == [machines[sid]]

    # No turn lost: a message sent now is taken by the same agent and acknowledged once.
    sent = await world.store.send_message(ids[0], "hello after the outage")
    await world.until(
        lambda: _acked(world, ids[0], sent.id), what="the message acknowledged by the surviving agent"
    )
    assert await world.store.inbox_pending(ids[0]) == 0
    await world.assert_invariants(set(ids))


async def test_agent_killed_mid_task_is_replaced_by_the_restart_backoff_not_the_create_expectation(
    world: World,
) -> None:
    """kill -9 of a task's agent: the machine (auto_destroy) goes; its replacement must not wait for
    the create expectation window (set far beyond this test's timeout here)."""
    await world.start_controller(create_expectation_seconds=600.0, heartbeat_ttl_seconds=2.0)
    await world.create_session("lost", mode="task", prompt="heartbeat forever")
    first = await world.until_running("lost")
    machine = world.live_machine("lost")
    assert machine is not None and machine.process is not None
    os.kill(machine.process.pid, signal.SIGKILL)

    async def replaced() -> str | None:
        live = world.machines("lost")
        if len(live) == 1 and live[0].id != first.status.machineId and live[0].state == "started":
            return str(live[0].id)
        return None

    new_id = await world.until(replaced, timeout=60, what="a replacement machine")
    session = await world.until_running("lost")
    assert session.status.machineId == new_id
    assert session.status.restarts == 1
    assert len(world.machines("lost", live=False)) == 2, "exactly one replacement was created"


@pytest.mark.parametrize("sleep", ["suspend", "stop"])
async def test_message_sent_while_the_machine_falls_asleep_wakes_it_without_a_resync(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path, sleep: str
) -> None:
    """The message arrives while the machine is still ``suspending``/``stopping``: the controller must
    follow the transition up itself. The resync is an hour away, so only that can wake it."""
    delays = {"suspending": 1.0, "stopping": 1.0}
    async with make_world(redis_url, redis_client, tmp_path, transition_delays=delays) as world:
        await world.start_controller(resync_seconds=3600.0)
        await world.create_session("nap", mode="chat", idleTimeoutSeconds=1, sleep=sleep)
        first = await world.until_launched("nap")
        going = "suspending" if sleep == "suspend" else "stopping"

        async def falling_asleep() -> bool:
            machine = world.live_machine("nap")
            return machine is not None and machine.state == going

        await world.until(falling_asleep, what=f"the machine {going}")
        sent = await world.store.send_message("nap", "wake up")
        await world.until(lambda: _acked(world, "nap", sent.id), timeout=30, what="the message answered")
        session = await world.until_running("nap")
        assert session.status.machineId == first.status.machineId, "woken in place, not replaced"
        assert session.status.restarts == 0


# -- helpers --------------------------------------------------------------------------------------


async def _reconnected(world: World) -> None:
    """Wait until the test's own store answers again (its pooled connections died with Redis)."""
    successes = 0
    async with asyncio.timeout(30):
        while successes < 5:
            try:
                await world.store.all_sessions()
                successes += 1
            except StoreUnavailable:
                successes = 0
                await asyncio.sleep(0.05)


async def _fresh_beat(world: World, session_id: str, machine_id: str | None) -> bool:
    heartbeat = await world.store.get_heartbeat(session_id)
    if heartbeat is None or heartbeat.machineId != machine_id:
        return False
    return (utcnow() - heartbeat.at).total_seconds() < 3.0


async def _acked(world: World, session_id: str, message_id: str) -> bool:
    return await world.redis.get(keys.inbox_acked(session_id)) == message_id
