"""The pure half of the controller: given what is declared and what is observed, what to do next.

``plan(session, machines, heartbeat, now, settings)`` reads one session, the Fly machines tagged with
its id, its heartbeat, its launch record ("expectation") and its inbox depth, and returns the
:mod:`controller.actions` that move the world one step toward the declaration. It does no I/O,
reads no clock (``now`` is an argument) and draws no random numbers (a launch id is derived from
the inputs), so the same inputs always give the same plan and tests are tables of values.

The reconcile rules of DESIGN.md, first that applies wins:

1. **Deleted** - phase Terminating; every machine is stopped, destroyed when at rest, destroyed with
   force after ``destroy_grace``; once none remains, :class:`RemoveSession`.
2. **Finished** - the agent reported ``done``/``error``, or the task deadline (``timeoutSeconds``
   from ``status.startedAt``) or the budget (``maxCostUsd``) is hit: phase Succeeded/Failed with the
   reason, the machine retired like in rule 1, the record kept for ``ttlSecondsAfterFinished``.
   A finished session never goes back to a live phase.
3. **Failed and restartable** - the machine crashed, failed, vanished, wedged, or its agent stopped
   heart-beating: restart in place (start or Fly restart), or destroy + create, with per-session
   exponential backoff counted from ``status.lastStartAt``; past ``restartPolicy.maxRetries``
   Failed/BackoffLimitExceeded, and at once with policy ``never``.
4. **No machine** - create one, unless a create is in flight (a launch record younger than the
   expectation window whose create has not been answered yet), because Fly's list lags behind its
   creates. A launch whose machine id is known is no longer in flight: if that machine is not
   there (the runtime reads it back by id before acting), it is gone, and the restart backoff of
   rule 3 - not the expectation window - decides when the replacement is created.
5. **Transient Fly state** - wait, looking again soon (:func:`transient_recheck_seconds`: a
   fraction of a second at first, growing to a few seconds), because Fly leaves most transient
   states within a second and a message for a machine that is going to sleep must not wait for
   the next resync; past Fly's wedge thresholds (5 min, 10 min for ``updating``) treat the machine
   as failed (destroy with force + create). Unknown states: wait, never destroy.
6. **Heartbeat lost** - a started machine without a heartbeat past the TTL *and* past the boot
   grace (counted from the machine's last change or our last start) is restarted - but only once
   heartbeats are known: after Redis (or the controller's view of it) comes back from an outage,
   absent heartbeats mean "unknown" until ``heartbeats_known_since`` plus one TTL, the time every
   live agent needs to beat again.
7. **Chat idle** - an idle agent with an empty inbox past ``idleTimeoutSeconds`` is stopped or
   suspended (phase Sleeping, which is not a failure); a sleeping session with pending messages is
   woken. Under ``on-failure``/``never`` a chat machine that stopped cleanly by itself also sleeps.
8. **Duplicates** - of several machines the newest healthy one is kept (ties broken by id) and the
   others are destroyed with force; the rules above then apply to the one kept.
9. **Orphans** - :func:`plan_orphans`: machines tagged ``flyswarm_managed=true`` whose session
   does not exist are destroyed once older than the orphan grace. Untagged machines are never touched,
   nor a pool's unclaimed machines (no session tag: :mod:`controller.pool_plan` owns them).

Ordering contract for the executor: actions come as ``SetStatus`` first, then machine actions,
then ``RemoveSession``, then at most one ``RequeueAfter``. The executor applies them in order and
stops at the first failure, so a restart is counted in ``status`` before it happens (a crash in
between over-counts, never under-counts) and a sleep is recorded before the stop that would
otherwise look like a crash.

Status is written only when it changes, so a converged session yields at most a ``RequeueAfter``
(the soonest deadline the plan knows: heartbeat expiry, boot grace, idle timeout, task deadline,
backoff, TTL). ``lastHeartbeatAt`` is refreshed only along with another change; the live heartbeat
is the heartbeat key itself. Every change of phase, reason or restart count carries a lifecycle
:class:`SessionEvent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from api.models import (
    AGENT_FINISHED_STATES,
    Condition,
    Heartbeat,
    Phase,
    Reason,
    Session,
    SessionEvent,
    StatusUpdate,
)
from api.notify_models import WebhookEvent
from controller import machine_state as ms
from controller.actions import (
    Action,
    CreateMachine,
    CreateVolume,
    DestroyMachine,
    DestroyVolume,
    Notice,
    RemoveSession,
    RequeueAfter,
    RestartMachine,
    SetStatus,
    StartMachine,
    StopMachine,
    SuspendMachine,
)
from controller.backoff import exponential_delay
from controller.machine_state import AT_REST, BOOTING, GONE, KNOWN, SLOW, TRANSIENT, MachineState
from controller.observed import (
    CreateFailure,
    LaunchRecord,
    ObservedMachine,
)
from controller.settings import PlanSettings

#: Never ask to be looked at sooner than this: a plan is not a busy loop.
MIN_REQUEUE_SECONDS = 1.0
#: Re-check bounds for a machine in a transient state (Fly's GET allows 5/s per machine).
TRANSIENT_RECHECK_MIN_SECONDS = 0.25
TRANSIENT_RECHECK_MAX_SECONDS = 5.0

# Reasons are api.models.Reason members (one definition, listed in the README).

# condition types
MACHINE_READY = "MachineReady"
AGENT_HEALTHY = "AgentHealthy"
SLEEPING = "Sleeping"
#: True once a task session is within ``deadline_warning_seconds`` of its deadline (sent as a webhook).
DEADLINE_APPROACHING = "DeadlineApproaching"


_Cond = tuple[str, bool, str, str]  # type, status, reason, message


@dataclass(frozen=True)
class _Pass:
    """The inputs of one plan call, bundled so helpers take one argument."""

    session: Session
    machines: tuple[ObservedMachine, ...]  # this session's managed machines, not gone, sorted by id
    now: datetime
    settings: PlanSettings
    launch: LaunchRecord | None
    inbox_pending: int
    create_failure: CreateFailure | None = None
    heartbeats_known_since: datetime | None = None

    @property
    def sid(self) -> str:
        return self.session.id

    def since(self, at: datetime) -> float:
        return (self.now - at).total_seconds()


# -- entry points ---------------------------------------------------------------------------------


def plan(
    session: Session,
    machines: Sequence[ObservedMachine],
    heartbeat: Heartbeat | None,
    now: datetime,
    settings: PlanSettings,
    *,
    launch: LaunchRecord | None = None,
    inbox_pending: int = 0,
    create_failure: CreateFailure | None = None,
    heartbeats_known_since: datetime | None = None,
) -> list[Action]:
    """The actions that move one session toward its declaration (see the module docstring).

    ``create_failure`` is why Fly refused the last create, if it did: the next create says so in
    the status (reason ``NoCapacity`` or ``CreateFailed``) instead of a bland ``CreateRequested``.
    ``heartbeats_known_since`` is when the runtime's view of heartbeats became trustworthy again
    (Redis reachable after an outage, or restarted): a missing heartbeat is not a lost agent until
    one TTL after it.
    """
    mine = sorted(
        (m for m in machines if m.managed and m.session_id == session.id and m.state not in GONE),
        key=lambda m: m.id,
    )
    gone = {m.id for m in machines if m.state in GONE}
    if heartbeat is not None and heartbeat.machineId in gone:
        heartbeat = None  # the beating machine is known to be destroyed: its last beat is history
    p = _Pass(
        session,
        tuple(mine),
        now,
        settings,
        launch,
        max(inbox_pending, 0),
        create_failure,
        heartbeats_known_since,
    )
    if session.deleted:
        actions = _plan_deleted(p)
    elif session.status.phase.finished:
        actions = _plan_finished(p)
    else:
        actions = _plan_live(p, heartbeat)
    return _ordered(session.id, actions)


def plan_orphans(
    machines: Sequence[ObservedMachine],
    known_session_ids: set[str] | frozenset[str],
    now: datetime,
    settings: PlanSettings,
) -> list[DestroyMachine]:
    """Destroy machines tagged as ours whose session does not exist (rule 9).

    The grace covers creates whose launch record and session are still being written and list lag;
    a machine without ``flyswarm_managed=true`` is never touched, nor one in a state we do not know.
    """
    out: list[DestroyMachine] = []
    for m in sorted(machines, key=lambda m: m.id):
        if not m.managed or (m.session_id is not None and m.session_id in known_session_ids):
            continue
        if m.unclaimed_pool_machine:
            continue  # a pool's machine: the pool plan keeps it or destroys it (controller/pool_plan.py)
        if m.state in GONE or m.state not in KNOWN:
            continue
        if (now - m.created_at).total_seconds() < settings.orphan_grace_seconds:
            continue
        if m.state == MachineState.DESTROYING and (now - m.last_change).total_seconds() < _wedge_seconds(
            m, settings
        ):
            continue  # already going; only a wedged destroy is repeated
        out.append(
            DestroyMachine(
                m.session_id,
                m.id,
                force=True,
                reason=Reason.ORPHAN_MACHINE,
                message=f"machine {m.id} is tagged for session {m.session_id!r}, which does not exist",
            )
        )
    return out


def restart_delay(restarts: int, settings: PlanSettings) -> float:
    """Seconds after restart ``restarts`` (1-based) until the next may happen: base*2^(n-1), capped."""
    # No jitter: the plan is deterministic (spreading restarts out is the work queue's job).
    return exponential_delay(
        restarts,
        base=settings.restart_backoff_base_seconds,
        cap=settings.restart_backoff_max_seconds,
        jitter=0.0,
    )


def transient_recheck_seconds(in_state_seconds: float) -> float:
    """When to look again at a machine that has been in a transient state for ``in_state_seconds``.

    Half the time it has spent there, within [0.25 s, 5 s]: a suspend or a start is over in a
    fraction of a second on Fly, a stop in a few seconds; a machine that takes longer is looked at
    less often, and the wedge threshold still bounds the wait.
    """
    return min(max(in_state_seconds / 2, TRANSIENT_RECHECK_MIN_SECONDS), TRANSIENT_RECHECK_MAX_SECONDS)


def launch_id_for(session: Session, now: datetime) -> str:
    """A launch id unique per session and attempt, derived from the inputs only (no randomness).

    ``g<generation>r<restarts>-<unix ms in base 36>``; the session id is in the machine's metadata
    and name, so it is not repeated here.
    """
    millis = int(now.timestamp() * 1000)
    return f"g{session.metadata.generation}r{session.status.restarts}-{_base36(millis)}"


# -- rule 1: deleted ------------------------------------------------------------------------------


def _plan_deleted(p: _Pass) -> list[Action]:
    if not p.machines:
        return [
            RemoveSession(
                p.sid, reason=Reason.DELETED, message="session deleted and all its machines are gone"
            )
        ]
    since = p.session.metadata.deletionTimestamp or p.now
    actions = _write(
        p, Phase.TERMINATING, Reason.DELETED, "session deleted; retiring its machines", conditions=None
    )
    return actions + _retire(p, since, passive=False, reason=Reason.DELETED)


# -- rule 2: finished -----------------------------------------------------------------------------


def _plan_finished(p: _Pass) -> list[Action]:
    """A session already Succeeded/Failed: retire machines, then keep the record until its TTL."""
    status = p.session.status
    actions: list[Action] = []
    finished_at = status.finishedAt
    if finished_at is None:  # written by an older controller, or lost: start the TTL clock now
        finished_at = p.now
        actions += _write(p, status.phase, status.reason, status.message, conditions=None, finishedAt=p.now)
    if p.machines:
        return actions + _retire(p, finished_at, passive=_agent_finished(p.session), reason=Reason.FINISHED)
    expires = finished_at + timedelta(seconds=p.session.spec.ttlSecondsAfterFinished)
    if p.now >= expires:
        return [RemoveSession(p.sid, reason=Reason.TTL_EXPIRED, message="ttlSecondsAfterFinished elapsed")]
    return actions + [_requeue(p, expires, Reason.TTL_EXPIRED, "waiting for ttlSecondsAfterFinished")]


def _finish_cause(p: _Pass) -> tuple[Phase, str, str] | None:
    """Whether a live session is now finished: agent report, task deadline, budget."""
    session, agent, spec = p.session, p.session.agent, p.session.spec
    if agent is not None and agent.state == "done":
        return (
            Phase.SUCCEEDED,
            Reason.reported(agent.reason, Reason.COMPLETED),
            agent.message or "the agent finished",
        )
    if (exhausted := session.budget_exhausted()) is not None:  # the gateway's metered usage counts
        return Phase.FAILED, Reason.BUDGET_EXCEEDED, exhausted
    if agent is not None and agent.state == "error":
        return (
            Phase.FAILED,
            Reason.reported(agent.reason, Reason.AGENT_ERROR),
            agent.message or "the agent reported an error",
        )
    started = session.status.startedAt
    if spec.mode == "task" and started is not None and p.since(started) >= spec.timeoutSeconds:
        return (
            Phase.FAILED,
            Reason.DEADLINE_EXCEEDED,
            f"the task ran longer than timeoutSeconds={spec.timeoutSeconds}",
        )
    return None


def _finish(p: _Pass, phase: Phase, reason: str, message: str) -> list[Action]:
    conditions: list[_Cond] = [
        (MACHINE_READY, False, Reason.FINISHED, "the session is finished"),
        (AGENT_HEALTHY, False, Reason.FINISHED, "the session is finished"),
        (SLEEPING, False, Reason.FINISHED, "the session is finished"),
    ]
    actions = _write(p, phase, reason, message, conditions=conditions, finishedAt=p.now, nextRetryAt=None)
    if p.machines:
        return actions + _retire(p, p.now, passive=_agent_finished(p.session), reason=Reason.FINISHED)
    ttl = p.session.spec.ttlSecondsAfterFinished
    return actions + [_requeue(p, p.now + timedelta(seconds=ttl), Reason.TTL_EXPIRED, "waiting for the TTL")]


def _agent_finished(session: Session) -> bool:
    return session.agent is not None and session.agent.state in AGENT_FINISHED_STATES


def _retire(p: _Pass, since: datetime, *, passive: bool, reason: str) -> list[Action]:
    """Make every machine of the session go away, gently first.

    A machine at rest is destroyed without force. A started one is stopped (SIGTERM, so the agent
    flushes) - or, when ``passive`` because the agent reported and is exiting by itself, left
    alone - and destroyed with force once ``destroy_grace`` has passed since ``since``. Unknown
    states are waited on: destroying what we cannot see is how fleets get wiped.
    """
    actions: list[Action] = []
    grace_end = since + timedelta(seconds=p.settings.destroy_grace_seconds)
    for m in p.machines:
        if m.state not in KNOWN:
            actions.append(
                _requeue_in(p, p.settings.resync_seconds, Reason.UNKNOWN_STATE, f"machine {m.id}: {m.state}")
            )
        elif m.state in AT_REST:
            actions.append(
                DestroyMachine(p.sid, m.id, force=False, reason=reason, message=f"{m.state}: destroy")
            )
        elif m.state == MachineState.DESTROYING:
            wedge_end = m.last_change + timedelta(seconds=_wedge_seconds(m, p.settings))
            if p.now >= wedge_end:
                actions.append(
                    DestroyMachine(p.sid, m.id, force=True, reason=reason, message="destroy wedged")
                )
            else:
                actions.append(_recheck(p, m.last_change, wedge_end, f"machine {m.id} is destroying"))
        elif p.now >= grace_end:
            actions.append(
                DestroyMachine(p.sid, m.id, force=True, reason=reason, message=f"{m.state} past the grace")
            )
        else:
            stopping = m.state == MachineState.STARTED and not passive
            if stopping:
                actions.append(StopMachine(p.sid, m.id, reason=reason, message="stop before destroy"))
            # Destroy as soon as it is at rest: a machine we stop, or one in a transient state, is
            # looked at again shortly; a started one left to exit by itself at the grace's end.
            since_change = p.now if stopping else m.last_change
            if stopping or m.state in TRANSIENT:
                actions.append(_recheck(p, since_change, grace_end, f"machine {m.id} is {m.state}"))
            else:
                actions.append(_requeue(p, grace_end, Reason.WAITING, f"machine {m.id} is {m.state}"))
    return actions


# -- rules 3-8: live sessions ----------------------------------------------------------------------


def _plan_live(p: _Pass, heartbeat: Heartbeat | None) -> list[Action]:
    finish = _finish_cause(p)
    if finish is not None:
        return _finish(p, *finish)
    keeper, extras = _choose_keeper(p.machines, heartbeat)
    actions: list[Action] = [
        DestroyMachine(
            p.sid, m.id, force=True, reason=Reason.DUPLICATE_MACHINE, message=f"keeping {keeper.id}"
        )
        for m in extras
        if keeper is not None and _may_destroy_duplicate(p, m)
    ]
    if keeper is None:
        return actions + _no_machine(p, heartbeat)
    hb = _heartbeat_of(heartbeat, keeper)
    if keeper.state not in KNOWN:
        return actions + _unknown_state(p, keeper)
    if keeper.host_status != "ok" and not _fresh(p, hb):
        return actions + _host_unreachable(p, keeper, hb)
    if keeper.state in TRANSIENT:
        return actions + _transient(p, keeper, hb)
    if keeper.state == MachineState.STARTED:
        return actions + _started(p, keeper, hb)
    return actions + _at_rest(p, keeper, hb)


def _choose_keeper(
    machines: Sequence[ObservedMachine], heartbeat: Heartbeat | None
) -> tuple[ObservedMachine | None, list[ObservedMachine]]:
    """The machine to keep (newest of the healthiest, ties by id) and the duplicates."""
    if not machines:
        return None, []

    def health(m: ObservedMachine) -> int:
        if m.state == MachineState.STARTED and m.host_status == "ok":
            beating = heartbeat is not None and heartbeat.machineId == m.id
            return 5 if beating else 4
        if m.state in BOOTING:
            return 3
        if m.state in ms.SLEEPING:
            return 2
        return 1  # failed, launch_failed, destroying, replaced, migrated, unknown, host not ok

    keeper = max(machines, key=lambda m: (health(m), m.created_at, m.id))
    return keeper, [m for m in machines if m.id != keeper.id]


def _may_destroy_duplicate(p: _Pass, m: ObservedMachine) -> bool:
    if m.state not in KNOWN:
        return False
    if m.state == MachineState.DESTROYING:
        return p.since(m.last_change) >= _wedge_seconds(m, p.settings)
    return True


def _no_machine(p: _Pass, heartbeat: Heartbeat | None) -> list[Action]:
    status, launch = p.session.status, p.launch
    if launch is not None and launch.machine_id is None:
        # Only a create whose answer we have not seen is in flight: once Fly named the machine, the
        # list (or a GET by id) shows it, and its absence means it is gone.
        expected_until = launch.requested_at + timedelta(seconds=p.settings.create_expectation_seconds)
        if p.now < expected_until:
            reason, message = _keep(
                p, Phase.CREATING, Reason.CREATE_REQUESTED, f"launch {launch.launch_id} in flight"
            )
            conds = _live_conditions(None, False, False)
            return _write(p, Phase.CREATING, reason, message, conditions=conds) + [
                _requeue(p, expected_until, Reason.WAITING, "waiting for the created machine to be listed")
            ]
    if _fresh(p, heartbeat) and heartbeat is not None:
        # An agent still beats although no machine is listed: list lag, or a machine that just went.
        # Unknown is not dead: look again when the heartbeat would expire.
        deadline = heartbeat.at + timedelta(seconds=p.settings.heartbeat_ttl_seconds)
        return [_requeue(p, deadline, Reason.WAITING, "heartbeat without a listed machine")]
    if status.phase is Phase.SLEEPING:
        if p.inbox_pending:
            return _create(
                p, Reason.WAKE, "waking: a message is pending and the machine is gone", count=False
            )
        return _write(
            p,
            Phase.SLEEPING,
            status.reason,
            status.message,
            conditions=_live_conditions(None, False, True),
            machineId=None,
        )
    if status.machineId is not None or launch is not None or status.nextRetryAt is not None:
        gone = status.machineId or (launch.machine_id if launch else None) or "the launched machine"
        return _restart(p, None, Reason.MACHINE_LOST, f"machine {gone} is gone", "create")
    if p.create_failure is not None:
        failure = p.create_failure
        reason = (
            failure.reason
            if failure.reason in (Reason.NO_CAPACITY, Reason.CREATE_FAILED)
            else Reason.CREATE_FAILED
        )
        return _create(p, reason, f"retrying; Fly refused the last create: {failure.message}", count=False)
    return _create(p, Reason.CREATE_REQUESTED, "creating the session's machine", count=False)


def _unknown_state(p: _Pass, keeper: ObservedMachine) -> list[Action]:
    status = p.session.status
    conds: list[_Cond] = [
        (MACHINE_READY, False, Reason.UNKNOWN_STATE, f"machine {keeper.id} is {keeper.state!r}")
    ]
    return _write(p, status.phase, status.reason, status.message, conditions=conds, machineId=keeper.id) + [
        _requeue_in(
            p, p.settings.resync_seconds, Reason.UNKNOWN_STATE, f"unknown machine state {keeper.state!r}"
        )
    ]


def _host_unreachable(p: _Pass, keeper: ObservedMachine, hb: Heartbeat | None) -> list[Action]:
    """Fly cannot see the host: the state is unknown. Wait, and only past the wedge time recreate."""
    seen = max(keeper.last_change, hb.at) if hb is not None else keeper.last_change
    wedge_end = seen + timedelta(seconds=p.settings.wedge_seconds)
    if p.now >= wedge_end:
        msg = f"host of machine {keeper.id} is {keeper.host_status} since {seen.isoformat()}"
        return _restart(p, keeper, Reason.HOST_UNREACHABLE, msg, "recreate")
    status = p.session.status
    conds: list[_Cond] = [(MACHINE_READY, False, Reason.HOST_UNREACHABLE, f"host is {keeper.host_status}")]
    return _write(p, status.phase, status.reason, status.message, conditions=conds, machineId=keeper.id) + [
        _requeue(p, wedge_end, Reason.WAITING, "host unreachable")
    ]


def _transient(p: _Pass, keeper: ObservedMachine, hb: Heartbeat | None) -> list[Action]:
    status = p.session.status
    ref = _latest(keeper.last_change, status.lastStartAt)
    wedge_end = ref + timedelta(seconds=_wedge_seconds(keeper, p.settings))
    if p.now >= wedge_end:
        msg = f"machine {keeper.id} is {keeper.state} since {ref.isoformat()}"
        return _restart(p, keeper, Reason.MACHINE_WEDGED, msg, "recreate")
    if keeper.state == MachineState.CREATING:
        phase = Phase.CREATING
    elif status.phase in (Phase.PENDING, Phase.CREATING):
        phase = Phase.STARTING
    else:
        phase = status.phase
    reason, message = _keep(p, phase, Reason.MACHINE_STARTING, f"machine {keeper.id} is {keeper.state}")
    conds = _live_conditions(keeper, _fresh(p, hb), phase is Phase.SLEEPING)
    fields: dict[str, Any] = {"machineId": keeper.id, "region": keeper.region}
    return _write(p, phase, reason, message, conditions=conds, **fields) + [
        _recheck(p, ref, wedge_end, f"machine {keeper.id} is {keeper.state}")
    ]


def _started(p: _Pass, keeper: ObservedMachine, hb: Heartbeat | None) -> list[Action]:
    status, spec, agent = p.session.status, p.session.spec, p.session.agent
    if status.phase is Phase.SLEEPING and not p.inbox_pending and (agent is None or agent.state != "running"):
        # We asked it to sleep and the list does not show it yet (or someone woke it for nothing).
        return [_sleep_action(p, keeper)]
    fresh = _fresh(p, hb)
    fields: dict[str, Any] = {
        "machineId": keeper.id,
        "region": keeper.region,
        "startedAt": status.startedAt or p.now,
        "nextRetryAt": None,
    }
    if hb is None or not fresh:
        boot_end = _latest(keeper.last_change, status.lastStartAt) + timedelta(
            seconds=p.settings.boot_grace_seconds
        )
        known_at = _heartbeats_known_at(p)
        if p.now >= boot_end and known_at is not None and p.now < known_at:
            # Redis just came back: the heartbeat may have expired while the agent could not write
            # it. Absent is unknown, not dead, until every live agent has had a TTL to beat again.
            return [
                _requeue(
                    p, known_at, Reason.HEARTBEATS_UNKNOWN, "heartbeats are unknown after a Redis outage"
                )
            ]
        if p.now >= boot_end:
            last = hb.at.isoformat() if hb is not None else "never"
            return _restart(
                p, keeper, Reason.HEARTBEAT_LOST, f"no heartbeat from {keeper.id} (last {last})", "restart"
            )
        reason, message = _keep(
            p, Phase.STARTING, Reason.MACHINE_STARTING, f"machine {keeper.id} started; waiting for the agent"
        )
        conds = _live_conditions(keeper, False, False)
        return _write(p, Phase.STARTING, reason, message, conditions=conds, **fields) + [
            _requeue(p, boot_end, Reason.WAITING, "boot grace")
        ]
    reason, message = _keep(p, Phase.RUNNING, Reason.AGENT_READY, f"agent on {keeper.id} is heart-beating")
    conds = _live_conditions(keeper, True, False)
    hb_deadline = hb.at + timedelta(seconds=p.settings.heartbeat_ttl_seconds)
    deadlines = [hb_deadline]
    notices: tuple[Notice, ...] = ()
    if spec.mode == "task":
        deadline = fields["startedAt"] + timedelta(seconds=spec.timeoutSeconds)
        deadlines.append(deadline)
        warn_at = deadline - timedelta(seconds=p.settings.deadline_warning_seconds)
        if p.settings.deadline_warning_seconds > 0 and p.now >= warn_at:
            near_msg = f"the deadline is {deadline.isoformat()}"
            near: _Cond = (DEADLINE_APPROACHING, True, DEADLINE_APPROACHING, near_msg)
            conds = [*conds, near]
            if not any(c.type == DEADLINE_APPROACHING for c in status.conditions):
                data = {"deadline": deadline.isoformat(), "timeoutSeconds": spec.timeoutSeconds}
                notices = ((WebhookEvent.DEADLINE_APPROACHING.value, data),)
        elif p.settings.deadline_warning_seconds > 0:
            deadlines.append(warn_at)
    actions = _write(
        p, Phase.RUNNING, reason, message, conditions=conds, heartbeat_at=hb.at, notices=notices, **fields
    )
    idle = _idle_deadline(p, keeper)
    if idle is not None and p.now >= idle:
        conds = _live_conditions(keeper, True, True)
        msg = f"idle for {spec.idleTimeoutSeconds}s with an empty inbox; {spec.sleep}"
        return _write(p, Phase.SLEEPING, Reason.IDLE, msg, conditions=conds, **fields) + [
            _sleep_action(p, keeper)
        ]
    if idle is not None:
        deadlines.append(idle)
    return actions + [_requeue(p, min(deadlines), Reason.WAITING, "next deadline")]


def _idle_deadline(p: _Pass, keeper: ObservedMachine) -> datetime | None:
    """When an idle chat session should go to sleep, or None when it should not."""
    spec, agent, status = p.session.spec, p.session.agent, p.session.status
    if spec.mode != "chat" or spec.idleTimeoutSeconds <= 0 or p.inbox_pending:
        return None
    if agent is None or agent.state != "idle":
        return None
    since = _latest(_latest(keeper.last_change, agent.updatedAt), status.lastStartAt)
    return since + timedelta(seconds=spec.idleTimeoutSeconds)


def _sleep_action(p: _Pass, keeper: ObservedMachine) -> Action:
    if p.session.spec.sleep == "suspend":
        return SuspendMachine(p.sid, keeper.id, reason=Reason.IDLE, message="suspend idle chat session")
    return StopMachine(p.sid, keeper.id, reason=Reason.IDLE, message="stop idle chat session")


def _at_rest(p: _Pass, keeper: ObservedMachine, hb: Heartbeat | None) -> list[Action]:
    """Machine ``stopped``, ``suspended``, ``failed`` or ``created``."""
    status, spec = p.session.status, p.session.spec
    kicked = status.lastStartAt
    if kicked is not None and keeper.last_change <= kicked:
        settle_end = kicked + timedelta(seconds=p.settings.boot_grace_seconds)
        if p.now < settle_end:  # our start/create has not shown in the list yet
            return [_recheck(p, kicked, settle_end, f"waiting for machine {keeper.id} to start")]
    sleeping_fields: dict[str, Any] = {"machineId": keeper.id, "region": keeper.region}
    if status.phase is Phase.SLEEPING:
        if p.inbox_pending:
            return _start(p, keeper, Reason.WAKE, "waking: a message is pending")
        conds = _live_conditions(keeper, False, True)
        return _write(p, Phase.SLEEPING, status.reason, status.message, conditions=conds, **sleeping_fields)
    if keeper.state == MachineState.CREATED:
        start_by = keeper.last_change + timedelta(seconds=p.settings.boot_grace_seconds)
        if p.now < start_by:
            # Fly starts a created machine within a second: look again soon, start it at the grace.
            return [_recheck(p, keeper.last_change, start_by, f"machine {keeper.id} created, not started")]
        message = f"machine {keeper.id} was created but never started"
        if kicked is not None and kicked >= keeper.created_at:
            # We already started this very machine once and it is still only created: a failure.
            return _restart(p, keeper, Reason.NOT_STARTED, message, "start")
        return _start(p, keeper, Reason.NOT_STARTED, message)
    cause, message = _exit_cause(keeper)
    if (
        spec.mode == "chat"
        and spec.restartPolicy.policy != "always"
        and cause in (Reason.MACHINE_STOPPED, Reason.MACHINE_SUSPENDED)
    ):
        # A chat machine that stopped cleanly (host maintenance, an operator) is asleep, not dead:
        # the next message wakes it. Policy `always` restarts it instead.
        conds = _live_conditions(keeper, False, True)
        return _write(p, Phase.SLEEPING, cause, message, conditions=conds, **sleeping_fields)
    settle = keeper.last_change + timedelta(seconds=p.settings.heartbeat_ttl_seconds)
    if spec.mode == "task" and cause == Reason.MACHINE_STOPPED and p.now < settle:
        # A clean exit of a task usually comes with a result that may not have been read yet.
        return [_requeue(p, settle, Reason.WAITING, "clean exit; waiting for the agent's report")]
    return _restart(p, keeper, cause, message, "start")


def _exit_cause(m: ObservedMachine) -> tuple[str, str]:
    if m.state == MachineState.FAILED:
        return Reason.MACHINE_FAILED, f"machine {m.id} failed"
    if m.state == MachineState.SUSPENDED:
        return Reason.MACHINE_SUSPENDED, f"machine {m.id} was suspended"
    if m.last_exit_oom:
        return Reason.OOM_KILLED, f"machine {m.id} ran out of memory"
    if m.last_exit_code not in (None, 0):
        return Reason.CRASHED, f"machine {m.id} exited with code {m.last_exit_code}"
    return Reason.MACHINE_STOPPED, f"machine {m.id} stopped"


# -- restarts and creates --------------------------------------------------------------------------


def _restart(p: _Pass, keeper: ObservedMachine | None, cause: str, message: str, how: str) -> list[Action]:
    """Rule 3: restart per policy and backoff, or give up.

    ``how``: ``start`` (machine at rest), ``restart`` (Fly restart of a started machine),
    ``recreate`` (destroy with force + create), ``create`` (machine gone).
    """
    status, policy = p.session.status, p.session.spec.restartPolicy
    if policy.policy == "never":
        return _finish(p, Phase.FAILED, cause, f"{message} (restartPolicy never)")
    if status.restarts >= policy.maxRetries:
        msg = f"{message}; gave up after {status.restarts} restarts (maxRetries={policy.maxRetries})"
        return _finish(p, Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, msg)
    due = p.now
    if status.restarts > 0 and status.lastStartAt is not None:
        due = status.lastStartAt + timedelta(seconds=restart_delay(status.restarts, p.settings))
    attempt = f"restart {status.restarts + 1}/{policy.maxRetries}"
    if p.now < due:
        conds = _live_conditions(keeper, False, False)
        msg = f"{message}; {attempt} at {due.isoformat()}"
        fields: dict[str, Any] = {"nextRetryAt": due, "machineId": keeper.id if keeper else status.machineId}
        return _write(p, Phase.PENDING, cause, msg, conditions=conds, **fields) + [
            _requeue(p, due, Reason.BACK_OFF, attempt)
        ]
    msg = f"{message}; {attempt}"
    if how == "create" or keeper is None:
        return _create(p, cause, msg, count=True)
    if how == "recreate":
        destroy = DestroyMachine(p.sid, keeper.id, force=True, reason=cause, message=msg)
        return [destroy] + _create(p, cause, msg, count=True)
    action: Action = (
        RestartMachine(p.sid, keeper.id, reason=cause, message=msg, pool_machine=keeper.pool is not None)
        if how == "restart"
        else StartMachine(p.sid, keeper.id, reason=cause, message=msg, pool_machine=_boots_pool_agent(keeper))
    )
    return _write(
        p,
        Phase.STARTING,
        cause,
        msg,
        conditions=_live_conditions(keeper, False, False),
        **_started_fields(p, keeper, count=True),
    ) + [action]


def _start(p: _Pass, keeper: ObservedMachine, reason: str, message: str) -> list[Action]:
    """Start a machine at rest without counting a restart (wake, or a never-started machine)."""
    conds = _live_conditions(keeper, False, False)
    fields = _started_fields(p, keeper, count=False)
    return _write(p, Phase.STARTING, reason, message, conditions=conds, **fields) + [
        StartMachine(p.sid, keeper.id, reason=reason, message=message, pool_machine=_boots_pool_agent(keeper))
    ]


def _boots_pool_agent(keeper: ObservedMachine) -> bool:
    """A start of a claimed pool machine that boots its agent afresh (a resume keeps the process)."""
    return keeper.pool is not None and keeper.state != MachineState.SUSPENDED


def _started_fields(p: _Pass, keeper: ObservedMachine, *, count: bool) -> dict[str, Any]:
    status = p.session.status
    return {
        "machineId": keeper.id,
        "region": keeper.region,
        "lastStartAt": p.now,
        "nextRetryAt": None,
        "restarts": status.restarts + 1 if count else status.restarts,
    }


def _create(p: _Pass, reason: str, message: str, *, count: bool) -> list[Action]:
    status, spec = p.session.status, p.session.spec
    region = spec.machine.region or p.settings.default_region
    fields: dict[str, Any] = {
        "machineId": None,
        "region": region,
        "lastStartAt": p.now,
        "nextRetryAt": None,
        "restarts": status.restarts + 1 if count else status.restarts,
    }
    conds = _live_conditions(None, False, False)
    return _write(p, Phase.CREATING, reason, message, conditions=conds, **fields) + [
        CreateMachine(p.sid, launch_id_for(p.session, p.now), region, reason=reason, message=message)
    ]


# -- status ---------------------------------------------------------------------------------------


def _write(
    p: _Pass,
    phase: Phase,
    reason: str | None,
    message: str | None,
    *,
    conditions: Sequence[_Cond] | None,
    heartbeat_at: datetime | None = None,
    notices: tuple[Notice, ...] = (),
    **fields: Any,
) -> list[Action]:
    """A SetStatus when the status would change, else nothing; a lifecycle event on transitions."""
    old = p.session.status
    update: dict[str, Any] = {
        "phase": phase,
        "reason": reason,
        "message": message,
        "observedGeneration": p.session.metadata.generation,
        **fields,
    }
    if conditions is not None:
        update["conditions"] = _merge_conditions(old.conditions, conditions, p.now)
    # Validated: a misspelled field or a phase/reason outside the enums raises here, in the plan.
    new = StatusUpdate.model_validate(update).applied_to(old)
    if new == old:
        return []
    if heartbeat_at is not None:
        new = StatusUpdate(lastHeartbeatAt=heartbeat_at).applied_to(new)
    events: tuple[SessionEvent, ...] = ()
    if (new.phase, new.reason) != (old.phase, old.reason) or new.restarts != old.restarts:
        events = (
            SessionEvent(
                type="lifecycle",
                source="controller",
                reason=reason or phase.value,
                message=message,
                data={
                    "phase": phase.value,
                    "previousPhase": old.phase.value,
                    "restarts": new.restarts,
                    "machineId": new.machineId,
                },
                time=p.now,
            ),
        )
    return [SetStatus(p.sid, new, events, notices, reason=reason or phase.value, message=message or "")]


def _keep(p: _Pass, phase: Phase, reason: str, message: str) -> tuple[str | None, str | None]:
    """Keep the current reason/message while the phase does not change (no churn), else the new ones."""
    status = p.session.status
    if status.phase is phase:
        return status.reason, status.message
    return reason, message


def _live_conditions(keeper: ObservedMachine | None, healthy: bool, sleeping: bool) -> list[_Cond]:
    if keeper is None:
        ready: _Cond = (MACHINE_READY, False, "NoMachine", "the session has no machine")
    elif keeper.state == MachineState.STARTED:
        ready = (MACHINE_READY, True, "MachineStarted", f"machine {keeper.id} is started")
    else:
        ready = (
            MACHINE_READY,
            False,
            _camel("machine_" + keeper.state),
            f"machine {keeper.id} is {keeper.state}",
        )
    agent: _Cond = (
        (AGENT_HEALTHY, True, "HeartbeatFresh", "the agent is heart-beating")
        if healthy
        else (AGENT_HEALTHY, False, "NoHeartbeat", "no fresh heartbeat")
    )
    sleep: _Cond = (
        (SLEEPING, True, Reason.IDLE, "the machine sleeps until a message arrives")
        if sleeping
        else (SLEEPING, False, "Awake", "the session is not sleeping")
    )
    return [ready, agent, sleep]


def _merge_conditions(old: Sequence[Condition], new: Sequence[_Cond], now: datetime) -> list[Condition]:
    """Replace conditions by type; lastTransitionTime moves only when the status flips."""
    previous = {c.type: c for c in old}
    merged: list[Condition] = []
    for type_, ok, reason, message in new:
        value = "True" if ok else "False"
        prev = previous.get(type_)
        since = prev.lastTransitionTime if prev is not None and prev.status == value else now
        merged.append(
            Condition(type=type_, status=value, reason=reason, message=message, lastTransitionTime=since)
        )
    replaced = {c[0] for c in new}
    return merged + [c for c in old if c.type not in replaced]


# -- small helpers ---------------------------------------------------------------------------------


def _heartbeat_of(heartbeat: Heartbeat | None, keeper: ObservedMachine) -> Heartbeat | None:
    """The heartbeat if it can be this machine's (one naming another machine is stale)."""
    if heartbeat is None or (heartbeat.machineId is not None and heartbeat.machineId != keeper.id):
        return None
    return heartbeat


def _heartbeats_known_at(p: _Pass) -> datetime | None:
    """When a missing heartbeat starts to mean a lost agent, if that is still in the future."""
    since = p.heartbeats_known_since
    if since is None:
        return None
    known_at = since + timedelta(seconds=p.settings.heartbeat_ttl_seconds)
    return known_at if p.now < known_at else None


def _fresh(p: _Pass, hb: Heartbeat | None) -> bool:
    return hb is not None and p.since(hb.at) <= p.settings.heartbeat_ttl_seconds


def _wedge_seconds(m: ObservedMachine, settings: PlanSettings) -> float:
    return settings.wedge_updating_seconds if m.state in SLOW else settings.wedge_seconds


def _latest(a: datetime, b: datetime | None) -> datetime:
    return a if b is None or a >= b else b


def _requeue(p: _Pass, at: datetime, reason: str, message: str) -> RequeueAfter:
    return _requeue_in(p, (at - p.now).total_seconds(), reason, message)


def _recheck(p: _Pass, since: datetime, deadline: datetime, message: str) -> RequeueAfter:
    """Look again soon at a machine expected to change (see :func:`transient_recheck_seconds`),
    and no later than ``deadline``."""
    soon = transient_recheck_seconds(max(p.since(since), 0.0))
    seconds = min(soon, (deadline - p.now).total_seconds())
    return RequeueAfter(
        p.sid, max(seconds, TRANSIENT_RECHECK_MIN_SECONDS), reason=Reason.RECHECK, message=message
    )


def _requeue_in(p: _Pass, seconds: float, reason: str, message: str) -> RequeueAfter:
    return RequeueAfter(p.sid, max(seconds, MIN_REQUEUE_SECONDS), reason=reason, message=message)


def _ordered(session_id: str, actions: list[Action]) -> list[Action]:
    """Status first, machine actions (one per machine), removal, then the soonest requeue only."""
    statuses = [a for a in actions if isinstance(a, SetStatus)][-1:]
    machine_actions: list[Action] = []
    seen: set[tuple[str, str]] = set()
    for a in actions:
        if isinstance(a, SetStatus | RemoveSession | RequeueAfter | CreateVolume | DestroyVolume):
            continue  # volume actions are volume_plan.py's, added after this plan
        key = ("create", a.launch_id) if isinstance(a, CreateMachine) else (a.kind, a.machine_id)
        destroy_key = ("destroy", key[1])
        if key in seen or destroy_key in seen:
            continue
        seen.add(key)
        machine_actions.append(a)
    removes = [a for a in actions if isinstance(a, RemoveSession)][:1]
    requeues = [a for a in actions if isinstance(a, RequeueAfter)]
    soonest = [min(requeues, key=lambda r: r.seconds)] if requeues and not removes else []
    return [*statuses, *machine_actions, *removes, *soonest]


def _base36(value: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        value, rem = divmod(value, 36)
        out = digits[rem] + out
        if not value:
            return out


def _camel(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))
