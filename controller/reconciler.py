"""The reconcile loop: desired sessions (Redis) and real machines (Fly) are made to agree, forever.

Level-triggered, in the controller-runtime mould:

* **Full resync** every ``resync_seconds``: ONE paginated Fly ``list`` (metadata filter
  ``flyswarm_managed=true``, ``summary=true`` while summaries carry metadata) and ONE batched
  Redis read (every session, heartbeat, launch record and inbox state, pipelined). Never a call
  per session. The result is a :class:`Snapshot`; every session id is queued and orphans are
  handled from it. The pass is the source of truth; everything below only makes it faster.
* **Triggers** wake single keys within milliseconds: the API's change feed (``read_changes``
  with a blocking read), the agents' wake pub/sub (``WAKE_PATTERN``), and delayed requeues
  (the plan's ``RequeueAfter`` at the next deadline it knows: heartbeat expiry, boot grace,
  restart backoff, idle timeout), so a lost heartbeat is found without scanning anything.
* **Per key**, a worker plans from the snapshot plus a fresh targeted read of that one session,
  as cheap as correctness allows: nothing when the resync just read it; only the heartbeat (one
  GET) when a timer fired; the whole session when a trigger said it changed or we acted on it
  since the snapshot. Our own in-flight actions are merged in (:mod:`controller.expectations`).
  Before any Fly call the session is read afresh and every machine the plan touches is re-read
  with a ``GET``, then the plan is made again, so no create, restart or destroy is ever based on
  a list that is up to ``resync_seconds`` old. Reads scale with actions, not with sessions.

"Unknown, never dead": when the Fly list or the Redis read fails, or the snapshot is too old,
nothing is planned at all (no destroy, no restart on missing data). Keys back off, the
controller reports not-ready, logs, and resumes by itself when the reads succeed again.

One ``reconcile_pass`` log line per resync (desired, observed, actions, ...); every per-key log
line carries ``session_id`` and ``reconcile_id`` (and ``machine_id`` for machine actions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from api.logs import get_logger
from api.models import Heartbeat, Session, utcnow
from api.store_base import StoreUnavailable
from api.store_controller import ControllerStore
from controller import fly_errors
from controller.actions import (
    Action,
    CreateMachine,
    Done,
    Outcome,
    Permanent,
    Requeue,
    RequeueAfter,
    Transient,
    is_fly_call,
    machine_id_of,
)
from controller.backoff import Backoff
from controller.executor import (
    Authority,
    ConfigBuilder,
    DestroyBudget,
    Executor,
    ExecutorSettings,
    observed_from_fly,
)
from controller.expectations import Expectations
from controller.fly import FlyClient
from controller.metrics import ControllerMetrics
from controller.observed import MANAGED_VALUE, TAG_MANAGED, CreateFailure, LaunchRecord, ObservedMachine
from controller.plan import plan, plan_orphans
from controller.queue import WorkQueue
from controller.settings import ControllerSettings, PlanSettings

_log = get_logger("controller.reconciler")

#: Fly's ``limit`` maximum: the fewest pages per list.
LIST_PAGE_SIZE = 1000
#: A snapshot older than this many resync intervals is "unknown": nothing is planned from it.
STALE_RESYNCS = 3.0
#: Blocking read of the change feed (below the store's 5 s socket timeout).
CHANGE_BLOCK_MS = 1000
#: Reconnect pause of the trigger loops after a Redis error.
_TRIGGER_RETRY_SECONDS = 1.0


#: Machine states a machine rests in; any other state is worth a fresh look when a trigger fires.
_SETTLED_STATES = frozenset({"started", "stopped", "suspended", "failed", "destroyed"})


def new_reconcile_id() -> str:
    return secrets.token_hex(4)


@dataclass(frozen=True)
class Snapshot:
    """One resync's view of the world: the whole desired state and the whole observed state."""

    listed_from: datetime  #: when the Fly list started (a machine change after this may be missing)
    read_from: datetime  #: when the Redis read started
    taken_mono: float  #: monotonic time of completion (for staleness)
    sessions: dict[str, Session]
    heartbeats: dict[str, Heartbeat]
    launches: dict[str, LaunchRecord]
    create_failures: dict[str, CreateFailure]
    inbox: dict[str, int]
    machines: dict[str, list[ObservedMachine]]  #: by session id (tag); untagged ones under ""
    all_machines: list[ObservedMachine]


@dataclass
class PassStats:
    """What one resync pass found and did (also returned to tests and the bench)."""

    reconcile_id: str
    ok: bool
    desired: int = 0
    observed: int = 0
    enqueued: int = 0
    orphans: int = 0
    fly_pages: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class _KeyView:
    session: Session | None
    heartbeat: Heartbeat | None
    launch: LaunchRecord | None
    inbox: int
    read: str  #: how it was read: snapshot, heartbeat or full
    create_failure: CreateFailure | None = None


@dataclass
class ReconcilerOptions:
    """Runtime knobs not in :class:`ControllerSettings` (tests shorten them)."""

    change_block_ms: int = CHANGE_BLOCK_MS
    stale_resyncs: float = STALE_RESYNCS
    list_page_size: int = LIST_PAGE_SIZE
    backoff_base_seconds: float = 0.05
    backoff_cap_seconds: float = 60.0
    #: Which trigger loops run (tests of the resync alone turn them off).
    change_feed: bool = True
    wake_pubsub: bool = True


class Reconciler:
    """The loop of one controller. :meth:`run` while leading; cancel (or :meth:`drain`) to stop."""

    def __init__(
        self,
        *,
        store: ControllerStore,
        fly: FlyClient,
        settings: ControllerSettings,
        authority: Authority,
        config_builder: ConfigBuilder,
        metrics: ControllerMetrics | None = None,
        options: ReconcilerOptions | None = None,
        plan_settings: PlanSettings | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.fly = fly
        self.settings = settings
        self.authority = authority
        self.metrics = metrics or ControllerMetrics()
        self.options = options or ReconcilerOptions()
        self.plan_settings = plan_settings or settings.plan_settings()
        self._now = clock
        self.expectations = Expectations(max_age_seconds=settings.create_expectation_seconds)
        self.destroy_budget = DestroyBudget(settings.max_destroys_per_pass)
        self.executor = Executor(
            store=store,
            fly=fly,
            authority=authority,
            expectations=self.expectations,
            config_builder=config_builder,
            # The settings fill agent_redis_url from REDIS_URL when it is not set.
            agent_redis_base_url=(settings.agent_redis_url or settings.redis_url).get_secret_value(),
            settings=ExecutorSettings(
                call_timeout_seconds=settings.call_timeout_seconds,
                machine_lease_ttl_seconds=settings.machine_lease_ttl_seconds,
                stop_grace_seconds=settings.stop_grace_seconds,
                max_destroys_per_pass=settings.max_destroys_per_pass,
            ),
            metrics=self.metrics,
            destroy_budget=self.destroy_budget,
            clock=clock,
        )
        self.queue = WorkQueue(
            backoff=Backoff(base=self.options.backoff_base_seconds, cap=self.options.backoff_cap_seconds)
        )
        self.snapshot: Snapshot | None = None
        self.redis_ok = False
        self.fly_ok = False
        self.last_pass: PassStats | None = None
        self._needs_read: set[str] = set()
        self._from_resync: set[str] = set()
        self._touched: dict[str, datetime] = {}
        self._summary_has_metadata = True
        self._actions_since_pass = 0
        self._resync_now = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        # Heartbeat trust (rule 6 of the plan): the Redis server we last restored credentials on,
        # when it started, and when our own view of it last came back from an outage.
        self._redis_run_id: str | None = None
        self._redis_started_at: datetime | None = None
        # A new reconciler (a controller start, a leadership change) has not watched heartbeats
        # arrive: its view of them begins now, exactly as after an outage.
        self._redis_recovered_at: datetime | None = clock()
        self._redis_lost = False

    # -- whole-process loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Resync, triggers and workers until cancelled (the controller runs this while leading)."""
        tasks = [asyncio.create_task(self._resync_loop(), name="reconciler-resync")]
        if self.options.change_feed:
            tasks.append(asyncio.create_task(self._change_feed_loop(), name="reconciler-changes"))
        if self.options.wake_pubsub:
            tasks.append(asyncio.create_task(self._wake_loop(), name="reconciler-wake"))
        self._workers = [
            asyncio.create_task(self._worker(i), name=f"reconciler-worker-{i}")
            for i in range(self.settings.concurrency)
        ]
        try:
            await asyncio.gather(*tasks, *self._workers)
        finally:
            for task in [*tasks, *self._workers]:
                task.cancel()
            await asyncio.gather(*tasks, *self._workers, return_exceptions=True)

    async def drain(self, timeout: float) -> bool:
        """Stop taking work and let in-flight keys finish within ``timeout``; True if they all did."""
        self.queue.shut_down()
        workers = [w for w in self._workers if not w.done()]
        if not workers:
            return True
        _done, pending = await asyncio.wait(workers, timeout=timeout)
        return not pending

    def nudge(self) -> None:
        """Run a full resync now (after a leadership change, for example)."""
        self._resync_now.set()

    @property
    def ready(self) -> bool:
        return self.redis_ok and self.fly_ok

    # -- full resync ------------------------------------------------------------------------------

    async def _resync_loop(self) -> None:
        failures = 0
        while True:
            stats = await self.resync()
            failures = 0 if stats.ok else failures + 1
            wait = self.settings.resync_seconds
            if failures:
                # Unknown inputs: look again sooner than a full interval, but back off.
                wait = min(wait, 0.2 * 2 ** min(failures, 6))
            self._resync_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync_now.wait(), wait)

    async def resync(self) -> PassStats:
        """One full pass: read everything, queue every session, handle orphans; never raises."""
        rid = new_reconcile_id()
        log = _log.bind(reconcile_id=rid)
        started = time.monotonic()
        stats = PassStats(reconcile_id=rid, ok=False)
        self.destroy_budget.reset()
        try:
            async with asyncio.timeout(self.settings.pass_timeout_seconds):
                snapshot, pages = await self._read_world()
        except (StoreUnavailable, fly_errors.FlyError, TimeoutError, OSError) as err:
            stats.error = f"{type(err).__name__}: {err}"
            stats.seconds = time.monotonic() - started
            self.metrics.passes.labels(kind="resync", result="unknown").inc()
            self.metrics.ready.set(0)
            log.warning(
                "reconcile_pass_unknown",
                error=stats.error,
                redis_ok=self.redis_ok,
                fly_ok=self.fly_ok,
                seconds=round(stats.seconds, 3),
            )
            self.last_pass = stats
            return stats
        self.snapshot = snapshot
        self.expectations.settle(snapshot.all_machines, snapshot.listed_from, self._now())
        stats.ok = True
        stats.fly_pages = pages
        stats.desired = len(snapshot.sessions)
        stats.observed = len(snapshot.all_machines)
        for session_id in snapshot.sessions:
            self._from_resync.add(session_id)
            self.queue.add(session_id)
        stats.enqueued = len(snapshot.sessions)
        stats.orphans = await self._handle_orphans(snapshot, log)
        self.metrics.observe_fleet(
            (s.effective_phase().value for s in snapshot.sessions.values()),
            (m.state for m in snapshot.all_machines),
        )
        self.metrics.expectations.set(self.expectations.pending_creates())
        self.metrics.queue_depth.set(len(self.queue))
        self.metrics.ready.set(1)
        stats.seconds = time.monotonic() - started
        self.metrics.pass_duration.labels(kind="resync").observe(stats.seconds)
        self.metrics.passes.labels(kind="resync", result="ok").inc()
        actions, self._actions_since_pass = self._actions_since_pass, 0
        log.info(
            "reconcile_pass",
            desired=stats.desired,
            observed=stats.observed,
            actions=actions,
            orphans=stats.orphans,
            queued=len(self.queue),
            fly_pages=pages,
            seconds=round(stats.seconds, 4),
        )
        await self._mark_seen()
        self.last_pass = stats
        return stats

    async def _read_world(self) -> tuple[Snapshot, int]:
        """ONE paginated Fly list, then ONE batched Redis read (in that order, see below)."""
        # Fly first: a session always exists before its machine is created and is removed only
        # after its machines are gone, so every listed machine's session is in the later read.
        listed_from = self._now()
        try:
            machines, pages = await self._list_machines()
        except fly_errors.FlyError:
            self.fly_ok = False
            raise
        self.fly_ok = True
        read_from = self._now()
        try:
            await self._check_redis_server(read_from)
            sessions = await self.store.all_sessions()
            ids = [s.id for s in sessions]
            heartbeats = await self.store.heartbeats(ids)
            raw_launches = await self.store.get_launches(ids)
            inbox = await self.store.inbox_pending_many(ids) if ids else {}
        except StoreUnavailable:
            self._redis_down()
            raise
        self._redis_up()
        for what in ("sessions", "heartbeats", "launches", "inbox"):
            self.metrics.redis_reads.labels(what=what).inc()
        launches = {sid: rec for sid, raw in raw_launches.items() if (rec := LaunchRecord.from_store(raw))}
        failures = {sid: f for sid, raw in raw_launches.items() if (f := CreateFailure.from_store(raw))}
        observed = [observed_from_fly(m) for m in machines]
        by_session: dict[str, list[ObservedMachine]] = {}
        for machine in observed:
            by_session.setdefault(machine.session_id or "", []).append(machine)
        snapshot = Snapshot(
            listed_from=listed_from,
            read_from=read_from,
            taken_mono=time.monotonic(),
            sessions={s.id: s for s in sessions},
            heartbeats=heartbeats,
            launches=launches,
            create_failures=failures,
            inbox=inbox,
            machines=by_session,
            all_machines=observed,
        )
        return snapshot, pages

    async def _check_redis_server(self, now: datetime) -> None:
        """Notice a new Redis server (restarted, failed over) and give its agents their users back.

        ACL users are not persisted by Redis; the store keeps each session's password hash, and
        this re-creates them before agents give up on their retries. The first pass of a controller
        restores too: Redis may have restarted while no controller was looking.
        """
        run_id, uptime = await self.store.server_identity()
        self._redis_started_at = now - timedelta(seconds=uptime)
        if run_id == self._redis_run_id:
            return
        restored = await self.store.restore_session_credentials()
        _log.info("redis_server_seen", restored_credentials=restored, uptime_seconds=round(uptime, 1))
        self._redis_run_id = run_id

    def _redis_down(self) -> None:
        self.redis_ok = False
        self._redis_lost = True

    def _redis_up(self) -> None:
        self.redis_ok = True
        if self._redis_lost:
            # Agents could not beat while we could not read: their heartbeats may have expired.
            self._redis_lost = False
            self._redis_recovered_at = self._now()

    @property
    def heartbeats_known_since(self) -> datetime | None:
        """Since when a missing heartbeat can mean a lost agent (see ``plan``'s rule 6)."""
        marks = [t for t in (self._redis_started_at, self._redis_recovered_at) if t is not None]
        return max(marks) if marks else None

    async def _list_machines(self) -> tuple[list[Any], int]:
        """Every machine of ours, in as few pages as Fly allows.

        ``summary=true`` is cheaper, but only useful if it still carries ``config.metadata`` (our
        identity tags); when a summary comes back without them, we switch to full listings.
        """
        deadline = self.settings.call_timeout_seconds
        tags = {TAG_MANAGED: MANAGED_VALUE}
        pages = 0
        for summary in (True, False):
            if summary and not self._summary_has_metadata:
                continue
            found: dict[str, Any] = {}
            cursor: str | None = None
            while True:
                page = await self.fly.list_machines(
                    metadata=tags,
                    summary=summary,
                    limit=self.options.list_page_size,
                    cursor=cursor,
                    deadline=deadline,
                )
                pages += 1
                for machine in page.machines:
                    found[machine.id] = machine
                if page.next_cursor is None or page.next_cursor == cursor:
                    break
                cursor = page.next_cursor
            if summary and any(not m.metadata for m in found.values()):
                self._summary_has_metadata = False
                _log.info("fly_summary_lacks_metadata")
                continue
            return list(found.values()), pages
        raise fly_errors.FlyError("no listing mode left")  # pragma: no cover - the loop always returns

    async def _handle_orphans(self, snapshot: Snapshot, log: Any) -> int:
        """Destroy machines of ours whose session does not exist (after the plan's grace)."""
        candidates = [m for m in snapshot.all_machines if not self.expectations.hidden(m.id)]
        actions = plan_orphans(candidates, set(snapshot.sessions), self._now(), self.plan_settings)
        applied = 0
        for action in actions:
            session_id = getattr(action, "session_id", None)
            if session_id:
                # Unknown, never dead: confirm the session is really gone with a fresh read.
                try:
                    if await self.store.get(session_id) is not None:
                        continue
                except StoreUnavailable:
                    return applied
            outcome = await self.executor.apply(action, log=log.bind(orphan=True))
            if isinstance(outcome, Done):
                applied += 1
                self._actions_since_pass += 1
        return applied

    async def _mark_seen(self) -> None:
        record = json.dumps({"at": self._now().isoformat(), "leader": self.authority.is_leader()})
        holder = str(getattr(self.authority, "holder_id", "controller"))
        with contextlib.suppress(Exception):
            await self.store.record_controller_seen(holder, record)
        # The finalizer of session removal: users of removed sessions whose deletion a crash or an
        # outage interrupted are deleted now (api/store_credentials.py).
        with contextlib.suppress(StoreUnavailable):
            await self.store.finish_credential_deletions()

    # -- triggers ---------------------------------------------------------------------------------

    def wake(self, session_id: str) -> None:
        """Reconcile ``session_id`` soon, with a fresh read of it (a trigger said it changed)."""
        self._needs_read.add(session_id)
        self.queue.add(session_id)

    async def _change_feed_loop(self) -> None:
        last: str | None = None
        while True:
            try:
                if last is None:
                    last = await self.store.last_change_id()
                changes = await self.store.read_changes(last, block_ms=self.options.change_block_ms)
            except StoreUnavailable as err:
                self._redis_down()
                _log.warning("change_feed_failed", error=str(err))
                await asyncio.sleep(_TRIGGER_RETRY_SECONDS)
                continue
            for change in changes:
                last = change.entry_id
                self.wake(change.session_id)

    async def _wake_loop(self) -> None:
        while True:
            try:
                async with contextlib.aclosing(self.store.wake_sessions()) as wakes:
                    async for session_id in wakes:
                        self.wake(session_id)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # redis errors of any kind: resubscribe after a pause
                _log.warning("wake_subscription_failed", error=type(err).__name__)
                await asyncio.sleep(_TRIGGER_RETRY_SECONDS)

    # -- workers ----------------------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        while (key := await self.queue.get()) is not None:
            self.metrics.in_flight.inc()
            self.metrics.queue_depth.set(len(self.queue))
            try:
                async with asyncio.timeout(self.settings.pass_timeout_seconds):
                    await self.reconcile_key(key)
            except TimeoutError:
                _log.warning("reconcile_timed_out", session_id=key)
                self.queue.add_rate_limited(key)
            except Exception as err:  # a bug in one key must not stop the worker
                _log.exception("reconcile_crashed", session_id=key, error=type(err).__name__)
                self.queue.add_rate_limited(key)
            finally:
                self.metrics.in_flight.dec()
                self.queue.done(key)

    async def reconcile_key(self, key: str) -> list[Outcome]:
        """Plan and apply one session; schedule its next look. Returns the outcomes (for tests)."""
        rid = new_reconcile_id()
        log = _log.bind(session_id=key, reconcile_id=rid)
        started = time.monotonic()
        snapshot = self.snapshot
        if snapshot is None or not self._inputs_known(snapshot) or not self.authority.is_leader():
            # Unknown, never dead: no plan without a recent whole view and the right to act.
            self._needs_read.add(key)
            self.queue.add_rate_limited(key)
            self.metrics.passes.labels(kind="key", result="unknown").inc()
            return []
        try:
            view = await self._view(key, snapshot)
            if view.session is None:
                # Gone from Redis: nothing to plan. Its machines, if any, are orphans for the resync.
                self._forget(key)
                return []
            machines = self.expectations.view(key, snapshot.machines.get(key, []), snapshot.listed_from)
            moving = {m.id for m in machines if m.state not in _SETTLED_STATES}
            if view.read != "snapshot" and moving:
                # A trigger or the plan's re-check woke us while the machine was last seen in a
                # transient state: look at it now rather than wait for the next list.
                machines = await self._refresh_machines(key, moving, log)
            actions = self._plan(view, machines)
            if any(is_fly_call(a) for a in actions):
                # Never create, restart, stop or destroy on the strength of data that may be old:
                # read this session afresh, look at the machines the plan touches, plan again.
                if view.read != "full":
                    view = await self._read_fresh(key)
                    if view.session is None:
                        self._forget(key)
                        return []
                touched = {mid for a in actions if (mid := machine_id_of(a)) is not None}
                launched = view.launch.machine_id if view.launch is not None else None
                if launched and any(isinstance(a, CreateMachine) for a in actions):
                    # About to replace the launched machine because it is not in the view: read it
                    # back by id first (a list that lags behind its create must not cause a twin).
                    touched.add(launched)
                machines = await self._refresh_machines(key, touched, log)
                actions = self._plan(view, machines)
        except StoreUnavailable as err:
            self._redis_down()
            self._needs_read.add(key)
            self.queue.add_rate_limited(key)
            log.warning("reconcile_read_failed", error=str(err))
            self.metrics.passes.labels(kind="key", result="unknown").inc()
            return []
        assert view.session is not None
        outcomes = await self._apply(actions, view.session, log)
        self._schedule(key, outcomes)
        elapsed = time.monotonic() - started
        self.metrics.pass_duration.labels(kind="key").observe(elapsed)
        result = "error" if any(isinstance(o, Transient | Permanent) for o in outcomes) else "ok"
        self.metrics.passes.labels(kind="key", result=result).inc()
        if any(not isinstance(a, RequeueAfter) for a in actions):
            log.debug(
                "session_reconciled",
                actions=[a.kind for a in actions],
                outcomes=[o.kind for o in outcomes],
                read=view.read,
                seconds=round(elapsed, 4),
            )
        return outcomes

    def _forget(self, key: str) -> None:
        self.queue.forget(key)
        self.expectations.forget_session(key)
        self._touched.pop(key, None)
        self._needs_read.discard(key)
        self._from_resync.discard(key)

    def _inputs_known(self, snapshot: Snapshot) -> bool:
        age = time.monotonic() - snapshot.taken_mono
        return (
            self.fly_ok and self.redis_ok and age <= self.settings.resync_seconds * self.options.stale_resyncs
        )

    async def _view(self, key: str, snapshot: Snapshot) -> _KeyView:
        """The session's inputs, read as cheaply as correctness allows.

        * ``snapshot``: queued by the resync that just read everything: use that read.
        * ``heartbeat``: a timer fired (the plan's RequeueAfter) and nothing else happened to the
          session: the snapshot is still right about everything but the heartbeat, which the agent
          refreshes without telling anyone; one GET.
        * ``full``: a trigger said the session changed, or we acted on it since the snapshot.
        """
        from_resync = key in self._from_resync
        self._from_resync.discard(key)
        touched = self._touched.get(key)
        if key in self._needs_read or (touched is not None and touched >= snapshot.read_from):
            return await self._read_fresh(key)
        session = snapshot.sessions.get(key)
        if session is None:
            return await self._read_fresh(key)
        launch = self.expectations.launch(key, snapshot.launches.get(key))
        inbox = snapshot.inbox.get(key, 0)
        failure = snapshot.create_failures.get(key)
        if from_resync:
            return _KeyView(session, snapshot.heartbeats.get(key), launch, inbox, "snapshot", failure)
        heartbeat = await self.store.get_heartbeat(key)
        return _KeyView(session, heartbeat, launch, inbox, "heartbeat", failure)

    async def _read_fresh(self, key: str) -> _KeyView:
        """One session's whole input from Redis (four small reads, issued together)."""
        self._needs_read.discard(key)
        session, heartbeat, raw_launch, inbox = await asyncio.gather(
            self.store.get(key),
            self.store.get_heartbeat(key),
            self.store.get_launch(key),
            self.store.inbox_pending(key, cap=1),
        )
        self._redis_up()
        launch = self.expectations.launch(key, LaunchRecord.from_store(raw_launch))
        return _KeyView(session, heartbeat, launch, inbox, "full", CreateFailure.from_store(raw_launch))

    def _plan(self, view: _KeyView, machines: list[ObservedMachine]) -> list[Action]:
        assert view.session is not None
        return plan(
            view.session,
            machines,
            view.heartbeat,
            self._now(),
            self.plan_settings,
            launch=view.launch,
            inbox_pending=view.inbox,
            create_failure=view.create_failure,
            heartbeats_known_since=self.heartbeats_known_since,
        )

    async def _refresh_machines(self, key: str, wanted: set[str], log: Any) -> list[ObservedMachine]:
        """GET each machine in ``wanted``; returns the session's machine view corrected by what Fly said."""
        now = self._now()
        for machine_id in sorted(wanted):
            try:
                machine = await self.fly.get_machine(machine_id, deadline=self.settings.call_timeout_seconds)
            except fly_errors.NotFound:
                self.expectations.machine_destroyed(key, machine_id, now)
                continue
            except fly_errors.FlyError as err:
                log.info("machine_refresh_failed", machine_id=machine_id, error=str(err))
                continue
            self.expectations.machine_changed(key, observed_from_fly(machine, now=now), now)
        snapshot = self.snapshot
        listed = snapshot.machines.get(key, []) if snapshot is not None else []
        listed_from = snapshot.listed_from if snapshot is not None else now
        return self.expectations.view(key, listed, listed_from)

    async def _apply(self, actions: list[Action], session: Session, log: Any) -> list[Outcome]:
        """Apply in the plan's order; stop at the first action that did not get done (re-plan later)."""
        outcomes: list[Outcome] = []
        for action in actions:
            outcome = await self.executor.apply(action, session=session, log=log)
            outcomes.append(outcome)
            if isinstance(action, RequeueAfter):
                continue
            self._actions_since_pass += 1
            self._touched[session.id] = self._now()
            if not isinstance(outcome, Done):
                break
        return outcomes

    def _schedule(self, key: str, outcomes: list[Outcome]) -> None:
        transient = [o for o in outcomes if isinstance(o, Transient)]
        if transient:
            delay = self.queue.backoff.next_delay(key)
            floor = max((o.retry_after or 0.0) for o in transient)
            self.queue.add_after(key, max(delay, floor))
            return
        self.queue.forget(key)
        delays = [o.seconds for o in outcomes if isinstance(o, Requeue)]
        if delays:
            self.queue.add_after(key, max(0.0, min(delays)))

    # -- test and bench helpers ---------------------------------------------------------------

    async def settle(self, timeout: float) -> None:
        """Wait until nothing is queued or in flight (delayed keys aside)."""
        async with asyncio.timeout(timeout):
            while len(self.queue) or self.queue.processing:
                await asyncio.sleep(0.01)
