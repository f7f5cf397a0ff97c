"""Tables for the pure plan: session + observed machines + heartbeat + now -> actions.

No fakes are needed: the plan is a function of values. Tests check the resulting decisions (the
status the plan wants, the machines it touches), named by the behaviour they pin down.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.models import (
    AgentReport,
    Condition,
    Heartbeat,
    Metadata,
    Phase,
    RestartPolicy,
    Session,
    SessionSpec,
    SessionStatus,
    SessionUsage,
)
from controller.actions import (
    Action,
    CreateMachine,
    DestroyMachine,
    RemoveSession,
    RequeueAfter,
    RestartMachine,
    SetStatus,
    StartMachine,
    StopMachine,
    SuspendMachine,
    machine_id_of,
)
from controller.machine_state import GONE as GONE_STATES
from controller.machine_state import KNOWN as KNOWN_STATES
from controller.machine_state import TRANSIENT as TRANSIENT_STATES
from controller.observed import (
    CreateFailure,
    LaunchRecord,
    ObservedMachine,
)
from controller.plan import (
    DEADLINE_APPROACHING,
    MIN_REQUEUE_SECONDS,
    TRANSIENT_RECHECK_MAX_SECONDS,
    TRANSIENT_RECHECK_MIN_SECONDS,
    launch_id_for,
    plan,
    plan_orphans,
    restart_delay,
    transient_recheck_seconds,
)
from controller.settings import PlanSettings

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SID = "s1"
CFG = PlanSettings()
LIVE = {Phase.PENDING, Phase.CREATING, Phase.STARTING, Phase.RUNNING, Phase.SLEEPING}
ALL_STATES = sorted(KNOWN_STATES) + ["hibernating"]  # the last one: a state Fly may add one day


def ago(seconds: float) -> datetime:
    return T0 - timedelta(seconds=seconds)


def make_session(
    mode: str = "task",
    *,
    phase: Phase = Phase.RUNNING,
    machine_id: str | None = "m1",
    restarts: int = 0,
    started_at: datetime | None = T0 - timedelta(seconds=100),
    finished_at: datetime | None = None,
    last_start_at: datetime | None = None,
    reason: str | None = None,
    agent: AgentReport | None = None,
    deleted_at: datetime | None = None,
    generation: int = 1,
    observed_generation: int = 1,
    conditions: list[Condition] | None = None,
    **spec: Any,
) -> Session:
    spec.setdefault("prompt", "do the thing" if mode == "task" else None)
    return Session(
        metadata=Metadata(name=SID, generation=generation, createdAt=ago(3600), deletionTimestamp=deleted_at),
        spec=SessionSpec(mode=mode, **spec),
        status=SessionStatus(
            phase=phase,
            reason=reason,
            machineId=machine_id,
            restarts=restarts,
            observedGeneration=observed_generation,
            startedAt=started_at,
            finishedAt=finished_at,
            lastStartAt=last_start_at,
            conditions=conditions or [],
        ),
        agent=agent,
    )


def make_machine(
    mid: str = "m1",
    state: str = "started",
    *,
    session_id: str | None = SID,
    managed: bool = True,
    created: float = 600,
    changed: float | None = 500,
    exit_code: int | None = None,
    oom: bool = False,
    host_status: str = "ok",
) -> ObservedMachine:
    return ObservedMachine(
        id=mid,
        state=state,
        region="fra",
        session_id=session_id,
        launch_id="g1r0-x",
        managed=managed,
        created_at=ago(created),
        updated_at=ago(changed) if changed is not None else None,
        instance_id=None,
        last_exit_code=exit_code,
        last_exit_oom=oom,
        host_status=host_status,
    )


def beat(seconds_ago: float = 5, machine_id: str | None = "m1") -> Heartbeat:
    return Heartbeat(machineId=machine_id, state="running", at=ago(seconds_ago), ttlSeconds=30)


def run(
    session: Session,
    machines: Sequence[ObservedMachine] = (),
    heartbeat: Heartbeat | None = None,
    *,
    now: datetime = T0,
    settings_: PlanSettings = CFG,
    launch: LaunchRecord | None = None,
    inbox: int = 0,
    heartbeats_known_since: datetime | None = None,
) -> list[Action]:
    return plan(
        session,
        machines,
        heartbeat,
        now,
        settings_,
        launch=launch,
        inbox_pending=inbox,
        heartbeats_known_since=heartbeats_known_since,
    )


def status_of(actions: Sequence[Action]) -> SessionStatus | None:
    writes = [a for a in actions if isinstance(a, SetStatus)]
    assert len(writes) <= 1
    return writes[0].status if writes else None


def fly_actions(actions: Sequence[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, SetStatus | RequeueAfter | RemoveSession)]


def of_type(actions: Sequence[Action], kind: type[Any]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def requeue(actions: Sequence[Action]) -> float | None:
    found = of_type(actions, RequeueAfter)
    return found[0].seconds if found else None


def apply_status(session: Session, actions: Sequence[Action]) -> Session:
    """The session as the next pass would read it (the executor wrote the status)."""
    status = status_of(actions)
    return session if status is None else session.model_copy(update={"status": status})


# -- rule 4: no machine -----------------------------------------------------------------------------


def test_creates_machine_for_new_session() -> None:
    session = make_session(phase=Phase.PENDING, machine_id=None, started_at=None)
    actions = run(session)
    creates = of_type(actions, CreateMachine)
    assert len(creates) == 1 and creates[0].region == "fra" and creates[0].session_id == SID
    status = status_of(actions)
    assert status is not None and status.phase is Phase.CREATING and status.restarts == 0
    events = of_type(actions, SetStatus)[0].events
    assert [e.reason for e in events] == ["CreateRequested"] and events[0].type == "lifecycle"
    assert isinstance(actions[0], SetStatus), "status is written before the create"


def test_creates_machine_in_the_spec_region() -> None:
    session = make_session(phase=Phase.PENDING, machine_id=None, machine={"region": "ams"})
    assert of_type(run(session), CreateMachine)[0].region == "ams"


@pytest.mark.parametrize(
    ("stored", "shown"),
    [("NoCapacity", "NoCapacity"), ("CreateFailed", "CreateFailed"), ("Odd", "CreateFailed")],
)
def test_says_why_fly_refused_the_last_create_when_creating_again(stored: str, shown: str) -> None:
    session = make_session(phase=Phase.CREATING, machine_id=None, reason="CreateRequested")
    failure = CreateFailure(reason=stored, message="no room in fra", failed_at=ago(5))
    actions = plan(session, (), None, T0, CFG, create_failure=failure)
    status = status_of(actions)
    assert status is not None and status.phase is Phase.CREATING and status.reason == shown
    assert status.message is not None and "no room in fra" in status.message
    assert len(of_type(actions, CreateMachine)) == 1
    # The same failure on the next attempt keeps phase and reason: no new lifecycle event (no spam).
    again = session.model_copy(update={"status": status})
    retry = plan(again, (), None, T0 + timedelta(seconds=15), CFG, create_failure=failure)
    assert [e for write in of_type(retry, SetStatus) for e in write.events] == []
    assert len(of_type(retry, CreateMachine)) == 1


def test_launch_id_is_deterministic_and_unique_per_attempt() -> None:
    session = make_session(phase=Phase.PENDING, machine_id=None)
    assert launch_id_for(session, T0) == launch_id_for(session, T0)
    assert launch_id_for(session, T0) != launch_id_for(session, T0 + timedelta(milliseconds=1))
    assert of_type(run(session), CreateMachine) == of_type(run(session), CreateMachine)


def test_waits_for_in_flight_create_instead_of_creating_again() -> None:
    session = make_session(phase=Phase.CREATING, machine_id=None, started_at=None)
    launch = LaunchRecord("g1r0-abc", requested_at=ago(30))
    actions = run(session, launch=launch)
    assert not of_type(actions, CreateMachine)
    assert requeue(actions) == pytest.approx(CFG.create_expectation_seconds - 30)


def test_in_flight_create_that_never_shows_up_is_relaunched_and_counted() -> None:
    session = make_session(phase=Phase.CREATING, machine_id=None, started_at=None)
    launch = LaunchRecord("g1r0-abc", requested_at=ago(CFG.create_expectation_seconds + 1))
    actions = run(session, launch=launch)
    assert len(of_type(actions, CreateMachine)) == 1
    status = status_of(actions)
    assert status is not None and status.restarts == 1 and status.reason == "MachineLost"


def test_launched_machine_that_is_gone_is_replaced_at_once_not_after_the_expectation_window() -> None:
    """Fly answered the create (the launch names its machine) and that machine is gone: the
    launch is no longer in flight, so the restart backoff - immediate for the first restart -
    governs the replacement, not the 120 s create expectation."""
    session = make_session(phase=Phase.RUNNING, machine_id="m1", last_start_at=ago(20))
    launch = LaunchRecord("g1r0-abc", requested_at=ago(20), machine_id="m1")
    actions = run(session, launch=launch)
    assert len(of_type(actions, CreateMachine)) == 1
    status = status_of(actions)
    assert status is not None and status.restarts == 1 and status.reason == "MachineLost"


def test_heartbeat_of_a_destroyed_machine_does_not_delay_its_replacement() -> None:
    session = make_session(phase=Phase.RUNNING, machine_id="m1", last_start_at=ago(20))
    launch = LaunchRecord("g1r0-abc", requested_at=ago(20), machine_id="m1")
    actions = run(session, [make_machine(state="destroyed", changed=1)], beat(2), launch=launch)
    assert len(of_type(actions, CreateMachine)) == 1


def test_adopts_listed_machine_of_in_flight_create() -> None:
    session = make_session(phase=Phase.CREATING, machine_id=None, started_at=None)
    launch = LaunchRecord("g1r0-x", requested_at=ago(10))
    actions = run(session, [make_machine(state="starting", changed=2, created=5)], launch=launch)
    status = status_of(actions)
    assert not fly_actions(actions)
    assert status is not None and status.phase is Phase.STARTING and status.machineId == "m1"


# -- rule 5: transient states -------------------------------------------------------------------------


@pytest.mark.parametrize("state", sorted(TRANSIENT_STATES))
def test_waits_on_transient_state_until_wedge_threshold(state: str) -> None:
    session = make_session()
    actions = run(session, [make_machine(state=state, changed=CFG.wedge_seconds - 2)], beat(60))
    assert not fly_actions(actions)
    # Looked at again soon (the re-check), never later than the wedge threshold.
    assert requeue(actions) == pytest.approx(2 if state != "updating" else TRANSIENT_RECHECK_MAX_SECONDS)


@pytest.mark.parametrize("state", sorted(TRANSIENT_STATES))
def test_rechecks_a_machine_that_just_entered_a_transient_state_within_a_second(state: str) -> None:
    """A machine going to sleep (or starting, stopping...) is looked at again as soon as Fly can
    have moved it on, not at the wedge deadline minutes later."""
    session = make_session(phase=Phase.SLEEPING)
    actions = run(session, [make_machine(state=state, changed=0.1)], beat(1), inbox=1)
    assert not fly_actions(actions)
    assert requeue(actions) == pytest.approx(TRANSIENT_RECHECK_MIN_SECONDS)
    later = run(session, [make_machine(state=state, changed=4.0)], beat(1), inbox=1)
    assert requeue(later) == pytest.approx(2.0)


def test_transient_recheck_grows_with_time_in_state_and_stays_bounded() -> None:
    assert transient_recheck_seconds(0) == TRANSIENT_RECHECK_MIN_SECONDS
    assert transient_recheck_seconds(3) == 1.5
    assert transient_recheck_seconds(3600) == TRANSIENT_RECHECK_MAX_SECONDS


@pytest.mark.parametrize("state", sorted(TRANSIENT_STATES - {"updating"}))
def test_escalates_wedged_machine_to_forced_destroy_and_recreate(state: str) -> None:
    session = make_session()
    actions = run(session, [make_machine(state=state, changed=CFG.wedge_seconds + 1)], beat(400))
    destroys = of_type(actions, DestroyMachine)
    assert [(d.machine_id, d.force) for d in destroys] == [("m1", True)]
    assert len(of_type(actions, CreateMachine)) == 1
    status = status_of(actions)
    assert status is not None and status.reason == "MachineWedged" and status.restarts == 1


def test_updating_gets_the_longer_wedge_threshold() -> None:
    session = make_session()
    waiting = run(session, [make_machine(state="updating", changed=CFG.wedge_seconds + 100)])
    assert not fly_actions(waiting)
    wedged = run(session, [make_machine(state="updating", changed=CFG.wedge_updating_seconds + 1)])
    assert [d.force for d in of_type(wedged, DestroyMachine)] == [True]


@pytest.mark.parametrize("age", [10, 3600, 86400 * 30])
def test_waits_on_unknown_state_and_never_destroys(age: float) -> None:
    session = make_session()
    actions = run(session, [make_machine(state="hibernating", changed=age)])
    assert not fly_actions(actions)
    assert requeue(actions) is not None


def test_host_unreachable_waits_then_recreates() -> None:
    session = make_session()
    recent = run(session, [make_machine(host_status="unreachable", changed=60)], beat(60))
    assert not fly_actions(recent)
    old = run(session, [make_machine(host_status="unreachable", changed=1000)], beat(1000))
    assert [d.force for d in of_type(old, DestroyMachine)] == [True]
    assert len(of_type(old, CreateMachine)) == 1


def test_host_unreachable_with_fresh_heartbeat_is_running() -> None:
    actions = run(make_session(), [make_machine(host_status="unknown")], beat(5))
    assert not fly_actions(actions)


# Every Fly state has a defined answer. A task session, Running, machine changed 10 s ago, no heartbeat.
EXPECTED_BY_STATE: dict[str, set[type[Any]]] = {
    "created": set(),  # made, not started yet: give it the boot grace
    "started": set(),  # booting: the heartbeat may still come
    "stopped": {StartMachine},  # exited with code 1 below: restart in place
    "suspended": {StartMachine},
    "failed": {StartMachine},
    "destroyed": {CreateMachine},  # gone: recreate
    **{state: set() for state in TRANSIENT_STATES},  # wait
    "hibernating": set(),  # unknown: wait, never destroy
}


@pytest.mark.parametrize("state", ALL_STATES)
def test_every_fly_state_has_a_defined_answer(state: str) -> None:
    machine = make_machine(state=state, changed=10, exit_code=1 if state == "stopped" else None)
    actions = run(make_session(), [machine])
    assert {type(a) for a in fly_actions(actions)} == EXPECTED_BY_STATE[state]
    assert all(a.seconds >= TRANSIENT_RECHECK_MIN_SECONDS for a in of_type(actions, RequeueAfter))


def test_expected_table_covers_every_known_state() -> None:
    assert set(EXPECTED_BY_STATE) == set(ALL_STATES)


def test_destroyed_machine_is_treated_as_gone() -> None:
    actions = run(make_session(), [make_machine(state="destroyed", changed=5)])
    assert not of_type(actions, DestroyMachine)
    assert len(of_type(actions, CreateMachine)) == 1
    status = status_of(actions)
    assert status is not None and status.reason == "MachineLost"


def test_created_machine_is_started_after_the_boot_grace_without_counting() -> None:
    session = make_session(phase=Phase.STARTING)
    actions = run(session, [make_machine(state="created", changed=CFG.boot_grace_seconds + 1)])
    assert [a.machine_id for a in of_type(actions, StartMachine)] == ["m1"]
    status = status_of(actions)
    assert status is not None and status.restarts == 0 and status.reason == "NotStarted"


# -- rule 6: heartbeats ------------------------------------------------------------------------------


def test_restarts_machine_when_heartbeat_is_lost() -> None:
    session = make_session()
    actions = run(session, [make_machine(changed=500)], beat(CFG.heartbeat_ttl_seconds + 5))
    assert [a.machine_id for a in of_type(actions, RestartMachine)] == ["m1"]
    status = status_of(actions)
    assert status is not None
    assert (status.phase, status.reason, status.restarts, status.lastStartAt) == (
        Phase.STARTING,
        "HeartbeatLost",
        1,
        T0,
    )
    assert isinstance(actions[0], SetStatus), "the restart is counted before it is made"


def test_missing_heartbeat_right_after_a_redis_outage_is_unknown_not_death() -> None:
    """Redis came back 5 s ago: heartbeats that expired while agents could not write them say
    nothing; no restart until every agent had a whole TTL to beat again."""
    session = make_session()
    known = ago(5)
    for heartbeat in (None, beat(CFG.heartbeat_ttl_seconds + 40)):
        actions = run(session, [make_machine(changed=500)], heartbeat, heartbeats_known_since=known)
        assert not fly_actions(actions)
        assert requeue(actions) == pytest.approx(CFG.heartbeat_ttl_seconds - 5)
    after = run(
        session,
        [make_machine(changed=500)],
        None,
        now=T0 + timedelta(seconds=CFG.heartbeat_ttl_seconds),
        heartbeats_known_since=known,
    )
    assert [a.machine_id for a in of_type(after, RestartMachine)] == ["m1"]


def test_missing_heartbeat_during_boot_grace_is_not_death() -> None:
    session = make_session(phase=Phase.STARTING, started_at=None)
    actions = run(session, [make_machine(changed=20)], None)
    assert not fly_actions(actions)
    assert requeue(actions) == pytest.approx(CFG.boot_grace_seconds - 20)
    status = status_of(actions)
    assert status is not None and status.phase is Phase.STARTING and status.startedAt == T0


def test_boot_grace_counts_from_our_last_restart() -> None:
    session = make_session(phase=Phase.STARTING, restarts=1, last_start_at=ago(10))
    actions = run(session, [make_machine(changed=500)], beat(200))
    assert not fly_actions(actions)


def test_heartbeat_of_another_machine_does_not_count() -> None:
    session = make_session()
    actions = run(session, [make_machine(changed=500)], beat(1, machine_id="m0"))
    assert len(of_type(actions, RestartMachine)) == 1


def test_fresh_heartbeat_makes_session_running() -> None:
    session = make_session(phase=Phase.STARTING, started_at=None)
    actions = run(session, [make_machine(changed=20)], beat(2))
    status = status_of(actions)
    assert status is not None and status.phase is Phase.RUNNING and status.reason == "AgentReady"
    assert status.lastHeartbeatAt == ago(2) and status.startedAt == T0
    ready = {c.type: c.status for c in status.conditions}
    assert ready == {"MachineReady": "True", "AgentHealthy": "True", "Sleeping": "False"}


# -- rule 3: failures, backoff, policies ------------------------------------------------------------


def test_first_restart_is_immediate() -> None:
    actions = run(make_session(), [make_machine(state="stopped", exit_code=1, changed=50)])
    assert len(of_type(actions, StartMachine)) == 1
    status = status_of(actions)
    assert status is not None and status.reason == "Crashed" and status.restarts == 1


def test_restart_backoff_grows_exponentially_and_is_capped() -> None:
    delays = [restart_delay(n, CFG) for n in range(10)]
    assert delays == [0, 5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert restart_delay(10_000, CFG) == CFG.restart_backoff_max_seconds


@pytest.mark.parametrize("restarts", [1, 2, 3, 5, 8])
def test_waits_out_backoff_before_restarting(restarts: int) -> None:
    session = make_session(restarts=restarts, last_start_at=ago(2), restartPolicy={"maxRetries": 10})
    actions = run(session, [make_machine(state="stopped", exit_code=1, changed=1)])
    assert not fly_actions(actions)
    delay = restart_delay(restarts, CFG)
    assert requeue(actions) == pytest.approx(delay - 2)
    status = status_of(actions)
    assert status is not None and status.phase is Phase.PENDING and status.reason == "Crashed"
    assert status.nextRetryAt == ago(2) + timedelta(seconds=delay)
    assert status.restarts == restarts


def test_restarts_once_backoff_elapsed() -> None:
    session = make_session(restarts=2, last_start_at=ago(11), restartPolicy={"maxRetries": 10})
    actions = run(session, [make_machine(state="stopped", exit_code=1, changed=10.5)])
    assert len(of_type(actions, StartMachine)) == 1
    status = status_of(actions)
    assert status is not None and status.restarts == 3 and status.nextRetryAt is None


def test_backoff_wait_writes_status_once() -> None:
    session = make_session(restarts=2, last_start_at=ago(2), restartPolicy={"maxRetries": 10})
    machines = [make_machine(state="stopped", exit_code=1, changed=1)]
    first = run(session, machines)
    again = run(apply_status(session, first), machines, now=T0 + timedelta(seconds=3))
    assert status_of(first) is not None and status_of(again) is None


def test_fails_with_backoff_limit_exceeded_after_max_retries() -> None:
    session = make_session(restarts=3, last_start_at=ago(1000), restartPolicy={"maxRetries": 3})
    actions = run(session, [make_machine(state="stopped", exit_code=2, changed=100)])
    status = status_of(actions)
    assert status is not None and status.phase is Phase.FAILED and status.reason == "BackoffLimitExceeded"
    assert status.finishedAt == T0
    assert [(d.machine_id, d.force) for d in of_type(actions, DestroyMachine)] == [("m1", False)]
    assert not of_type(actions, StartMachine)


def test_max_retries_zero_fails_on_first_failure() -> None:
    session = make_session(restartPolicy={"maxRetries": 0})
    actions = run(session, [make_machine(changed=500)], beat(100))
    status = status_of(actions)
    assert status is not None and status.phase is Phase.FAILED and status.reason == "BackoffLimitExceeded"


def test_policy_never_fails_at_once_with_the_cause() -> None:
    session = make_session(restartPolicy=RestartPolicy(policy="never"))
    actions = run(session, [make_machine(state="stopped", exit_code=1, oom=True, changed=30)])
    status = status_of(actions)
    assert status is not None and status.phase is Phase.FAILED and status.reason == "OOMKilled"
    assert not of_type(actions, StartMachine | CreateMachine | RestartMachine)


@pytest.mark.parametrize(
    ("machine", "cause"),
    [
        (make_machine(state="stopped", exit_code=137, changed=30), "Crashed"),
        (make_machine(state="stopped", exit_code=1, oom=True, changed=30), "OOMKilled"),
        (make_machine(state="failed", changed=30), "MachineFailed"),
        (make_machine(state="suspended", changed=30), "MachineSuspended"),
        (make_machine(state="stopped", exit_code=0, changed=60), "MachineStopped"),
    ],
)
def test_restarts_task_machine_at_rest_in_place_with_the_cause(machine: ObservedMachine, cause: str) -> None:
    actions = run(make_session(), [machine])
    assert [a.machine_id for a in of_type(actions, StartMachine)] == ["m1"]
    status = status_of(actions)
    assert status is not None and status.reason == cause


def test_clean_task_exit_waits_for_the_agent_report() -> None:
    actions = run(make_session(), [make_machine(state="stopped", exit_code=0, changed=5)])
    assert not fly_actions(actions)
    assert requeue(actions) == pytest.approx(CFG.heartbeat_ttl_seconds - 5)


def test_observation_older_than_our_start_is_not_a_failure() -> None:
    session = make_session(restarts=1, last_start_at=ago(5))
    actions = run(session, [make_machine(state="stopped", exit_code=1, changed=60)])
    assert not fly_actions(actions) and status_of(actions) is None


def test_lost_machine_is_recreated_and_counted() -> None:
    actions = run(make_session(), [])
    assert len(of_type(actions, CreateMachine)) == 1
    status = status_of(actions)
    assert status is not None
    assert (status.phase, status.reason, status.restarts, status.machineId) == (
        Phase.CREATING,
        "MachineLost",
        1,
        None,
    )


def test_lost_machine_with_fresh_heartbeat_waits() -> None:
    actions = run(make_session(), [], beat(10))
    assert not fly_actions(actions)
    assert requeue(actions) == pytest.approx(CFG.heartbeat_ttl_seconds - 10)


def test_chat_machine_that_stopped_cleanly_sleeps_under_on_failure() -> None:
    session = make_session("chat")
    actions = run(session, [make_machine(state="stopped", exit_code=0, changed=30)])
    assert not fly_actions(actions)
    status = status_of(actions)
    assert status is not None and status.phase is Phase.SLEEPING and status.restarts == 0


def test_policy_always_restarts_chat_machine_that_stopped_cleanly() -> None:
    session = make_session("chat", restartPolicy={"policy": "always"})
    actions = run(session, [make_machine(state="stopped", exit_code=0, changed=30)])
    assert len(of_type(actions, StartMachine)) == 1
    status = status_of(actions)
    assert status is not None and status.restarts == 1


def test_policy_always_does_not_restart_a_task_that_reported_done() -> None:
    session = make_session(restartPolicy={"policy": "always"}, agent=AgentReport(state="done"))
    actions = run(session, [make_machine(state="stopped", exit_code=0, changed=30)])
    status = status_of(actions)
    assert status is not None and status.phase is Phase.SUCCEEDED
    assert not of_type(actions, StartMachine | CreateMachine | RestartMachine)


# -- rule 2: finished ----------------------------------------------------------------------------------


def test_task_reported_done_succeeds_and_its_machine_may_exit_by_itself() -> None:
    session = make_session(agent=AgentReport(state="done", costUsd=0.1))
    actions = run(session, [make_machine()], beat(2))
    status = status_of(actions)
    assert status is not None and status.phase is Phase.SUCCEEDED and status.reason == "Completed"
    assert status.finishedAt == T0
    assert not fly_actions(actions), "the agent exits by itself; no SIGTERM over its final report"
    assert requeue(actions) == pytest.approx(CFG.destroy_grace_seconds)


def test_finished_machine_still_running_after_the_grace_is_destroyed_with_force() -> None:
    session = make_session(phase=Phase.SUCCEEDED, finished_at=ago(CFG.destroy_grace_seconds + 1))
    session = session.model_copy(update={"agent": AgentReport(state="done")})
    actions = run(session, [make_machine()], beat(2))
    assert [(d.machine_id, d.force) for d in of_type(actions, DestroyMachine)] == [("m1", True)]
    assert status_of(actions) is None


def test_agent_error_fails_with_the_agent_reason() -> None:
    agent = AgentReport(state="error", reason="MaxTurnsExceeded", message="25 turns")
    actions = run(make_session(agent=agent), [make_machine()], beat(2))
    status = status_of(actions)
    assert status is not None and status.phase is Phase.FAILED and status.reason == "MaxTurnsExceeded"


def test_agent_error_without_reason_is_agent_error() -> None:
    actions = run(make_session(agent=AgentReport(state="error")), [])
    status = status_of(actions)
    assert status is not None and status.reason == "AgentError"


def test_deadline_exceeded_fails_task_and_stops_its_machine() -> None:
    session = make_session(started_at=ago(601), timeoutSeconds=600)
    actions = run(session, [make_machine()], beat(2))
    status = status_of(actions)
    assert status is not None and status.phase is Phase.FAILED and status.reason == "DeadlineExceeded"
    assert [a.machine_id for a in of_type(actions, StopMachine)] == ["m1"]


def test_running_task_is_requeued_at_its_deadline_when_that_comes_first() -> None:
    session = make_session(started_at=ago(595), timeoutSeconds=600)
    actions = run(session, [make_machine()], beat(1))
    assert requeue(actions) == pytest.approx(5)


def test_chat_has_no_whole_run_deadline() -> None:
    session = make_session("chat", started_at=ago(100_000), timeoutSeconds=600)
    first = run(session, [make_machine()], beat(2))
    actions = run(apply_status(session, first), [make_machine()], beat(2))
    assert not fly_actions(first) and status_of(actions) is None and not fly_actions(actions)


def test_budget_exceeded_fails_session() -> None:
    agent = AgentReport(state="running", costUsd=2.5)
    actions = run(make_session(agent=agent, maxCostUsd=2.0), [make_machine()], beat(2))
    status = status_of(actions)
    assert status is not None and status.phase is Phase.FAILED and status.reason == "BudgetExceeded"
    assert len(of_type(actions, StopMachine)) == 1


def test_the_gateways_metered_spend_and_label_budgets_fail_the_session_as_budget_exceeded() -> None:
    # The gateway refused the request, so the CLI's turn failed and the agent reported an error:
    # the budget, not the error, is why the session ends.
    errored = AgentReport(state="error", costUsd=0.01)
    over = make_session(agent=errored, maxCostUsd=2.0).model_copy(update={"usage": SessionUsage(costUsd=2.1)})
    label = make_session(agent=errored).model_copy(update={"usage": SessionUsage(budgetExceeded="ios-daily")})
    for session in (over, label):
        status = status_of(run(session, [make_machine()], beat(2)))
        assert status is not None and status.phase is Phase.FAILED and status.reason == "BudgetExceeded"
    assert "ios-daily" in (status.message or "")


def test_finished_session_keeps_record_until_ttl() -> None:
    session = make_session(phase=Phase.SUCCEEDED, finished_at=ago(100), ttlSecondsAfterFinished=3600)
    actions = run(session, [])
    assert actions == [RequeueAfter(SID, 3500, reason="TTLExpired", message=actions[0].message)]


def test_finished_session_is_removed_after_ttl() -> None:
    session = make_session(phase=Phase.FAILED, finished_at=ago(3601), ttlSecondsAfterFinished=3600)
    assert [type(a) for a in run(session, [])] == [RemoveSession]


def test_finished_session_with_ttl_zero_is_removed_once_machines_are_gone() -> None:
    session = make_session(phase=Phase.SUCCEEDED, finished_at=T0, ttlSecondsAfterFinished=0)
    assert [type(a) for a in run(session, [make_machine(state="destroyed")])] == [RemoveSession]


def test_finished_session_destroys_machine_at_rest_without_force() -> None:
    session = make_session(phase=Phase.FAILED, finished_at=ago(5))
    actions = run(session, [make_machine(state="stopped")])
    assert [(d.machine_id, d.force) for d in of_type(actions, DestroyMachine)] == [("m1", False)]
    assert not of_type(actions, RemoveSession)


@pytest.mark.parametrize("phase", [Phase.SUCCEEDED, Phase.FAILED])
@pytest.mark.parametrize("agent_state", ["starting", "running", "idle", "interrupted", None])
def test_finished_session_never_flips_back(phase: Phase, agent_state: str | None) -> None:
    agent = AgentReport(state=agent_state) if agent_state else None  # type: ignore[arg-type]
    session = make_session(phase=phase, finished_at=ago(5), agent=agent)
    for machines in ([], [make_machine()], [make_machine(state="stopped", exit_code=1)]):
        actions = run(session, machines, beat(1), inbox=3)
        status = status_of(actions)
        assert status is None or status.phase is phase
        assert not of_type(actions, CreateMachine | StartMachine | RestartMachine)


def test_finished_session_without_finished_at_starts_the_ttl_clock() -> None:
    session = make_session(phase=Phase.SUCCEEDED, finished_at=None)
    status = status_of(run(session, []))
    assert status is not None and status.finishedAt == T0 and status.phase is Phase.SUCCEEDED


# -- rule 1: deletion ----------------------------------------------------------------------------------


def test_deleted_session_without_machines_is_removed() -> None:
    assert [type(a) for a in run(make_session(deleted_at=ago(1)), [])] == [RemoveSession]


def test_deletion_finalizes_stop_then_force_then_remove() -> None:
    session = make_session(deleted_at=T0)
    first = run(session, [make_machine()], beat(1))
    status = status_of(first)
    assert status is not None and status.phase is Phase.TERMINATING and status.reason == "Deleted"
    assert [a.machine_id for a in of_type(first, StopMachine)] == ["m1"]
    assert not of_type(first, DestroyMachine | RemoveSession)

    session = apply_status(session, first)
    later = T0 + timedelta(seconds=10)
    stopping = run(session, [make_machine(state="stopping", changed=9)], now=later)
    assert not fly_actions(stopping) and status_of(stopping) is None

    past_grace = T0 + timedelta(seconds=CFG.destroy_grace_seconds + 1)
    stuck = run(session, [make_machine(state="stopping", changed=30)], now=past_grace)
    assert [(d.machine_id, d.force) for d in of_type(stuck, DestroyMachine)] == [("m1", True)]

    done = run(session, [make_machine(state="destroyed")], now=past_grace)
    assert [type(a) for a in done] == [RemoveSession]


def test_deletion_destroys_stopped_machine_without_force() -> None:
    actions = run(make_session(deleted_at=ago(1)), [make_machine(state="stopped")])
    assert [(d.machine_id, d.force) for d in of_type(actions, DestroyMachine)] == [("m1", False)]


def test_deletion_waits_for_destroying_machine_and_repeats_a_wedged_destroy() -> None:
    session = make_session(deleted_at=ago(1000))
    waiting = run(session, [make_machine(state="destroying", changed=10)])
    assert not fly_actions(waiting)
    wedged = run(session, [make_machine(state="destroying", changed=CFG.wedge_seconds + 1)])
    assert [d.force for d in of_type(wedged, DestroyMachine)] == [True]


def test_deletion_destroys_every_machine_of_the_session_but_none_of_others() -> None:
    machines = [
        make_machine("m1", state="stopped"),
        make_machine("m2", state="suspended"),
        make_machine("m3", state="started", session_id="other"),
        make_machine("m4", state="stopped", managed=False),
    ]
    actions = run(make_session(deleted_at=ago(1)), machines)
    assert sorted(d.machine_id for d in of_type(actions, DestroyMachine)) == ["m1", "m2"]


def test_deleted_finished_session_is_finalized_too() -> None:
    session = make_session(phase=Phase.SUCCEEDED, finished_at=ago(10), deleted_at=ago(1))
    actions = run(session, [make_machine(state="stopped")])
    status = status_of(actions)
    assert status is not None and status.phase is Phase.TERMINATING
    assert len(of_type(actions, DestroyMachine)) == 1


def test_deleted_session_never_creates_or_starts() -> None:
    session = make_session(phase=Phase.SLEEPING, deleted_at=ago(1))
    actions = run(session, [make_machine(state="stopped")], inbox=5)
    assert not of_type(actions, CreateMachine | StartMachine | RestartMachine)


def test_deletion_waits_on_unknown_state() -> None:
    actions = run(make_session(deleted_at=ago(10_000)), [make_machine(state="hibernating")])
    assert not fly_actions(actions) and not of_type(actions, RemoveSession)


# -- rule 7: chat idle, sleep and wake -------------------------------------------------------------------


def idle_chat(**kw: Any) -> Session:
    return make_session("chat", agent=AgentReport(state="idle", updatedAt=ago(kw.pop("idle_for", 400))), **kw)


def test_idle_chat_session_is_stopped_after_idle_timeout() -> None:
    actions = run(idle_chat(idleTimeoutSeconds=300), [make_machine()], beat(2))
    assert [a.machine_id for a in of_type(actions, StopMachine)] == ["m1"]
    status = status_of(actions)
    assert status is not None and status.phase is Phase.SLEEPING and status.reason == "Idle"
    assert isinstance(actions[0], SetStatus), "Sleeping is recorded before the stop"


def test_idle_chat_session_is_suspended_when_spec_says_suspend() -> None:
    actions = run(idle_chat(idleTimeoutSeconds=300, sleep="suspend"), [make_machine()], beat(2))
    assert [a.machine_id for a in of_type(actions, SuspendMachine)] == ["m1"]
    assert not of_type(actions, StopMachine)


def test_idle_chat_session_is_requeued_at_its_idle_deadline() -> None:
    actions = run(idle_chat(idle_for=290, idleTimeoutSeconds=300), [make_machine()], beat(25))
    assert not fly_actions(actions)
    assert requeue(actions) == pytest.approx(5)


def test_idle_timeout_zero_never_sleeps() -> None:
    actions = run(idle_chat(idle_for=10**6, idleTimeoutSeconds=0), [make_machine()], beat(2))
    assert not fly_actions(actions)


def test_pending_inbox_keeps_chat_awake() -> None:
    actions = run(idle_chat(idleTimeoutSeconds=300), [make_machine()], beat(2), inbox=1)
    assert not fly_actions(actions)


def test_busy_chat_agent_is_not_put_to_sleep() -> None:
    session = make_session("chat", agent=AgentReport(state="running", updatedAt=ago(4000)))
    assert not fly_actions(run(session, [make_machine()], beat(2)))


def test_sleeping_session_with_stopped_machine_is_converged() -> None:
    session = idle_chat(phase=Phase.SLEEPING)
    first = run(session, [make_machine(state="stopped", exit_code=0, changed=30)])
    again = run(apply_status(session, first), [make_machine(state="stopped", exit_code=0, changed=30)])
    assert not fly_actions(first) and again == []


def test_sleeping_session_wakes_on_pending_inbox() -> None:
    session = idle_chat(phase=Phase.SLEEPING, restarts=1)
    actions = run(session, [make_machine(state="suspended", changed=100)], inbox=1)
    assert [a.machine_id for a in of_type(actions, StartMachine)] == ["m1"]
    status = status_of(actions)
    assert status is not None and (status.phase, status.reason, status.restarts) == (
        Phase.STARTING,
        "Wake",
        1,
    )


def test_woken_session_does_not_mistake_the_lagging_list_for_a_crash() -> None:
    session = idle_chat(phase=Phase.SLEEPING)
    woken = apply_status(session, run(session, [make_machine(state="stopped", changed=100)], inbox=1))
    lagging = run(woken, [make_machine(state="stopped", changed=100)], now=T0 + timedelta(seconds=5), inbox=1)
    assert not fly_actions(lagging) and status_of(lagging) is None


def test_sleeping_session_without_machine_creates_on_wake() -> None:
    session = idle_chat(phase=Phase.SLEEPING, machine_id=None)
    assert not fly_actions(run(session, []))
    actions = run(session, [], inbox=2)
    assert len(of_type(actions, CreateMachine)) == 1
    status = status_of(actions)
    assert status is not None and status.reason == "Wake" and status.restarts == 0


def test_sleep_stop_not_yet_visible_is_reissued_without_a_status_write() -> None:
    session = idle_chat(phase=Phase.SLEEPING)
    actions = run(session, [make_machine()], beat(2))
    assert [type(a) for a in actions] == [StopMachine]


def test_sleeping_machine_going_to_sleep_is_waited_on() -> None:
    session = idle_chat(phase=Phase.SLEEPING)
    actions = run(session, [make_machine(state="suspending", changed=3)])
    assert not fly_actions(actions)


# -- rule 8: duplicates ----------------------------------------------------------------------------------


def test_keeps_newest_healthy_machine_and_destroys_the_others_with_force() -> None:
    machines = [
        make_machine("m1", created=600),
        make_machine("m2", created=300),
        make_machine("m3", state="stopped", created=10),
    ]
    actions = run(make_session(machine_id="m1"), machines, beat(2, machine_id=None))
    assert sorted((d.machine_id, d.force) for d in of_type(actions, DestroyMachine)) == [
        ("m1", True),
        ("m3", True),
    ]
    status = status_of(actions)
    assert status is not None and status.machineId == "m2"


def test_duplicate_choice_is_deterministic_by_id() -> None:
    machines = [make_machine("mb", created=60), make_machine("ma", created=60)]
    forward = run(make_session(), machines, beat(2, machine_id=None))
    backward = run(make_session(), list(reversed(machines)), beat(2, machine_id=None))
    assert forward == backward
    assert [d.machine_id for d in of_type(forward, DestroyMachine)] == ["ma"]


def test_prefers_the_machine_whose_agent_beats_over_a_newer_booting_one() -> None:
    machines = [make_machine("old", created=600), make_machine("new", created=5, changed=4)]
    actions = run(make_session(machine_id="old"), machines, beat(2, machine_id="old"))
    assert [d.machine_id for d in of_type(actions, DestroyMachine)] == ["new"]


def test_never_destroys_a_duplicate_in_an_unknown_state() -> None:
    machines = [make_machine("m1"), make_machine("m2", state="hibernating", created=5)]
    actions = run(make_session(), machines, beat(2))
    assert not of_type(actions, DestroyMachine)


def test_does_not_destroy_a_duplicate_that_is_already_destroying() -> None:
    machines = [make_machine("m1"), make_machine("m2", state="destroying", changed=10)]
    assert not of_type(run(make_session(), machines, beat(2)), DestroyMachine)


# -- rule 9: orphans -------------------------------------------------------------------------------------


def test_orphans_are_destroyed_after_the_grace() -> None:
    machines = [
        make_machine("old", session_id="gone", created=CFG.orphan_grace_seconds + 1),
        make_machine("young", session_id="gone", created=CFG.orphan_grace_seconds - 1),
        make_machine("untagged", session_id=None, created=10_000),
        make_machine("known", session_id=SID, created=10_000),
        make_machine("foreign", session_id="gone", managed=False, created=10_000),
        make_machine("dead", session_id="gone", state="destroyed", created=10_000),
        make_machine("odd", session_id="gone", state="hibernating", created=10_000),
    ]
    actions = plan_orphans(machines, {SID}, T0, CFG)
    assert [(a.machine_id, a.force, a.session_id) for a in actions] == [
        ("old", True, "gone"),
        ("untagged", True, None),
    ]


def test_orphans_never_include_unmanaged_machines() -> None:
    machines = [make_machine(f"m{i}", session_id=None, managed=False, created=10**6) for i in range(5)]
    assert plan_orphans(machines, set(), T0, CFG) == []


# -- converged sessions and status hygiene --------------------------------------------------------------


def test_converged_running_task_yields_only_a_requeue_at_the_heartbeat_deadline() -> None:
    session = make_session(started_at=ago(100))
    first = run(session, [make_machine()], beat(5))
    converged = apply_status(session, first)
    actions = run(converged, [make_machine()], beat(5))
    assert [type(a) for a in actions] == [RequeueAfter]
    assert requeue(actions) == pytest.approx(CFG.heartbeat_ttl_seconds - 5)
    # A newer heartbeat alone causes no write.
    assert status_of(run(converged, [make_machine()], beat(1), now=T0 + timedelta(seconds=4))) is None


def test_generation_change_updates_observed_generation() -> None:
    session = make_session(generation=2, observed_generation=1)
    status = status_of(run(session, [make_machine()], beat(1)))
    assert status is not None and status.observedGeneration == 2


def test_condition_transition_time_moves_only_when_its_status_flips() -> None:
    session = make_session(phase=Phase.STARTING, started_at=None)
    first = apply_status(session, run(session, [make_machine(changed=20)], None))
    cond = {c.type: c for c in first.status.conditions}
    assert cond["MachineReady"].lastTransitionTime == T0
    later = T0 + timedelta(seconds=10)
    second = apply_status(first, run(first, [make_machine(changed=30)], beat(1, None), now=later))
    cond2 = {c.type: c for c in second.status.conditions}
    assert cond2["MachineReady"].lastTransitionTime == T0  # still True
    assert cond2["AgentHealthy"].lastTransitionTime == later  # flipped to True


def test_lifecycle_event_carries_phase_transition() -> None:
    session = make_session(phase=Phase.STARTING)
    write = of_type(run(session, [make_machine()], beat(1)), SetStatus)[0]
    [event] = write.events
    assert (event.type, event.source, event.reason, event.time) == (
        "lifecycle",
        "controller",
        "AgentReady",
        T0,
    )
    assert event.data["phase"] == "Running" and event.data["previousPhase"] == "Starting"


def test_requeue_is_never_shorter_than_the_floor() -> None:
    actions = run(make_session(phase=Phase.STARTING), [make_machine(changed=CFG.boot_grace_seconds - 0.01)])
    assert requeue(actions) == MIN_REQUEUE_SECONDS


def test_plan_is_pure_and_deterministic() -> None:
    session = make_session()
    machines = [make_machine("m1"), make_machine("m2", state="stopped", created=5)]
    assert run(session, machines, beat(40)) == run(session, machines, beat(40))


# -- properties ------------------------------------------------------------------------------------------

_ages = st.floats(min_value=0, max_value=5000, allow_nan=False)


@st.composite
def worlds(
    draw: st.DrawFn,
) -> tuple[Session, list[ObservedMachine], Heartbeat | None, LaunchRecord | None, int]:
    mode = draw(st.sampled_from(["task", "chat"]))
    agent_state = draw(st.sampled_from([None, "starting", "running", "idle", "done", "error", "interrupted"]))
    agent = (
        AgentReport(
            state=agent_state, updatedAt=ago(draw(_ages)), costUsd=draw(st.sampled_from([None, 0.5, 5.0]))
        )
        if agent_state
        else None
    )
    phase = draw(st.sampled_from(list(Phase)))
    session = make_session(
        mode,
        phase=phase,
        machine_id=draw(st.sampled_from([None, "m0", "m1", "m2"])),
        restarts=draw(st.integers(0, 6)),
        started_at=draw(st.sampled_from([None, ago(10), ago(700)])),
        finished_at=draw(st.sampled_from([None, ago(5), ago(10**6)])) if phase.finished else None,
        last_start_at=draw(st.sampled_from([None, ago(1), ago(30), ago(1000)])),
        agent=agent,
        deleted_at=draw(st.sampled_from([None, ago(1), ago(100)])),
        restartPolicy={
            "policy": draw(st.sampled_from(["never", "on-failure", "always"])),
            "maxRetries": draw(st.integers(0, 5)),
        },
        idleTimeoutSeconds=draw(st.sampled_from([0, 60, 300])),
        sleep=draw(st.sampled_from(["stop", "suspend"])),
        maxCostUsd=draw(st.sampled_from([None, 1.0])),
        ttlSecondsAfterFinished=draw(st.sampled_from([0, 60, 86400])),
    )
    machines = [
        make_machine(
            f"m{i}",
            draw(st.sampled_from(ALL_STATES)),
            session_id=draw(st.sampled_from([SID, SID, "other", None])),
            managed=draw(st.booleans()),
            created=draw(_ages),
            changed=draw(st.sampled_from([None, 0.5, 20, 400, 900])),
            exit_code=draw(st.sampled_from([None, 0, 1, 137])),
            oom=draw(st.booleans()),
            host_status=draw(st.sampled_from(["ok", "ok", "unreachable"])),
        )
        for i in range(draw(st.integers(0, 4)))
    ]
    heartbeat = draw(st.sampled_from([None, beat(1, "m1"), beat(1, None), beat(100, "m2"), beat(5, "m9")]))
    launch = draw(st.sampled_from([None, LaunchRecord("l-1", ago(10)), LaunchRecord("l-2", ago(1000), "m1")]))
    return session, machines, heartbeat, launch, draw(st.integers(0, 2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_plan_invariants_hold_for_any_world(
    world: tuple[Session, list[ObservedMachine], Heartbeat | None, LaunchRecord | None, int],
) -> None:
    session, machines, heartbeat, launch, inbox = world
    actions = run(session, machines, heartbeat, launch=launch, inbox=inbox)
    assert actions == run(session, machines, heartbeat, launch=launch, inbox=inbox), "deterministic"

    assert len(of_type(actions, CreateMachine)) <= 1
    assert len(of_type(actions, SetStatus)) <= 1
    assert len(of_type(actions, RequeueAfter)) <= 1
    assert all(a.seconds >= TRANSIENT_RECHECK_MIN_SECONDS for a in of_type(actions, RequeueAfter))

    by_id = {m.id: m for m in machines}
    for action in actions:
        mid = machine_id_of(action)
        if mid is None:
            continue
        target = by_id[mid]
        assert target.managed and target.session_id == SID, "only our own machines of this session"
        assert target.state not in GONE_STATES
        if isinstance(action, DestroyMachine):
            assert target.state in KNOWN_STATES, "never destroy what we cannot classify"

    status = status_of(actions)
    if session.status.phase.finished and status is not None:
        assert status.phase in (session.status.phase, Phase.TERMINATING), (
            "a finished session never flips back"
        )
    if session.deleted:
        allowed = (DestroyMachine, StopMachine, SetStatus, RemoveSession, RequeueAfter)
        assert all(isinstance(a, allowed) for a in actions)
        assert status is None or status.phase is Phase.TERMINATING
    if of_type(actions, RemoveSession):
        assert not fly_actions(actions)
    if status is not None and status.phase in LIVE:
        assert not session.status.phase.finished
    writes = of_type(actions, SetStatus)
    if writes:
        assert actions[0] is writes[0], "status goes first"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(ALL_STATES),
            st.sampled_from([SID, "gone", None]),
            st.booleans(),
            _ages,
        ),
        max_size=6,
    )
)
def test_orphan_plan_never_touches_unmanaged_or_known_machines(
    rows: list[tuple[str, str | None, bool, float]],
) -> None:
    machines = [
        make_machine(f"m{i}", state, session_id=sid, managed=managed, created=age)
        for i, (state, sid, managed, age) in enumerate(rows)
    ]
    by_id = {m.id: m for m in machines}
    for action in plan_orphans(machines, {SID}, T0, CFG):
        target = by_id[action.machine_id]
        assert target.managed and target.session_id != SID and target.state in KNOWN_STATES
        assert (T0 - target.created_at).total_seconds() >= CFG.orphan_grace_seconds


def test_created_machine_that_ignores_our_start_counts_as_a_failure() -> None:
    session = make_session(phase=Phase.STARTING, last_start_at=ago(CFG.boot_grace_seconds + 5))
    machine = make_machine(
        state="created", created=CFG.boot_grace_seconds + 100, changed=CFG.boot_grace_seconds + 100
    )
    actions = run(session, [machine])
    status = status_of(actions)
    assert len(of_type(actions, StartMachine)) == 1
    assert status is not None and status.restarts == 1 and status.reason == "NotStarted"


def test_lost_machine_backoff_survives_a_cleared_launch_record() -> None:
    session = make_session(restarts=2, last_start_at=ago(2), restartPolicy={"maxRetries": 10})
    waiting = apply_status(session, run(session, []))
    assert waiting.status.nextRetryAt is not None
    actions = run(waiting, [], now=T0 + timedelta(seconds=1), launch=None)
    assert not of_type(actions, CreateMachine)


# -- webhooks: the deadline notice -----------------------------------------------------------------


def test_a_running_task_near_its_deadline_sends_one_deadline_notice_and_wakes_for_it() -> None:
    # Started 100 s ago with timeoutSeconds=600: the deadline is in 500 s, the warning 60 s before.
    session = make_session(timeoutSeconds=600)
    early = run(session, [make_machine()], beat())
    assert all(w.notices == () for w in of_type(early, SetStatus))
    assert requeue(early) is not None and requeue(early) <= 440

    near = T0 + timedelta(seconds=450)
    fresh = beat(-445)  # 5 s before ``near``
    actions = run(session, [make_machine()], fresh, now=near)
    (write,) = of_type(actions, SetStatus)
    assert write.notices == (
        (
            "session.deadline_approaching",
            {"deadline": (T0 + timedelta(seconds=500)).isoformat(), "timeoutSeconds": 600},
        ),
    )
    assert [c.type for c in write.status.conditions if c.status == "True"][-1] == DEADLINE_APPROACHING
    # The next pass sees the condition: no second notice (the store also sends one per session).
    again = run(apply_status(session, actions), [make_machine()], fresh, now=near + timedelta(seconds=5))
    assert all(w.notices == () for w in of_type(again, SetStatus))


def test_no_deadline_notice_for_chat_sessions_or_when_switched_off() -> None:
    near = T0 + timedelta(seconds=450)
    chat = make_session(mode="chat", timeoutSeconds=600)
    chat_actions = run(chat, [make_machine()], beat(-445), now=near)
    assert all(w.notices == () for w in of_type(chat_actions, SetStatus))
    off = PlanSettings(deadline_warning_seconds=0)
    task = make_session(timeoutSeconds=600)
    actions = run(task, [make_machine()], beat(-445), now=near, settings_=off)
    assert all(w.notices == () for w in of_type(actions, SetStatus))
    assert fly_actions(actions) == []  # still running normally
