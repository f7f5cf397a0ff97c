"""The executor against the real emulator and Redis: safe creates, leases, leadership, budgets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import Phase, SessionStatus
from api.store_controller import ControllerStore
from controller.actions import (
    CreateMachine,
    DestroyMachine,
    Done,
    Requeue,
    RestartMachine,
    SetStatus,
    StopMachine,
    Transient,
)
from controller.executor import (
    Authority,
    CreatePacer,
    DestroyBudget,
    Executor,
    ExecutorSettings,
    SoleAuthority,
)
from controller.expectations import Expectations
from controller.fly import FlyClient, FlyClientConfig
from controller.leader import LeaderElector, LeaderTiming
from controller.machine_config import MachineConfigBuilder
from controller.observed import LaunchRecord
from controller.ratelimit import Limit
from tests.controller.world import APP, World

pytestmark = pytest.mark.timeout(60)


def make_executor(world: World, authority: Authority | None = None, **settings: object) -> Executor:
    controller_settings = world.settings()
    return Executor(
        store=world.store,
        fly=world.fly,
        authority=authority or SoleAuthority(),
        expectations=Expectations(max_age_seconds=30),
        config_builder=MachineConfigBuilder(controller_settings),
        settings=ExecutorSettings(call_timeout_seconds=5.0, stop_grace_seconds=2.0, **settings),  # type: ignore[arg-type]
    )


async def started_machine(world: World, executor: Executor, session_id: str) -> str:
    session = await world.create_session(session_id, mode="chat")
    outcome = await executor.apply(CreateMachine(session_id, "l1", "fra"), session=session)
    assert outcome == Done()
    launch = LaunchRecord.from_store(await world.store.get_launch(session_id))
    assert launch is not None and launch.machine_id is not None
    machine_id = launch.machine_id
    await world.until(lambda: _state(world, machine_id, "started"), what="machine started")
    return machine_id


async def test_create_records_the_launch_before_calling_fly_and_tags_the_machine(world: World) -> None:
    executor = make_executor(world)
    session = await world.create_session("c1")
    await world.set_faults(latency_ms=400)
    applying = asyncio.create_task(executor.apply(CreateMachine("c1", "launch-1", "fra"), session=session))

    async def recorded_first() -> bool:
        launch = LaunchRecord.from_store(await world.store.get_launch("c1"))
        return launch is not None and launch.launch_id == "launch-1" and not world.machines("c1", live=False)

    await world.until(recorded_first, what="launch record written while the create is still in flight")
    assert await applying == Done()
    [machine] = world.machines("c1")
    meta = machine.config["metadata"]
    assert meta == {"flyswarm_managed": "true", "flyswarm_session": "c1", "flyswarm_launch": "launch-1"}
    launch = LaunchRecord.from_store(await world.store.get_launch("c1"))
    assert launch is not None and launch.machine_id == machine.id
    env = machine.config["env"]
    assert env["FLYSWARM_SESSION_ID"] == "c1"
    assert env["FLYSWARM_SESSION_TOKEN"].startswith("fst_c1_")
    assert not any(k.startswith("FLYSWARM_REDIS") for k in env) and "redis://" not in str(machine.config)
    assert "test-fly-token-0123" not in str(machine.config)


async def test_ambiguous_create_adopts_the_machine_found_by_its_launch_tag(world: World) -> None:
    executor = make_executor(world)
    session = await world.create_session("amb")
    await world.set_faults(create_timeout_rate=1.0)
    assert await executor.apply(CreateMachine("amb", "l-amb", "fra"), session=session) == Done()
    [machine] = world.machines("amb", live=False)
    launch = LaunchRecord.from_store(await world.store.get_launch("amb"))
    assert launch is not None and launch.machine_id == machine.id


async def test_ambiguous_create_never_adopts_another_sessions_machine_with_the_same_launch_id(
    world: World,
) -> None:
    # Launch ids are unique per session only (two sessions planned in one pass share the clock):
    # the lookup after an ambiguous create must match the session too, or two sessions share a
    # machine. Found by test_sessions_converge_under_rate_limits_5xx... on a loaded machine.
    executor = make_executor(world)
    first = await world.create_session("twin-a")
    assert await executor.apply(CreateMachine("twin-a", "g1r0-same", "fra"), session=first) == Done()
    second = await world.create_session("twin-b")
    await world.set_faults(create_timeout_rate=1.0)
    assert await executor.apply(CreateMachine("twin-b", "g1r0-same", "fra"), session=second) == Done()
    [mine] = world.machines("twin-b", live=False)
    [theirs] = world.machines("twin-a", live=False)
    launch = LaunchRecord.from_store(await world.store.get_launch("twin-b"))
    assert launch is not None and launch.machine_id == mine.id != theirs.id


async def test_ambiguous_create_the_list_does_not_show_yet_is_left_to_the_expectation(world: World) -> None:
    executor = make_executor(world)
    session = await world.create_session("lag")
    await world.set_faults(create_timeout_rate=1.0, list_lag_seconds=30)
    outcome = await executor.apply(CreateMachine("lag", "l-lag", "fra"), session=session)
    assert isinstance(outcome, Requeue)
    assert len(world.machines("lag", live=False)) == 1
    # The record stays (no machine id): the plan will not launch again while it is expected.
    launch = LaunchRecord.from_store(await world.store.get_launch("lag"))
    assert launch is not None and launch.launch_id == "l-lag" and launch.machine_id is None
    assert executor.expectations.launch("lag", None) is not None


async def test_restart_runs_under_a_lease_that_is_always_released(world: World) -> None:
    executor = make_executor(world)
    machine_id = await started_machine(world, executor, "rs")
    pid_before = _pid(world, machine_id)
    assert await executor.apply(RestartMachine("rs", machine_id)) == Done()

    async def restarted() -> bool:
        m = world.emulator.machines[machine_id]
        return m.state == "started" and m.process is not None and m.process.pid != pid_before

    await world.until(restarted, what="a fresh main process")
    assert await world.fly.get_lease(machine_id) is None


async def test_machine_leased_by_someone_else_is_left_alone(world: World) -> None:
    executor = make_executor(world)
    machine_id = await started_machine(world, executor, "held")
    other = FlyClient(FlyClientConfig(app_name=APP, api_token="other-token-9999", base_url=world.fly_url))
    try:
        lease = await other.acquire_lease(machine_id, ttl=30)
        pid = _pid(world, machine_id)
        outcome = await executor.apply(DestroyMachine("held", machine_id, force=False))
        assert isinstance(outcome, Requeue)
        assert world.emulator.machines[machine_id].state == "started"
        assert _pid(world, machine_id) == pid
        assert lease.nonce is not None
        await other.release_lease(machine_id, lease.nonce)
    finally:
        await other.aclose()


async def test_one_action_is_one_fly_call_and_a_wrong_state_is_a_requeue_not_a_decision(world: World) -> None:
    """A plain destroy of a running machine is Fly's 412: the executor does not stop it on its own
    (the plan does, one step per pass); stop, then destroy, lets the agent flush."""
    executor = make_executor(world)
    machine_id = await started_machine(world, executor, "sd")

    async def beating() -> bool:
        return await world.store.get_heartbeat("sd") is not None

    await world.until(beating, what="the agent is up")
    refused = await executor.apply(DestroyMachine("sd", machine_id, force=False))
    assert isinstance(refused, Requeue)
    assert world.emulator.machines[machine_id].state == "started", "the executor re-decided"

    assert await executor.apply(StopMachine("sd", machine_id)) == Done()
    await world.until(lambda: _state(world, machine_id, "stopped"), what="stopped")
    assert await executor.apply(DestroyMachine("sd", machine_id, force=False)) == Done()
    await world.until(lambda: _state(world, machine_id, "destroyed"), what="destroyed")
    exits = [e for e in world.emulator.machines[machine_id].events if e["type"] == "exit"]
    assert exits and exits[0]["request"]["exit_event"]["requested_stop"] is True
    # The agent got SIGTERM (not a kill) and wrote its interrupted report.
    session = await world.store.get("sd")
    assert session is not None and session.agent is not None and session.agent.state == "interrupted"


async def test_restart_of_a_machine_at_rest_is_requeued_for_the_plan(world: World) -> None:
    executor = make_executor(world)
    machine_id = await started_machine(world, executor, "rr")
    assert await executor.apply(StopMachine("rr", machine_id)) == Done()
    await world.until(lambda: _state(world, machine_id, "stopped"), what="stopped")
    outcome = await executor.apply(RestartMachine("rr", machine_id))
    assert isinstance(outcome, Requeue)
    assert world.emulator.machines[machine_id].state == "stopped", "no start behind the plan's back"


async def test_nothing_happens_without_leadership(world: World, redis_client: aioredis.Redis) -> None:
    standby = LeaderElector(
        ControllerStore(redis_client), holder_id="standby", timing=LeaderTiming(3, 2, 0.5)
    )
    executor = make_executor(world, authority=standby)
    session = await world.create_session("nl")
    outcome = await executor.apply(CreateMachine("nl", "l-nl", "fra"), session=session)
    assert isinstance(outcome, Transient)
    assert not world.machines("nl", live=False)
    assert await world.store.get_launch("nl") == {}


async def test_status_write_of_a_fenced_out_leader_is_refused(
    world: World, redis_client: aioredis.Redis
) -> None:
    elector = LeaderElector(ControllerStore(redis_client), holder_id="old", timing=LeaderTiming(30, 20, 0.1))
    task = asyncio.create_task(elector.run())
    try:
        await world.until(_is_leader(elector), what="leads")
        executor = make_executor(world, authority=elector)
        await world.create_session("fence")
        # A newer term exists (a pause longer than the lease, say): Redis must refuse the write.
        await redis_client.incr(keys.LEADER_FENCE)
        outcome = await executor.apply(SetStatus("fence", SessionStatus(phase=Phase.RUNNING)))
        assert isinstance(outcome, Transient)
        assert await world.phase("fence") is Phase.PENDING
    finally:
        elector.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_destroys_beyond_the_per_pass_budget_wait_for_the_next_pass(world: World) -> None:
    executor = make_executor(world)
    executor.destroy_budget = DestroyBudget(1)
    first = await started_machine(world, executor, "b1")
    second = await started_machine(world, executor, "b2")
    assert await executor.apply(DestroyMachine("b1", first, force=True)) == Done()
    assert isinstance(await executor.apply(DestroyMachine("b2", second, force=True)), Requeue)
    assert world.emulator.machines[second].state == "started"
    executor.destroy_budget.reset()
    assert await executor.apply(DestroyMachine("b2", second, force=True)) == Done()


def _pid(world: World, machine_id: str) -> int:
    process = world.emulator.machines[machine_id].process
    assert process is not None
    return process.pid


async def _state(world: World, machine_id: str, state: str) -> bool:
    return world.emulator.machines[machine_id].state == state


def _is_leader(elector: LeaderElector) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return elector.is_leader()

    return check


def test_create_pacer_hands_out_slots_at_the_create_rate_first_come_first_served() -> None:
    now = [100.0]
    pacer = CreatePacer(Limit(rate=1.0, burst=3), clock=lambda: now[0])
    assert [pacer.admit(f"s{i}") for i in range(3)] == [0.0, 0.0, 0.0]
    waits = [pacer.admit(f"s{i}") for i in range(3, 6)]
    assert waits == pytest.approx([1.0, 2.0, 3.0])
    # Asking again before the slot is due keeps the same slot (no new token taken).
    now[0] += 0.5
    assert pacer.admit("s3") == pytest.approx(0.5)
    now[0] += 0.5
    assert pacer.admit("s3") == 0.0
    assert pacer.admit("s4") == pytest.approx(1.0)
    assert CreatePacer(None).admit("any") == 0.0


async def test_each_launch_gets_a_fresh_gateway_token_and_a_finished_session_loses_it(
    world: World, redis_client: aioredis.Redis
) -> None:
    """The machine's one credential is the launch's session token; a new launch replaces it; a
    finished session's token is revoked."""
    from api import keys
    from api.session_token import digest_matches

    executor = make_executor(world)
    machine_id = await started_machine(world, executor, "tok")
    token = world.emulator.machines[machine_id].config["env"]["FLYSWARM_SESSION_TOKEN"]
    assert token.startswith("fst_tok_")
    assert digest_matches(token, await redis_client.get(keys.session_token("tok")))

    session = await world.store.get("tok")
    assert session is not None
    assert await executor.apply(CreateMachine("tok", "l2", "fra"), session=session) == Done()
    assert not digest_matches(token, await redis_client.get(keys.session_token("tok"))), "old token lives"

    finished = session.status.model_copy(update={"phase": Phase.SUCCEEDED, "reason": "Completed"})
    assert await executor.apply(SetStatus("tok", finished)) == Done()
    assert await redis_client.get(keys.session_token("tok")) is None
