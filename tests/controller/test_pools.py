"""Warm pools in a real world: Redis, the emulator, the gateway, pool agents that boot and wait.

The machines run ``local/heartbeat_agent.py`` in its pool waiting mode: it reports booted through
the gateway, is suspended (or stopped) by the pool controller, and becomes the session it is
assigned at claim time. Every test checks the state Redis and the emulator are left in: which
machine served which session, what the pool holds, what was destroyed.
"""

from __future__ import annotations

from typing import Any

import pytest

from api import keys
from api.models import Phase, utcnow
from controller.main import fly_client_for
from controller.metrics import ControllerMetrics
from controller.observed import TAG_POOL, TAG_SESSION
from tests.controller.pools import delete_pool, put_pool
from tests.controller.world import World

pytestmark = pytest.mark.timeout(180)

#: A fresh agent's Python start-up takes seconds on a loaded two-core machine: a boot grace that a
#: fresh machine always meets, so the tests check pools, not the load.
SLOW_BOOT: dict[str, Any] = {"boot_grace_seconds": 20.0}


def pool_machines(world: World, pool: str, *, unclaimed: bool = True) -> list[Any]:
    """The emulator's live machines of ``pool`` (only those no session claimed, by default)."""
    found = []
    for m in world.machines():
        meta = m.config.get("metadata") or {}
        if meta.get(TAG_POOL) == pool and (not unclaimed or not meta.get(TAG_SESSION)):
            found.append(m)
    return found


async def until_ready(world: World, pool: str, count: int, timeout: float = 60.0) -> set[str]:
    """Until the pool's ready set holds ``count`` machines that the emulator shows parked."""

    async def check() -> set[str] | None:
        ready = {str(m) for m in await world.redis.smembers(keys.pool_ready(pool))}
        parked = {m.id for m in pool_machines(world, pool) if m.state in ("suspended", "stopped")}
        return ready if len(ready) == count and ready <= parked and len(parked) == count else None

    return await world.until(check, timeout, f"{count} ready machines in pool {pool}")


async def claimed_event(world: World, session_id: str) -> dict[str, Any] | None:
    for stored in await world.store.read_events(session_id, count=200):
        if stored.event.reason == "Claimed":
            return stored.event.data
    return None


async def test_a_session_claims_a_suspended_machine_runs_like_a_fresh_one_and_the_pool_refills(
    world: World,
) -> None:
    await world.start_controller(**SLOW_BOOT)
    await put_pool(world.redis, "warm", size=2, mode="suspended")
    first = await until_ready(world, "warm", 2)
    # A fitting session and one the pool does not serve (another region), started together: the
    # same phases and result either way.
    # Long enough that the controller sees each agent running before it reports done (a session
    # whose agent is already done when first seen goes from Starting straight to Succeeded).
    await world.create_session("pooled", prompt="finish-after=5 result=done")
    await world.create_session("fresh", prompt="finish-after=5 result=done", machine={"region": "ams"})
    pooled = await world.until_phase("pooled", Phase.SUCCEEDED, timeout=90)
    fresh = await world.until_phase("fresh", Phase.SUCCEEDED, timeout=90)
    claim = await claimed_event(world, "pooled")
    assert claim is not None and claim["pool"] == "warm" and claim["machineId"] in first
    assert await claimed_event(world, "fresh") is None
    served = world.machines("pooled", live=False)
    assert [m.id for m in served] == [claim["machineId"]]  # no create for it, only the claim
    # The claim counted no restart (a claimed machine is the session's first, like a created one).
    assert pooled.status.restarts == 0 and fresh.status.phase is Phase.SUCCEEDED
    phases = {
        sid: [e.event.data.get("phase") for e in await world.store.read_events(sid, count=200)]
        for sid in ("pooled", "fresh")
    }
    assert [p for p in phases["pooled"] if p][-1] == [p for p in phases["fresh"] if p][-1] == "Succeeded"
    assert "Running" in phases["pooled"] and "Running" in phases["fresh"]
    # The pool refills to its size with a new machine; the claimed one is the session's (and gone).
    refilled = await until_ready(world, "warm", 2)
    assert claim["machineId"] not in refilled
    state = await world.store.pool_state("warm")
    assert state.claims == {} and claim["machineId"] not in state.records

    async def status_says_ready() -> bool:
        status = (await world.store.all_pools())[0].status
        ready = [c for c in status.conditions if c.type == "Ready"]
        return (status.ready, status.observedGeneration) == (2, 1) and ready[0].status == "True"

    await world.until(status_says_ready, 30, "pool status: 2 ready, Ready=True, generation 1")
    await world.assert_invariants({"pooled", "fresh"})


async def test_pool_resize_template_change_and_delete_keep_and_replace_the_right_machines(
    world: World,
) -> None:
    await world.start_controller(**SLOW_BOOT)
    await put_pool(world.redis, "warm", size=2)
    first = await until_ready(world, "warm", 2)
    await put_pool(world.redis, "warm", generation=2, size=1)
    kept = await until_ready(world, "warm", 1)
    assert kept < first
    # An image roll-out: the template changes, the machine is replaced by one built from the new one.
    await put_pool(world.redis, "warm", generation=3, size=1, template={"guest": {"memoryMb": 512}})

    async def rolled_out() -> set[str] | None:
        ready = await until_ready(world, "warm", 1)
        new = {m.id for m in pool_machines(world, "warm") if m.config["guest"]["memory_mb"] == 512}
        return ready if ready == new else None

    replaced = await world.until(rolled_out, 60, "the pool's machine rebuilt from the new template")
    assert not replaced & first
    # The session orphan rule never touched the pool's machines (no session tag, pool alive).
    assert all(
        (m.config.get("metadata") or {}).get(TAG_POOL) == "warm" for m in world.machines() if m.id in replaced
    )
    await delete_pool(world.redis, "warm")

    async def removed() -> bool:
        gone = not pool_machines(world, "warm", unclaimed=False)
        keys_left = [k async for k in world.redis.scan_iter(match=keys.pool_key_pattern("warm"))]
        indexed = await world.redis.zscore(keys.POOLS, "warm")
        return gone and not keys_left and indexed is None

    await world.until(removed, 60, "pool drained and removed")


async def test_racing_replicas_and_a_claim_cut_short_never_give_a_machine_two_sessions(world: World) -> None:
    # The pool is filled, then its controller is gone; a claimant pops a ready machine for "cut" and
    # dies before anything else of the claim (no token, no launch record, no tag, no resume).
    filler = await world.start_controller(**SLOW_BOOT)
    await put_pool(world.redis, "warm", size=3)
    ready = await until_ready(world, "warm", 3)
    await filler.shutdown()
    await world.create_session("cut", prompt="finish-after=1 result=done")
    got = await world.store.claim_pool_machine("warm", "cut", utcnow())
    assert isinstance(got, tuple) and got[0] in ready
    half_claimed = got[0]
    # Two sharded replicas race for the other two machines with five more sessions.
    a = await world.start_controller(controller_id="ctl-a", shards=4, **SLOW_BOOT)
    b = await world.start_controller(controller_id="ctl-b", shards=4, **SLOW_BOOT)
    ids = ["cut"] + [f"race{i}" for i in range(5)]
    for sid in ids[1:]:
        await world.create_session(sid, prompt="finish-after=1 result=done")
    for sid in ids:
        await world.until_phase(sid, Phase.SUCCEEDED, timeout=90)
    served: dict[str, str] = {}
    for sid in ids:
        claim = await claimed_event(world, sid)
        if claim is not None:
            assert claim["machineId"] not in served.values(), f"{claim['machineId']} served two sessions"
            served[sid] = claim["machineId"]
        # Every session had exactly one machine, claimed or created.
        assert len(world.machines(sid, live=False)) == 1, sid
    # The cut-short claim was completed by the next pass on the very machine it had popped.
    assert served["cut"] == half_claimed
    # Every other ready machine served one session, or (its resume too slow on a loaded machine: the
    # claim fell back to a create) was destroyed, or is still parked unclaimed: none is left claimed
    # and unserved, and none served two (checked above).
    parked = {m.id for m in pool_machines(world, "warm")}
    for machine_id in ready - set(served.values()):
        machine = world.emulator.machines.get(machine_id)
        gone = machine is None or machine.state == "destroyed"
        assert gone or machine_id in parked, f"{machine_id} was left claimed without a session"
    assert len(served) >= 2

    async def both_hold_shards() -> bool:
        # A renewal that timed out on a loaded machine drops a replica's shards for a moment; they
        # come back on its next campaign. What matters is that the two share the work.
        return bool(a.controller.shards.held and b.controller.shards.held)

    await world.until(both_hold_shards, 30, "both replicas hold shards")

    async def claims_finished() -> bool:
        # The pool loop finishes a claim on its next pass after the session's side is written.
        return (await world.store.pool_state("warm")).claims == {}

    await world.until(claims_finished, 30, "every claim finished on the pool's side")
    await world.assert_invariants(set(ids))


async def test_refill_goes_on_under_429s_and_a_pool_machine_of_a_deleted_pool_record_is_collected(
    world: World,
) -> None:
    # Fly answers 429 whenever our client goes faster than Fly's buckets (the client's own pacing
    # is off): the refill retries until the pool is full, sessions still get machines.
    await world.set_faults(rate_limits=True)
    metrics = ControllerMetrics()
    settings = world.settings(**SLOW_BOOT)
    fly = fly_client_for(settings, metrics, rate_limits=False)
    running = await world.start_controller(fly=fly, metrics=metrics, **SLOW_BOOT)
    try:
        await put_pool(world.redis, "warm", size=4)
        await world.create_session("s1", prompt="finish-after=1 result=done", machine={"region": "ams"})
        await until_ready(world, "warm", 4, timeout=90)
        await world.until_phase("s1", Phase.SUCCEEDED, timeout=90)
        assert metrics.total("flyswarm_controller_fly_calls_total", status="429") > 0
        assert metrics.total("flyswarm_controller_pool_refill_creates_total", pool="warm") == 4
        # The pool's record vanishes without a drain (an operator's FLUSH, a bad restore): its
        # machines are orphans of a pool that does not exist, and are collected after the grace.
        await world.redis.delete(keys.pool("warm"))
        await world.redis.zrem(keys.POOLS, "warm")
        await world.until(lambda: _none_left(world), 60, "orphaned pool machines destroyed")
    finally:
        await running.shutdown()
        await fly.aclose()


async def _none_left(world: World) -> bool:
    return not pool_machines(world, "warm", unclaimed=False)


async def test_a_claim_that_will_not_resume_falls_back_and_a_claimed_machine_that_crashes_restarts(
    world: World,
) -> None:
    await world.start_controller(**SLOW_BOOT)
    await put_pool(world.redis, "warm", size=1, mode="stopped")
    (lost,) = await until_ready(world, "warm", 1)
    # The parked machine vanishes behind the controller's back (a host lost): the claim finds out,
    # destroys what is left of it and creates a fresh machine at once.
    await world.fly.destroy_machine(lost, force=True)
    await world.create_session("s1", prompt="finish-after=1 result=done")
    fell_back = await world.until_phase("s1", Phase.SUCCEEDED, timeout=90)
    assert fell_back.status.restarts == 0 and fell_back.status.machineId != lost
    assert all(m.state == "destroyed" for m in world.emulator.machines.values() if m.id == lost)
    reasons = [e.event.reason for e in await world.store.read_events("s1", count=200)]
    assert "Claimed" in reasons and reasons.count("CreateRequested") >= 2  # the warning, then a create
    # The pool refilled; a session claims that machine and its agent crashes. The pool config's slot
    # token is spent, so a plain start would boot an agent that waits for a claim forever: the
    # restart gives the machine the session's own config first.
    (ready,) = await until_ready(world, "warm", 1)
    await world.create_session("s2", prompt="heartbeat")
    running = await world.until_running("s2", timeout=90)
    assert running.status.machineId == ready and running.status.restarts == 0
    await world.admin("POST", f"/_admin/machines/{ready}/crash")

    async def restarted() -> bool:
        session = await world.store.get("s2")
        return (
            session is not None
            and session.status.restarts == 1
            and session.status.phase is Phase.RUNNING
            and session.status.machineId == ready
        )

    await world.until(restarted, 90, "s2 running again on its claimed machine")
    machine = world.live_machine("s2")
    assert machine is not None and machine.id == ready
    env, meta = machine.config.get("env") or {}, machine.config.get("metadata") or {}
    assert env.get("FLYSWARM_SESSION_ID") == "s2" and "FLYSWARM_POOL_TOKEN" not in env
    assert TAG_POOL not in meta and meta.get(TAG_SESSION) == "s2"
    await world.store.send_message("s2", "done")
    await world.until_phase("s2", Phase.SUCCEEDED, timeout=60)
    assert (await world.store.pool_state("warm")).claims == {}
    await world.assert_invariants({"s1", "s2"})
