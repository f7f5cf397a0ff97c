"""Convergence: sessions and real machines agree, whatever happens to either (real Redis, emulator, agents).

Machines run ``local/heartbeat_agent.py``; after every scenario the invariants of DESIGN.md are
checked on the state of Redis and the emulator (World.assert_invariants).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from api.models import Phase, SessionSpec
from controller.fly_types import MachineConfig, MachineInit, MachineRestart
from controller.observed import TAG_LAUNCH, TAG_MANAGED, TAG_SESSION
from tests.controller.world import IMAGE, World

pytestmark = pytest.mark.timeout(90)

#: Convergence on a Redis Cluster too: the machines' agents report as their per-session ACL users
#: through a cluster client, the controller reads, fences and removes across the three masters.
on_both = pytest.mark.redis_modes("single", "cluster")


@on_both
async def test_creates_one_machine_per_session_and_reports_running(world: World) -> None:
    await world.start_controller()
    ids = {f"s{i}" for i in range(3)}
    for sid in ids:
        await world.create_session(sid)
    for sid in ids:
        session = await world.until_running(sid)
        assert session.status.restarts == 0
        assert session.status.startedAt is not None
        assert await world.store.get_heartbeat(sid) is not None
        events = [e.event.reason for e in await world.store.read_events(sid)]
        assert "AgentReady" in events
    # Exactly one machine was ever created per session.
    for sid in ids:
        assert len(world.machines(sid, live=False)) == 1
    await world.assert_invariants(ids)


@on_both
async def test_finished_tasks_succeed_or_fail_and_their_machines_go_away(world: World) -> None:
    await world.start_controller()
    await world.create_session("ok", prompt="finish-after=0.5 result=done")
    await world.create_session(
        "bad", prompt="finish-after=0.5 result=error", restartPolicy={"policy": "never"}
    )
    ok = await world.until_phase("ok", Phase.SUCCEEDED)
    bad = await world.until_phase("bad", Phase.FAILED)
    assert ok.status.finishedAt is not None
    assert bad.status.reason == "ExecutionError"  # the agent's reason, passed through
    await world.until(lambda: _none(world, "ok", "bad"), what="machines of finished sessions destroyed")
    # Records stay until ttlSecondsAfterFinished; the phase never flips back.
    await world.assert_invariants({"ok", "bad"})
    assert await world.phase("ok") is Phase.SUCCEEDED


@on_both
async def test_deleted_session_is_finalized_after_its_machine_is_destroyed(world: World) -> None:
    await world.start_controller()
    await world.create_session("gone", mode="chat", idleTimeoutSeconds=0)
    running = await world.until_running("gone")
    assert running.status.machineId is not None
    await world.store.mark_deleted("gone")

    async def removed() -> bool:
        return await world.store.get("gone") is None and not world.machines("gone")

    await world.until(removed, what="session removed and machine destroyed")
    await world.assert_invariants(set())


async def test_updated_spec_is_observed_without_disturbing_the_machine(world: World) -> None:
    await world.start_controller()
    session = await world.create_session("upd", mode="chat", idleTimeoutSeconds=0)
    before = await world.until_running("upd")
    spec = session.spec.model_dump()
    spec["maxTurns"] = 7
    updated = session.model_copy(update={"spec": SessionSpec.model_validate(spec)})
    outcome = await world.store.apply(updated)
    assert outcome.result == "configured"

    async def observed() -> bool:
        current = await world.store.get("upd")
        return current is not None and current.status.observedGeneration == current.metadata.generation == 2

    await world.until(observed, what="observedGeneration 2")
    after = await world.until_running("upd")
    assert after.status.machineId == before.status.machineId
    await world.assert_invariants({"upd"})


async def test_crashed_machine_is_restarted(world: World) -> None:
    await world.start_controller()
    await world.create_session("crash", mode="chat", idleTimeoutSeconds=0)
    before = await world.until_running("crash")
    await world.admin("POST", f"/_admin/machines/{before.status.machineId}/crash")

    async def restarted() -> bool:
        session = await world.store.get("crash")
        return session is not None and session.status.restarts >= 1 and session.status.phase is Phase.RUNNING

    await world.until(restarted, what="restart after crash")
    after = await world.until_running("crash")
    assert after.status.restarts >= 1
    await world.assert_invariants({"crash"})


async def test_hung_agent_is_restarted_when_its_heartbeats_stop(world: World) -> None:
    await world.start_controller()
    await world.create_session("hung", mode="chat", idleTimeoutSeconds=0)
    before = await world.until_running("hung")
    machine_id = before.status.machineId
    assert machine_id is not None
    # SIGSTOP: the process lives and Fly still says "started", but no heartbeat comes.
    await world.admin("POST", f"/_admin/machines/{machine_id}/hang")

    async def recovered() -> bool:
        session = await world.store.get("hung")
        return (
            session is not None
            and session.status.restarts >= 1
            and session.status.phase is Phase.RUNNING
            and not world.emulator.machines[machine_id].frozen
        )

    await world.until(recovered, what="restart after heartbeats stopped")
    reasons = [e.event.reason for e in await world.store.read_events("hung")]
    assert "HeartbeatLost" in reasons
    await world.assert_invariants({"hung"})


async def test_machine_destroyed_behind_our_back_is_replaced(world: World) -> None:
    await world.start_controller()
    await world.create_session("lost", mode="chat", idleTimeoutSeconds=0)
    before = await world.until_running("lost")
    assert before.status.machineId is not None
    await world.fly.destroy_machine(before.status.machineId, force=True)

    async def replaced() -> bool:
        session = await world.store.get("lost")
        return (
            session is not None
            and session.status.phase is Phase.RUNNING
            and session.status.machineId not in (None, before.status.machineId)
        )

    await world.until(replaced, what="a new machine")
    await world.until_running("lost")
    await world.assert_invariants({"lost"})


async def test_duplicate_machine_is_destroyed_and_one_is_kept(world: World) -> None:
    await world.start_controller()
    await world.create_session("dup", mode="chat", idleTimeoutSeconds=0)
    before = await world.until_running("dup")
    assert before.status.machineId is not None
    original = world.emulator.machines[before.status.machineId]
    twin = await world.fly.create_machine(
        _config_like(original.config, launch="twin"), region="fra", name="dup-twin"
    )

    async def single() -> bool:
        return len(world.machines("dup")) == 1

    await world.until(single, what="duplicate destroyed")
    session = await world.until_running("dup")
    # One of the two was destroyed, and the session runs on the other.
    states = {world.emulator.machines[m].state for m in (twin.id, original.id)}
    assert "destroyed" in states and session.status.machineId in (twin.id, original.id)
    await world.assert_invariants({"dup"})


async def test_orphan_machine_is_destroyed_and_foreign_machines_are_left_alone(world: World) -> None:
    await world.start_controller()
    orphan = await world.fly.create_machine(
        _sleeper({TAG_MANAGED: "true", TAG_SESSION: "nobody", TAG_LAUNCH: "x"})
    )
    foreign = await world.fly.create_machine(_sleeper({"owner": "someone-else"}))
    await world.until(
        lambda: _state_is(world, orphan.id, "destroyed"), what="orphan destroyed after the grace"
    )
    assert world.emulator.machines[foreign.id].state != "destroyed"
    await world.fly.destroy_machine(foreign.id, force=True)
    await world.assert_invariants(set())


async def test_chat_session_sleeps_when_idle_and_wakes_on_a_message(world: World) -> None:
    await world.start_controller()
    await world.create_session("chat", mode="chat", idleTimeoutSeconds=1)
    await world.until_phase("chat", Phase.SLEEPING)
    machine = world.live_machine("chat")
    assert machine is not None
    await world.until(lambda: _state_is(world, machine.id, "stopped"), what="stopped while sleeping")
    await world.store.send_message("chat", "hello")
    await world.until_running("chat")

    async def answered() -> bool:
        return await world.store.inbox_pending("chat") == 0

    await world.until(answered, what="message consumed")
    session = await world.store.get("chat")
    assert session is not None and session.status.restarts == 0
    await world.assert_invariants({"chat"})


# -- helpers ---------------------------------------------------------------------------------------


async def _none(world: World, *session_ids: str) -> bool:
    return all(not world.machines(sid) for sid in session_ids)


async def _state_is(world: World, machine_id: str, state: str) -> bool:
    return world.emulator.machines[machine_id].state == state


def _config_like(config: dict[str, Any], *, launch: str) -> MachineConfig:
    raw = dict(config)
    raw["metadata"] = {**(raw.get("metadata") or {}), TAG_LAUNCH: launch}
    return MachineConfig.model_validate(raw)


def _sleeper(metadata: dict[str, str]) -> MachineConfig:
    return MachineConfig(
        image=IMAGE,
        init=MachineInit(exec=[sys.executable, "-c", "import time; time.sleep(3600)"]),
        metadata=metadata,
        restart=MachineRestart(policy="no"),
    )
