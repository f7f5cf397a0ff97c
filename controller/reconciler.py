"""The reconcile loop: desired sessions (Redis) and real machines (Fly) are made to agree, forever.

Level-triggered, in the controller-runtime mould:

* **Full resync** every ``resync_seconds``: the :class:`~controller.snapshot.WorldReader` reads the
  whole world (one paginated Fly list, one batched Redis read of the sessions of the shards this
  replica holds, :mod:`controller.shards`); every one of those sessions is queued, and orphans are
  handled from it by the one replica that holds the leader lease. The pass is the source of
  truth; everything below only makes it faster.
* **Triggers** (:mod:`controller.triggers`: the API's change feed, the agents' wake pub/sub) and
  the plan's own requeues (the next deadline it knows: heartbeat expiry, boot grace, restart
  backoff, idle timeout, a transient state's re-check) wake single keys within milliseconds.
* **Per key**, a worker plans from the snapshot plus as fresh a read of that one session as
  correctness needs (:mod:`controller.freshness`), merged with our own in-flight actions
  (:mod:`controller.expectations`). Machines last seen in a transient state are read again
  (``GET``) when a trigger or a re-check wakes the key. Before any Fly call the session is read
  whole and every machine the plan touches is re-read, then the plan is made again, so no create,
  restart or destroy is ever based on a list that is up to ``resync_seconds`` old.

"Unknown, never dead": when the Fly list or the Redis read fails, or the snapshot is too old,
nothing is planned at all (no destroy, no restart on missing data). Keys back off, the
controller reports not-ready, logs, and resumes by itself when the reads succeed again.

The parts (reader, executor, queue, expectations) are built and wired by :mod:`controller.main`
(:func:`controller.main.build_reconciler`); this module only runs the loop over them.

One ``reconcile_pass`` log line per resync (desired, observed, actions, ...); every per-key log
line carries ``session_id`` and ``reconcile_id`` (and ``machine_id`` for machine actions).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api.logs import get_logger
from api.models import Session, utcnow
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
from controller.executor import Authority, DestroyBudget, Executor, observed_from_fly
from controller.expectations import Expectations
from controller.fly import FlyClient
from controller.fly_volumes import FlyVolumes
from controller.freshness import Freshness
from controller.machine_state import SETTLED
from controller.metrics import ControllerMetrics
from controller.observed import ObservedMachine
from controller.plan import plan, plan_orphans
from controller.pool_loop import PoolRunner
from controller.queue import WorkQueue
from controller.settings import ControllerSettings, PlanSettings
from controller.snapshot import LIST_PAGE_SIZE, KeyView, Snapshot, WorldReader
from controller.triggers import CHANGE_BLOCK_MS, follow_change_feed, follow_wakes
from controller.volume_plan import VolumeRecord, needs_record, with_volume
from controller.volume_sweep import VolumeSweeper

_log = get_logger("controller.reconciler")

#: A snapshot older than this many resync intervals is "unknown": nothing is planned from it.
STALE_RESYNCS = 3.0


def new_reconcile_id() -> str:
    return secrets.token_hex(4)


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
        reader: WorldReader,
        executor: Executor,
        queue: WorkQueue,
        expectations: Expectations,
        destroy_budget: DestroyBudget,
        settings: ControllerSettings,
        authority: Authority,
        metrics: ControllerMetrics,
        options: ReconcilerOptions,
        plan_settings: PlanSettings,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.fly = fly
        self.reader = reader
        self.executor = executor
        self.queue = queue
        self.expectations = expectations
        self.destroy_budget = destroy_budget
        self.settings = settings
        self.authority = authority
        self.metrics = metrics
        self.options = options
        self.plan_settings = plan_settings
        self._now = clock
        self.freshness = Freshness()
        self.snapshot: Snapshot | None = None
        self.last_pass: PassStats | None = None
        self._actions_since_pass = 0
        self._resync_now = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        #: The reconcile under way per key, so work on a lost shard can be stopped at once.
        self._active: dict[str, asyncio.Task[list[Outcome]]] = {}
        #: Sessions that became ours at a time (shards just taken) and that no snapshot covers yet.
        self._uncovered: list[tuple[float, Callable[[str], bool]]] = []
        self.volume_sweeper = VolumeSweeper(
            store=store,
            volumes=FlyVolumes(fly),
            grace_seconds=plan_settings.orphan_grace_seconds,
            interval_seconds=max(settings.resync_seconds, plan_settings.orphan_grace_seconds),
            call_timeout_seconds=settings.call_timeout_seconds,
        )
        #: The warm-pool loop (controller/pool_loop.py), run beside the resync; set by the wiring.
        self.pools: PoolRunner | None = None

    @property
    def redis_ok(self) -> bool:
        return self.reader.redis_ok

    @property
    def fly_ok(self) -> bool:
        return self.reader.fly_ok

    # -- whole-process loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Resync, triggers and workers until cancelled (the controller runs this while leading)."""
        tasks = [asyncio.create_task(self._resync_loop(), name="reconciler-resync")]
        if self.options.change_feed:
            feed = follow_change_feed(
                self.store, self.wake, self.reader.redis_down, block_ms=self.options.change_block_ms
            )
            tasks.append(asyncio.create_task(feed, name="reconciler-changes"))
        if self.options.wake_pubsub:
            tasks.append(asyncio.create_task(follow_wakes(self.store, self.wake), name="reconciler-wake"))
        tasks.append(asyncio.create_task(self._volume_sweep_loop(), name="reconciler-volumes"))
        if self.pools is not None:
            tasks.append(asyncio.create_task(self.pools.run(), name="reconciler-pools"))
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

    def wake(self, session_id: str) -> None:
        """Reconcile ``session_id`` soon, with a fresh read of it (a trigger said it changed)."""
        if not self.authority.is_leader_for(session_id):
            return  # another replica's shard: its own trigger loop wakes it there
        self.freshness.changed(session_id)
        self.queue.add(session_id, urgent=True)

    def busy(self, owned: Callable[[str], bool]) -> bool:
        """Is a reconcile of one of the sessions ``owned`` selects under way?"""
        return any(owned(key) for key in self._active)

    def stop_acting(self, owned: Callable[[str], bool]) -> int:
        """Cancel the reconciles under way of the sessions ``owned`` selects (their shard was lost)
        and forget what we knew of them; the number cancelled."""
        cancelled = 0
        for key, task in list(self._active.items()):
            if owned(key) and not task.done():
                task.cancel()
                cancelled += 1
        for key in [k for k in self.freshness_keys() if owned(k)]:
            self._forget(key)
        return cancelled

    def uncovered(self, owned: Callable[[str], bool]) -> None:
        """The sessions ``owned`` selects became ours just now (a shard was taken): no plan for them
        until a snapshot read after this moment, which sees the machines the last owner made."""
        self._uncovered.append((time.monotonic(), owned))
        self.nudge()

    @property
    def covers_its_shards(self) -> bool:
        """True once a snapshot covers every session this replica owns (no shard taken since)."""
        return self.snapshot is not None and not self._uncovered

    def pool_view(self) -> tuple[list[ObservedMachine], datetime, frozenset[str]] | None:
        """The pool loop's inputs from the last snapshot: Fly's machines (our own recent changes
        merged in), when the list started, every session id; None while the inputs are unknown."""
        snapshot = self.snapshot
        if snapshot is None or not self._inputs_known(snapshot):
            return None
        listed = [m for m in snapshot.all_machines if not self.expectations.hidden(m.id)]
        return listed, snapshot.listed_from, snapshot.all_ids

    def freshness_keys(self) -> list[str]:
        snapshot = self.snapshot
        return list(snapshot.sessions) if snapshot is not None else []

    # -- full resync ------------------------------------------------------------------------------

    async def _resync_loop(self) -> None:
        failures = 0
        while True:
            # Cleared before the pass: a nudge that arrives during it (a shard taken mid-read)
            # starts the next pass at once instead of being lost.
            self._resync_now.clear()
            stats = await self.resync()
            failures = 0 if stats.ok else failures + 1
            wait = self.settings.resync_seconds
            if failures:
                # Unknown inputs: look again sooner than a full interval, but back off.
                wait = min(wait, 0.2 * 2 ** min(failures, 6))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync_now.wait(), wait)

    async def resync(self) -> PassStats:
        """One full pass: read everything, queue every session, handle orphans; never raises."""
        rid = new_reconcile_id()
        log = _log.bind(reconcile_id=rid)
        started = time.monotonic()
        stats = PassStats(reconcile_id=rid, ok=False)
        self.destroy_budget.reset()
        app_wide = self.authority.is_leader_for(None)
        read_started = time.monotonic()
        if not self.authority.is_leader():
            # No shard and not the leader: nothing to act on, so nothing to read.
            stats.ok, stats.error = True, "idle: no shard held"
            self.last_pass = stats
            return stats
        try:
            async with asyncio.timeout(self.settings.pass_timeout_seconds):
                snapshot, pages = await self.reader.read(self.authority.is_leader_for, orphans=app_wide)
        except (StoreUnavailable, fly_errors.FlyError, TimeoutError, OSError) as err:
            stats.error = f"{type(err).__name__}: {err}"
            stats.seconds = time.monotonic() - started
            self.metrics.passes.labels(kind="resync", result="unknown").inc()
            self.metrics.ready.set(0)
            log.warning(
                "reconcile_pass_unknown",
                error=stats.error,
                redis_ok=self.reader.redis_ok,
                fly_ok=self.reader.fly_ok,
                seconds=round(stats.seconds, 3),
            )
            self.last_pass = stats
            return stats
        self.snapshot = snapshot
        self._uncovered = [(t, owned) for t, owned in self._uncovered if t >= read_started]
        self.expectations.settle(snapshot.all_machines, snapshot.listed_from, self._now())
        stats.ok = True
        stats.fly_pages = pages
        stats.desired = len(snapshot.sessions)
        stats.observed = len(snapshot.all_machines)
        for session_id in snapshot.sessions:
            self.freshness.resynced(session_id)
            self.queue.add(session_id)
        stats.enqueued = len(snapshot.sessions)
        stats.orphans = await self._handle_orphans(snapshot, log) if app_wide else 0
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

    async def _handle_orphans(self, snapshot: Snapshot, log: Any) -> int:
        """Destroy machines of ours whose session does not exist (after the plan's grace)."""
        candidates = [m for m in snapshot.all_machines if not self.expectations.hidden(m.id)]
        actions = plan_orphans(candidates, set(snapshot.all_ids), self._now(), self.plan_settings)
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
            outcome = await self.executor.apply(action, log=log.bind(orphan=True), app_wide=True)
            if isinstance(outcome, Done):
                applied += 1
                self._actions_since_pass += 1
        return applied

    async def _volume_sweep_loop(self) -> None:
        """Orphan volumes (controller/volume_sweep.py), by the leader, beside the resync: a slow
        volume list must never hold up the pass the machines depend on."""
        while True:
            await asyncio.sleep(self.volume_sweeper.interval_seconds)
            if not self.authority.is_leader_for(None) or self.last_pass is None or not self.last_pass.ok:
                continue  # not ours, or the world is unknown: never destroy on missing data
            log = _log.bind(reconcile_id=new_reconcile_id())
            try:
                apply = functools.partial(self.executor.apply, log=log.bind(orphan=True), app_wide=True)
                await self.volume_sweeper.sweep(self._now(), apply, log)
            except Exception as err:  # a bug here must not stop the reconciler
                log.exception("volume_sweep_crashed", error=type(err).__name__)

    async def _mark_seen(self) -> None:
        record = json.dumps({"at": self._now().isoformat(), "leader": self.authority.is_leader_for(None)})
        holder = str(getattr(self.authority, "holder_id", "controller"))
        with contextlib.suppress(Exception):
            await self.store.record_controller_seen(holder, record)

    # -- workers ----------------------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        while (key := await self.queue.get()) is not None:
            self.metrics.in_flight.inc()
            self.metrics.queue_depth.set(len(self.queue))
            task = asyncio.create_task(self.reconcile_key(key), name=f"reconcile-{key}")
            self._active[key] = task
            try:
                async with asyncio.timeout(self.settings.pass_timeout_seconds):
                    await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the worker itself is being stopped
                # Only this key's reconcile was cancelled: its shard was lost (stop_acting).
                _log.info("reconcile_cancelled", session_id=key)
            except TimeoutError:
                _log.warning("reconcile_timed_out", session_id=key)
                self.queue.add_rate_limited(key)
            except Exception as err:  # a bug in one key must not stop the worker
                _log.exception("reconcile_crashed", session_id=key, error=type(err).__name__)
                self.queue.add_rate_limited(key)
            finally:
                self._active.pop(key, None)
                self.metrics.in_flight.dec()
                self.queue.done(key)

    async def reconcile_key(self, key: str) -> list[Outcome]:
        """Plan and apply one session; schedule its next look. Returns the outcomes (for tests)."""
        rid = new_reconcile_id()
        log = _log.bind(session_id=key, reconcile_id=rid)
        started = time.monotonic()
        snapshot = self.snapshot
        if not self.authority.is_leader_for(key):
            # Another replica's shard (or ours no more): it is not ours to plan. The resync that
            # follows a shard's acquisition queues its sessions here.
            self._forget(key)
            return []
        if (snapshot is not None and key in snapshot.all_ids and key not in snapshot.sessions) or any(
            owned(key) for _at, owned in self._uncovered
        ):
            # Its shard was taken after this snapshot was read: the snapshot has none of its machines
            # (the last owner may have made one), and a plan on that would see none. The resync
            # (nudged on acquisition) queues it.
            self.queue.add_after(key, min(1.0, self.settings.resync_seconds))
            return []
        if snapshot is None or not self._inputs_known(snapshot):
            # Unknown, never dead: no plan without a recent whole view and the right to act.
            self.freshness.changed(key)
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
            moving = {m.id for m in machines if m.state not in SETTLED}
            if view.read != "snapshot" and moving:
                # A trigger or the plan's re-check woke us while the machine was last seen in a
                # transient state: look at it now rather than wait for the next list.
                machines = await self._refresh_machines(key, moving, log)
            actions = self._plan(view, machines)
            if any(is_fly_call(a) for a in actions):
                # Never create, restart, stop or destroy on the strength of data that may be old:
                # read this session afresh, look at the machines the plan touches, plan again.
                if view.read != "full":
                    view = await self._read_whole(key)
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
            self.reader.redis_down()
            self.freshness.changed(key)
            self.queue.add_rate_limited(key)
            log.warning("reconcile_read_failed", error=str(err))
            self.metrics.passes.labels(kind="key", result="unknown").inc()
            return []
        assert view.session is not None
        if needs_record(view.session, actions):
            try:
                # The session's volume (spec.persistence): made before its machine, mounted by every
                # launch, destroyed before its record is removed (controller/volume_plan.py).
                record = VolumeRecord.from_fields(await self.store.get_volume(key))
            except StoreUnavailable as err:
                self.queue.add_rate_limited(key)
                log.warning("reconcile_read_failed", error=str(err))
                return []
            actions = with_volume(view.session, actions, record)
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
        self.freshness.forget(key)

    def _inputs_known(self, snapshot: Snapshot) -> bool:
        age = time.monotonic() - snapshot.taken_mono
        return (
            self.fly_ok and self.redis_ok and age <= self.settings.resync_seconds * self.options.stale_resyncs
        )

    async def _view(self, key: str, snapshot: Snapshot) -> KeyView:
        """The session's inputs, read as cheaply as correctness allows (:mod:`controller.freshness`)."""
        how = self.freshness.how_to_read(key, snapshot.read_from)
        view: KeyView | None = None
        if how == "snapshot":
            view = self.reader.from_snapshot(key, snapshot)
        elif how == "heartbeat":
            view = await self.reader.read_heartbeat(key, snapshot)
        return view if view is not None else await self._read_whole(key)

    async def _read_whole(self, key: str) -> KeyView:
        view = await self.reader.read_session(key)
        self.freshness.read_whole(key)
        return view

    def _plan(self, view: KeyView, machines: list[ObservedMachine]) -> list[Action]:
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
            heartbeats_known_since=self.reader.heartbeats_known_since,
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
            self.freshness.acted(session.id, self._now())
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
