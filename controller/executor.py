"""The executor: turns one planned :data:`~controller.actions.Action` into Fly calls and store writes.

``plan()`` decides; this module only applies, and reports what came of it as an
:data:`~controller.actions.Outcome` value (done, requeue, transient, permanent). It never decides
*whether* to act, with three safety exceptions that belong to the runtime, not the plan:

* **Only the session's owner acts.** Every action first checks :class:`Authority` for its session
  (the lease of the session's shard; orphans: the leader lease); a Fly call's deadline never
  outlives that term (``authority.remaining_for``), and status writes carry the shard's fencing
  token (``authority.fence_for``) so Redis refuses them after a newer holder took over.
* **Safe creates.** The launch id is recorded in Redis *before* the create call and the machine
  carries it in metadata (``flyswarm_launch``). An ambiguous failure (408/5xx/timeout after the
  request may have reached Fly) is never retried blindly: the machine is looked up by that
  metadata; if the (lagging) list does not show it yet, the launch record stays in place and the
  plan holds off until the create expectation expires. Every create is also an in-memory
  expectation (:mod:`controller.expectations`), so a lagging list never causes a second create.
* **Create pacing.** Creates are admitted at Fly's per-app create rate (:class:`CreatePacer`): a
  session whose turn is later is requeued for exactly then instead of holding a worker. With N
  replicas each runs at 1/N of it (:meth:`CreatePacer.set_share`). With several agent apps each
  slot names its app (:mod:`controller.fly_apps`), recorded in the launch record before the call.
* **Pool claims first.** When a warm pool fits the session, the create becomes a claim of a ready
  pool machine (:mod:`controller.pool_claim`): no create slot, one resume; a miss creates at once.
* **Destroy budget.** At most ``max_destroys_per_pass`` destroys per resync pass; the rest wait.

One action is one Fly call: the executor never looks at a machine to choose another verb, and
never chains stop, wait and destroy - the plan already expresses that escalation, one step per
pass. A 412 ("not in a state for that") is a requeue, and the plan decides again on fresh data.
After a call the machine is read back once (``_look_again``) so a lagging list cannot undo what we
just did; after an ambiguous create it is looked up by its launch tag - reads, not decisions.

Each launch gets a fresh per-session token (``ControllerStore.mint_session_token``; the previous
machine's stops working at once): the only credential a machine holds. It opens nothing but the
gateway, for this session, until the session finishes (then it is revoked). The Fly token, Redis
and the Anthropic key never reach a machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from api.logs import get_logger
from api.models import Reason, Session, SessionEvent, parse_timestamp, utcnow
from api.store_base import StoreUnavailable
from api.store_controller import ControllerStore
from controller import fly_errors
from controller.actions import (
    Action,
    CreateMachine,
    CreateVolume,
    DestroyMachine,
    DestroyVolume,
    Done,
    Outcome,
    Permanent,
    RemoveSession,
    Requeue,
    RequeueAfter,
    RestartMachine,
    SetStatus,
    StartMachine,
    StopMachine,
    SuspendMachine,
    Transient,
)
from controller.expectations import Expectations
from controller.fly import FLY_ACTION_LIMIT, FlyClient
from controller.fly_apps import AppSpreader, CreateSlot
from controller.fly_types import Machine, MachineConfig
from controller.fly_volumes import FlyVolumes
from controller.machine_config import machine_name
from controller.machine_state import GONE
from controller.metrics import ControllerMetrics
from controller.observed import (
    MANAGED_VALUE,
    TAG_LAUNCH,
    TAG_MANAGED,
    TAG_SESSION,
    ObservedMachine,
    parse_tags,
    pool_tags,
)
from controller.ratelimit import Limit
from controller.volume_executor import VolumeExecutor
from controller.webhook_worker import fan_out_sessions

if TYPE_CHECKING:
    from controller.pool_claim import PoolClaimer

_log = get_logger("controller.executor")

#: Below this much leadership left, do not start a Fly mutation.
_MIN_TERM_SECONDS = 0.5
#: How often and how long an ambiguous create is looked up before giving the decision to the plan.
_LOOKUP_ATTEMPTS = 3
_LOOKUP_PAUSE_SECONDS = 0.5


class Authority(Protocol):
    """Who may act on what: this replica's shards (:class:`controller.shards.ShardManager`), the
    leader lease alone (:class:`controller.leader.LeaderElector`) or a sole controller.

    Per session: ``session_id`` None means an app-wide duty (orphan machines), not one session.
    """

    def is_leader(self) -> bool: ...

    def is_leader_for(self, session_id: str | None) -> bool: ...

    def remaining_for(self, session_id: str | None) -> float: ...

    def fence_for(self, session_id: str | None) -> tuple[str, int] | None: ...


class SoleAuthority:
    """Always leading, unfenced: for a controller that is the only one by construction (tests, bench)."""

    def is_leader(self) -> bool:
        return True

    def is_leader_for(self, session_id: str | None) -> bool:
        return True

    def remaining_for(self, session_id: str | None) -> float:
        return float("inf")

    def fence_for(self, session_id: str | None) -> tuple[str, int] | None:
        return None


class ConfigBuilder(Protocol):
    """Builds the machine config of a session's launch (``controller.machine_config.machine_config_for``)."""

    def __call__(
        self,
        session: Session,
        *,
        launch_id: str,
        region: str,
        session_token: str,
        volume_id: str | None = None,
    ) -> MachineConfig: ...


@dataclass(frozen=True)
class ExecutorSettings:
    """The executor's knobs (from :class:`controller.settings.ControllerSettings`)."""

    call_timeout_seconds: float = 30.0
    stop_grace_seconds: float = 30.0
    max_destroys_per_pass: int = 20
    #: How long to wait before looking again at a machine that refused an action in its state (412).
    precondition_requeue_seconds: float = 2.0
    #: How long to wait when another holder has the machine's Fly lease.
    lease_held_requeue_seconds: float = 5.0


class CreatePacer:
    """Hands out create slots at Fly's per-app create rate, so workers never sleep on a create token.

    With several agent apps each has its own bucket and a slot names its app
    (:class:`controller.fly_apps.AppSpreader`: soonest token, then least loaded), so N apps admit
    N creates per second.

    Fly allows 1 create per second per app (burst 3). With a hundred sessions waiting, a worker that
    called create would sit in the client's token bucket for up to a minute, and the rest of the
    fleet (restarts, wakes) would wait behind it. Instead each session takes a *slot* in a token
    bucket run at the client's pace: a slot due now proceeds at once; a later one answers "requeue
    in N s" and frees the worker, and the key comes back exactly when its slot is due (first come,
    first served; nothing is recorded in Redis before the slot is due). Slots never claimed expire.
    """

    _TOLERANCE = 0.05

    def __init__(
        self,
        limit: Limit | None,
        *,
        apps: Sequence[str] = ("agents",),
        load: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.spreader = AppSpreader(apps, limit, load=load, clock=clock)
        self._slots: dict[str, tuple[float, str]] = {}

    def set_share(self, share: float) -> None:
        """Admit creates at ``share`` of the rate (N replicas share each app's create budget)."""
        self.spreader.set_share(share)

    def admit(self, session_id: str) -> float:
        """0 when ``session_id`` may send its create now, else the seconds until its slot."""
        return self.slot(session_id).wait

    def slot(self, session_id: str, allowed: Sequence[str] | None = None) -> CreateSlot:
        """``session_id``'s create slot: its app, and 0 or the seconds until it is due. A slot due
        now must be followed by :meth:`settled` once the create is answered."""
        now = self._clock()
        held = self._slots.get(session_id)
        if held is not None:
            due, app = held
            if now + self._TOLERANCE >= due:
                del self._slots[session_id]
                return CreateSlot(app=app, wait=0.0)
            return CreateSlot(app=app, wait=due - now)
        self._expire(now)
        slot = self.spreader.reserve(allowed)
        if slot.wait <= self._TOLERANCE:
            return CreateSlot(app=slot.app, wait=0.0)
        self._slots[session_id] = (now + slot.wait, slot.app)
        return slot

    def settled(self, app: str) -> None:
        self.spreader.settled(app)

    def background_slot(self, allowed: Sequence[str] | None = None) -> CreateSlot:
        """A create nobody waits on (a pool refill): its app, and 0 or the seconds to look again.

        Sessions first: a refill takes only a token that is free right now and that no session
        has a slot on; it never reserves a future one, so it never pushes a session's create back
        by more than the one token it took. A slot with wait 0 must be followed by :meth:`settled`.
        Raises :class:`controller.fly_apps.NoAllowedApp` when ``allowed`` names no configured app.
        """
        now = self._clock()
        self._expire(now)
        app = self.spreader.choose_app(allowed)
        if self._slots:
            soonest = min(due for due, _app in self._slots.values())
            return CreateSlot(app=app, wait=max(soonest - now, 0.0) + 1.0)
        wait = self.spreader.wait_for(app)
        if wait > 0:
            return CreateSlot(app=app, wait=max(wait, self._TOLERANCE))
        return CreateSlot(app=self.spreader.reserve(allowed).app, wait=0.0)

    def _expire(self, now: float) -> None:
        for key in [k for k, (due, _app) in self._slots.items() if due < now - 60.0]:
            self.spreader.settled(self._slots.pop(key)[1])

    def __len__(self) -> int:
        return len(self._slots)


class DestroyBudget:
    """At most ``limit`` destroys per resync pass, shared by every worker; reset by each resync."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give_back(self) -> None:
        self.used = max(0, self.used - 1)

    def reset(self) -> None:
        self.used = 0


def observed_from_fly(machine: Machine, *, now: datetime | None = None) -> ObservedMachine:
    """The plan's view of one Fly machine (tags from metadata, last exit from embedded events)."""
    managed, session_id, launch_id = parse_tags(machine.metadata)
    pool, pool_slot, pool_template = pool_tags(machine.metadata)
    exit_event = machine.last_exit
    created = parse_timestamp(machine.created_at) or now or utcnow()
    return ObservedMachine(
        id=machine.id,
        state=machine.state or "unknown",
        region=machine.region,
        session_id=session_id,
        launch_id=launch_id,
        managed=managed,
        created_at=created,
        updated_at=parse_timestamp(machine.updated_at),
        instance_id=machine.current_version,
        last_exit_code=exit_event.exit_code if exit_event is not None else None,
        last_exit_oom=bool(exit_event.oom_killed) if exit_event is not None else False,
        host_status=machine.host_status or "ok",
        last_exit_requested=bool(exit_event.requested_stop) if exit_event is not None else False,
        pool=pool,
        pool_slot=pool_slot,
        pool_template=pool_template,
    )


class Executor:
    """Applies actions for the reconciler; one instance per controller, shared by all workers."""

    def __init__(
        self,
        *,
        store: ControllerStore,
        fly: FlyClient,
        authority: Authority,
        expectations: Expectations,
        config_builder: ConfigBuilder,
        settings: ExecutorSettings | None = None,
        metrics: ControllerMetrics | None = None,
        destroy_budget: DestroyBudget | None = None,
        claimer: PoolClaimer | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        #: Warm pools: a create first tries to claim a ready pool machine (controller/pool_claim.py).
        self.claimer = claimer
        self.fly = fly
        self.authority = authority
        self.expectations = expectations
        self.config_builder = config_builder
        self.settings = settings or ExecutorSettings()
        self.metrics = metrics
        self.destroy_budget = destroy_budget or DestroyBudget(self.settings.max_destroys_per_pass)
        fly_config = fly.config
        self.create_pacer = CreatePacer(
            FLY_ACTION_LIMIT.scaled(fly_config.rate_margin) if fly_config.rate_limits else None,
            apps=fly_config.apps,
            load=fly.machine_counts,
        )
        self._now = clock
        self.volumes = VolumeExecutor(store=store, volumes=FlyVolumes(fly), clock=clock)

    # -- entry point ------------------------------------------------------------------------------

    async def apply(
        self, action: Action, *, session: Session | None = None, log: Any = None, app_wide: bool = False
    ) -> Outcome:
        """Apply one action; never raises for an expected failure (it becomes an outcome value).

        ``app_wide``: an orphan's action, authorised by the leader lease rather than a shard.
        """
        log = (log or _log).bind(action=action.kind, reason=action.reason)
        if action.session_id is not None:
            log = log.bind(session_id=action.session_id)
        machine_id = getattr(action, "machine_id", None)
        if machine_id is not None:
            log = log.bind(machine_id=machine_id)
        scope = None if app_wide else action.session_id
        token = _SCOPE.set(scope)
        try:
            if isinstance(action, RequeueAfter):
                outcome: Outcome = Requeue(action.seconds)
            elif not self.authority.is_leader_for(scope):
                outcome = Transient("not the owner of this session's shard")
            else:
                try:
                    outcome = await self._dispatch(action, session, log)
                except StoreUnavailable as err:
                    outcome = Transient(f"redis unavailable: {err}")
                except fly_errors.FlyError as err:
                    outcome = self._fly_outcome(err)
        finally:
            _SCOPE.reset(token)
        self._count(action, outcome)
        if isinstance(outcome, Transient | Permanent):
            log.warning("action_failed", outcome=outcome.kind, error=outcome.error)
        return outcome

    async def _dispatch(self, action: Action, session: Session | None, log: Any) -> Outcome:
        if isinstance(action, SetStatus):
            return await self._set_status(action, log)
        if isinstance(action, RemoveSession):
            return await self._remove(action, log)
        if self._term_left() < _MIN_TERM_SECONDS:
            return Transient("leadership ending; no new Fly call")
        if isinstance(action, CreateMachine):
            if session is None:
                return Permanent("create without the session resource")
            return await self._create(action, session, log)
        if isinstance(action, StartMachine | RestartMachine) and action.pool_machine:
            if session is None or self.claimer is None:
                return Permanent("start of a claimed pool machine without the session resource")
            outcome = await self.claimer.rebuild(action, session, self.config_builder, self._deadline(), log)
            await self._look_again(action.session_id, action.machine_id, "starting")
            return outcome
        if isinstance(action, StartMachine):
            return await self._simple(action, "start", log)
        if isinstance(action, StopMachine):
            return await self._simple(action, "stop", log)
        if isinstance(action, SuspendMachine):
            return await self._simple(action, "suspend", log)
        if isinstance(action, RestartMachine):
            return await self._restart(action, log)
        if isinstance(action, DestroyMachine):
            return await self._destroy(action, log)
        if isinstance(action, CreateVolume | DestroyVolume):
            return await self.volumes.apply(action, log=log, deadline=self._deadline())
        return Permanent(f"unknown action {type(action).__name__}")

    # -- store actions ----------------------------------------------------------------------------

    async def _set_status(self, action: SetStatus, log: Any) -> Outcome:
        result = await self.store.write_status(
            action.session_id,
            action.status,
            fence=self.authority.fence_for(action.session_id),
            notices=action.notices,
        )
        if result == "fenced":
            return Transient("status write fenced: a newer holder of the shard exists")
        if result == "written":
            if action.status.phase.finished:
                # A finished session's token opens nothing any more (the gateway also refuses it).
                await self.store.revoke_session_token(action.session_id)
            for event in action.events:
                await self.store.append_event(action.session_id, event)
            log.info(
                "session_status_written",
                phase=action.status.phase.value,
                status_reason=action.status.reason,
                events=len(action.events),
            )
            return Done()
        # The session vanished or finished under us: the plan was made on a stale read, so none of
        # the Fly calls that follow it may run. Look again shortly with fresh data.
        log.info("session_status_not_written", result=result, phase=action.status.phase.value)
        return Requeue(1.0)

    async def _remove(self, action: RemoveSession, log: Any) -> Outcome:
        # The session's outbox goes with its keys: queue its last webhook events first.
        now_ms = int(self._now().timestamp() * 1000)
        await fan_out_sessions(self.store, [action.session_id], self.metrics, now_ms=now_ms)
        await self.store.remove(action.session_id)
        self.expectations.forget_session(action.session_id)
        log.info("session_removed")
        return Done()

    # -- create -----------------------------------------------------------------------------------

    async def _create(self, action: CreateMachine, session: Session, log: Any) -> Outcome:
        log = log.bind(launch_id=action.launch_id, region=action.region)
        if self.claimer is not None and not action.volume_id:
            # A ready pool machine is a resume, not a create: no create slot needed. (A persistent
            # session mounts its own volume, which a pool machine was not created with.)
            claimed = await self.claimer.claim(action, session, self._deadline(), log)
            if claimed is not None:
                return claimed
        # A volume belongs to one app (the client's default app, where controller.fly_volumes makes
        # it) and a machine can mount only a volume of its own app: a persistent session's machines
        # are created there; other sessions spread over every agent app.
        allowed = [self.fly.config.app_name] if action.volume_id else None
        slot = self.create_pacer.slot(action.session_id, allowed)
        if slot.wait > 0:
            # Not our turn yet under Fly's create limit: come back when the slot is due.
            return Requeue(slot.wait)
        try:
            return await self._create_in(slot.app, action, session, log.bind(app=slot.app))
        finally:
            self.create_pacer.settled(slot.app)

    async def _create_in(self, app: str, action: CreateMachine, session: Session, log: Any) -> Outcome:
        # A fresh gateway token per launch: the previous machine's stops working at once.
        token = await self.store.mint_session_token(action.session_id)
        try:
            config = self.config_builder(
                session,
                launch_id=action.launch_id,
                region=action.region,
                session_token=token.value,
                **({"volume_id": action.volume_id} if action.volume_id else {}),
            )
        except ValueError as err:
            return Permanent(f"machine config refused: {err}")
        requested_at = self._now()
        # The record goes to Redis *before* the call: if we die after Fly created the machine, the
        # next controller finds it by this launch id instead of creating another one.
        # The app too: later calls (and the lookup after an ambiguous create) address that app.
        await self.store.record_launch(
            action.session_id, action.launch_id, {"region": action.region, "app": app}
        )
        self.expectations.launch_requested(action.session_id, action.launch_id, requested_at)
        try:
            machine = await self.fly.create_machine(
                config,
                # A name per launch: should the same launch ever be sent twice, Fly refuses the
                # second with 409 instead of creating a twin.
                name=machine_name(action.session_id, action.launch_id),
                region=action.region,
                deadline=self._deadline(),
                app=app,
            )
        except fly_errors.AmbiguousCreate as err:
            log.warning("machine_create_ambiguous", error=err.message)
            return await self._find_launch(app, action, log)
        except fly_errors.FlyError as err:
            # The client raises AmbiguousCreate whenever the request may have reached Fly; any other
            # error means nothing was created, so the expectation is withdrawn and the plan may
            # launch again on the key's backoff schedule instead of waiting for it to expire.
            reason = Reason.NO_CAPACITY if isinstance(err, fly_errors.Capacity) else Reason.CREATE_FAILED
            # The failure replaces the launch record, so the next plan says why in the status.
            await self.store.record_create_failure(action.session_id, reason, str(err))
            self.expectations.launch_cancelled(action.session_id, action.launch_id)
            if action.volume_id and _volume_unknown(err, action.volume_id):
                await self.volumes.volume_lost(action.session_id, action.volume_id, err.message, log)
            if isinstance(err, fly_errors.Capacity):
                log.warning("machine_create_no_capacity", error=err.message)
            elif not err.transient:
                # Retrying will not help (bad image, bad config): say why on the session's events.
                await self.store.append_event(
                    action.session_id,
                    SessionEvent(
                        type="warning", reason=Reason.CREATE_FAILED, message=f"Fly refused the create: {err}"
                    ),
                )
            raise
        return await self._adopt(action, machine, log, looked_up=False)

    async def _find_launch(self, app: str, action: CreateMachine, log: Any) -> Outcome:
        """After an ambiguous create: find the machine by its launch tag; never create blindly."""
        # The session's tag too: a launch id is unique per session only (sessions planned in one
        # pass share the clock), and adopting another session's machine would make it serve two.
        tags = {TAG_MANAGED: MANAGED_VALUE, TAG_SESSION: action.session_id, TAG_LAUNCH: action.launch_id}
        for attempt in range(_LOOKUP_ATTEMPTS):
            if attempt:
                await asyncio.sleep(_LOOKUP_PAUSE_SECONDS)
            try:
                page = await self.fly.list_machines(metadata=tags, deadline=self._deadline(), app=app)
            except fly_errors.FlyError as err:
                if not err.transient:
                    raise
                continue
            found = [
                m
                for m in page.machines
                if m.state not in GONE and m.metadata.get(TAG_SESSION) == action.session_id
            ]
            if found:
                return await self._adopt(action, found[0], log, looked_up=True)
        # Not visible yet (the list lags) or never created: the launch record stays, and the plan
        # waits for it until the create expectation expires before it launches again.
        log.warning("machine_create_unresolved")
        return Requeue(_LOOKUP_PAUSE_SECONDS * 4)

    async def _adopt(self, action: CreateMachine, machine: Machine, log: Any, *, looked_up: bool) -> Outcome:
        now = self._now()
        observed = observed_from_fly(machine, now=now)
        if observed.session_id is None:
            observed = _with_tags(observed, action.session_id, action.launch_id)
        self.expectations.machine_created(action.session_id, observed, now)
        await self.store.update_launch(action.session_id, {"machineId": machine.id})
        log.info(
            "machine_created",
            machine_id=machine.id,
            state=machine.state,
            found_after_ambiguous_create=looked_up,
        )
        return Done()

    # -- machine actions --------------------------------------------------------------------------

    async def _simple(
        self, action: StartMachine | StopMachine | SuspendMachine, verb: str, log: Any
    ) -> Outcome:
        machine_id = action.machine_id
        deadline = self._deadline()
        try:
            if verb == "start":
                await self.fly.start_machine(machine_id, deadline=deadline)
            elif verb == "stop":
                await self.fly.stop_machine(
                    machine_id, timeout=self.settings.stop_grace_seconds, deadline=deadline
                )
            else:
                await self.fly.suspend_machine(machine_id, deadline=deadline)
        except fly_errors.NotFound:
            self.expectations.machine_destroyed(action.session_id, machine_id, self._now())
            log.info("machine_gone")
            return Done()
        await self._look_again(
            action.session_id, machine_id, {"start": "starting", "stop": "stopping"}.get(verb)
        )
        log.info(_PAST[verb])
        return Done()

    async def _restart(self, action: RestartMachine, log: Any) -> Outcome:
        """Fly restart of a started machine; one call. A machine at rest answers 412: requeued, and
        the plan (which asks for a start in that case) decides again on fresh data."""
        machine_id = action.machine_id
        try:
            await self.fly.restart_machine(
                machine_id, timeout=self.settings.stop_grace_seconds, deadline=self._deadline()
            )
        except fly_errors.NotFound:
            self.expectations.machine_destroyed(action.session_id, machine_id, self._now())
            log.info("machine_gone")
            return Done()
        await self._look_again(action.session_id, machine_id, "restarting")
        log.info("machine_restarted")
        return Done()

    async def _destroy(self, action: DestroyMachine, log: Any) -> Outcome:
        """One destroy call, forced when the plan says so. The plan asks for a plain destroy only of
        a machine at rest, and stops a running one first; should the machine have moved on since,
        Fly answers 412 and the plan decides again."""
        if not self.destroy_budget.take():
            log.info("machine_destroy_deferred", used=self.destroy_budget.used)
            return Requeue(1.0)
        machine_id = action.machine_id
        try:
            await self.fly.destroy_machine(machine_id, force=action.force, deadline=self._deadline())
        except fly_errors.NotFound:
            pass
        except BaseException:
            self.destroy_budget.give_back()
            raise
        self.expectations.machine_destroyed(action.session_id, machine_id, self._now())
        log.info("machine_destroyed", force=action.force)
        return Done()

    async def _look_again(self, session_id: str | None, machine_id: str, expected_state: str | None) -> None:
        """Record the machine's state right after we changed it, so a lagging list cannot undo it."""
        now = self._now()
        try:
            machine = await self.fly.get_machine(machine_id, deadline=min(5.0, self._deadline()))
        except fly_errors.NotFound:
            self.expectations.machine_destroyed(session_id, machine_id, now)
            return
        except fly_errors.FlyError:
            return  # the next list will tell; expectations only sharpen the view
        self.expectations.machine_changed(session_id, observed_from_fly(machine, now=now), now)

    # -- helpers ----------------------------------------------------------------------------------

    def _term_left(self) -> float:
        return self.authority.remaining_for(_SCOPE.get())

    def _deadline(self) -> float:
        """A call's deadline: the configured one, but never past the end of our leadership term."""
        return max(0.1, min(self.settings.call_timeout_seconds, self._term_left() - 0.1))

    def _fly_outcome(self, err: fly_errors.FlyError) -> Outcome:
        if isinstance(err, fly_errors.LeaseHeld):
            return Requeue(self.settings.lease_held_requeue_seconds)
        if isinstance(err, fly_errors.PreconditionFailed):
            return Requeue(self.settings.precondition_requeue_seconds)
        if isinstance(err, fly_errors.NotFound):
            return Done()
        if err.transient:
            return Transient(str(err), retry_after=err.retry_after)
        return Permanent(str(err), details={"status": str(err.status)})

    def _count(self, action: Action, outcome: Outcome) -> None:
        if self.metrics is not None:
            self.metrics.actions.labels(action=action.kind, outcome=outcome.kind).inc()


#: The session an action is applied for (None: an app-wide duty), for the deadline helpers below.
_SCOPE: ContextVar[str | None] = ContextVar("flyswarm_action_scope", default=None)

_PAST = {"start": "machine_started", "stop": "machine_stopped", "suspend": "machine_suspended"}


def _with_tags(machine: ObservedMachine, session_id: str, launch_id: str) -> ObservedMachine:
    return replace(machine, managed=True, session_id=session_id, launch_id=launch_id)


def _volume_unknown(err: fly_errors.FlyError, volume_id: str) -> bool:
    """Fly's answer to a create whose mount names a volume it does not have (400/404 "not found")."""
    text = err.message.lower()
    return err.status in (400, 404) and "not found" in text and volume_id.lower() in text
