"""The pool loop: reads every pool, plans it (:mod:`controller.pool_plan`), applies the actions.

Run by the reconciler beside its resync, on the replica holding the leader lease (pools are an
app-wide duty, like orphans; claims are not: they run on the session's own shard, in the executor).
Every ``interval`` seconds it reads the pools and their Redis state (a few reads per pool), takes
Fly's view of the pool machines from the reconciler's last snapshot, and applies each action as
its own task, one Fly call (or one store write) each, so a slow suspend never holds up a refill.
A machine (or a slot being created) with an action under way is left out of the next plan's
actions until it finishes; creates under way count as machines.

Creates are refills: they go only when no session is waiting on a create
(:meth:`controller.executor.CreatePacer.admit_background`), through the same Fly client and its
per-app token bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from api.logs import get_logger
from api.models import utcnow
from api.pool_models import Pool
from api.store_base import StoreUnavailable
from api.store_controller import ControllerStore, PoolMachineRecord
from controller import fly_errors
from controller.fly import FlyClient
from controller.metrics import ControllerMetrics
from controller.observed import TAG_SESSION, ObservedMachine
from controller.pool_claim import PoolClaimer
from controller.pool_config import pool_machine_config, pool_machine_name
from controller.pool_plan import (
    AdoptPoolMachine,
    CreatePoolMachine,
    DestroyPoolMachine,
    DropPoolClaim,
    FinishPoolClaim,
    ForgetPoolMachine,
    MarkPoolReady,
    ParkPoolMachine,
    PoolAction,
    PoolInputs,
    PoolPlanSettings,
    RemovePool,
    SetPoolStatus,
    plan_pool,
    plan_pool_orphans,
    template_digest,
)
from controller.settings import ControllerSettings

if TYPE_CHECKING:
    from controller.executor import Authority, CreatePacer

_log = get_logger("controller.pool")

#: How long a park waits for Fly to show the machine at rest before the plan looks again.
_PARK_WAIT_SECONDS = 30.0


def pool_plan_settings(settings: ControllerSettings) -> PoolPlanSettings:
    """The pool plan's timings, from the controller's (a pool machine boots like a session's)."""
    return PoolPlanSettings(
        boot_timeout_seconds=max(4 * settings.boot_grace_seconds, 30.0),
        list_lag_seconds=max(2 * settings.create_expectation_seconds, 2 * settings.resync_seconds),
        orphan_grace_seconds=settings.orphan_grace_seconds,
    )


class PoolRunner:
    """One controller's pool loop and the executor of its actions."""

    def __init__(
        self,
        *,
        store: ControllerStore,
        fly: FlyClient,
        authority: Authority,
        claimer: PoolClaimer,
        create_pacer: CreatePacer,
        settings: ControllerSettings,
        metrics: ControllerMetrics,
        machines: Callable[[], tuple[list[ObservedMachine], datetime, frozenset[str]] | None],
        plan_settings: PoolPlanSettings | None = None,
        interval: float = 1.0,
        image: str | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.fly = fly
        self.authority = authority
        self.claimer = claimer
        self.create_pacer = create_pacer
        self.settings = settings
        self.metrics = metrics
        self._machines = machines
        self.plan_settings = plan_settings or PoolPlanSettings()
        self.interval = interval
        self.image = image
        self._now = clock
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._errors: dict[str, str] = {}

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.pass_once()
                except StoreUnavailable as err:
                    _log.warning("pool_pass_unknown", error=str(err))
                await asyncio.sleep(self.interval)
        finally:
            for task in self._inflight.values():
                task.cancel()
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def pass_once(self) -> int:
        """Plan every pool once and start its actions; the number started."""
        pools = await self.store.all_pools()
        self.claimer.set_pools(pools)
        if not self.authority.is_leader_for(None):
            return 0
        view = self._machines()
        if view is None:
            return 0  # no snapshot yet: unknown, never act
        machines, listed_from, session_ids = view
        started = 0
        now = self._now()
        for pool in pools:
            state = await self.store.pool_state(pool.name)
            mine = [m for m in machines if m.pool == pool.name]
            creating = sum(1 for key in self._inflight if key.startswith(f"create:{pool.name}:"))
            inputs = PoolInputs(
                pool=pool,
                state=state,
                machines=mine,
                listed_from=listed_from,
                session_ids=session_ids,
                new_slots=[secrets.token_hex(4) for _ in range(self.plan_settings.max_creates_per_pass)],
                last_error=self._errors.get(pool.name),
                creating=creating,
            )
            for action in plan_pool(inputs, now, self.plan_settings):
                started += self._start(pool, action)
        names = {p.name for p in pools}
        for action in plan_pool_orphans(machines, names, now, self.plan_settings):
            started += self._start(None, action)
        return started

    def _start(self, pool: Pool | None, action: PoolAction) -> int:
        if isinstance(action, SetPoolStatus):
            key = f"status:{action.pool}"
        elif isinstance(action, CreatePoolMachine):
            key = f"create:{action.pool}:{action.slot}"
        elif isinstance(action, ParkPoolMachine | MarkPoolReady | AdoptPoolMachine):
            key = action.record.machine_id
        elif isinstance(action, RemovePool):
            key = f"remove:{action.pool}"
        elif isinstance(action, DropPoolClaim | FinishPoolClaim):
            key = f"claim:{action.pool}:{action.session_id}"
        else:
            key = action.machine_id
        if key in self._inflight:
            return 0
        task = asyncio.create_task(self._apply(pool, action), name=f"pool-{action.kind}-{key}")
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return 1

    async def settle(self, timeout: float) -> None:
        """Wait for the actions under way (tests)."""
        async with asyncio.timeout(timeout):
            while self._inflight:
                await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    # -- actions ----------------------------------------------------------------------------------

    async def _apply(self, pool: Pool | None, action: PoolAction) -> None:
        log = _log.bind(pool=action.pool, action=action.kind, reason=action.reason)
        try:
            await self._dispatch(pool, action, log)
        except fly_errors.FlyError as err:
            self._errors[action.pool] = f"{action.kind}: {err}"
            log.warning("pool_action_failed", error=str(err))
        except StoreUnavailable as err:
            log.warning("pool_action_failed", error=str(err))
        except Exception as err:  # a bug in one action must not stop the loop
            log.exception("pool_action_crashed", error=type(err).__name__)

    def _deadline(self) -> float:
        return max(0.1, min(self.settings.call_timeout_seconds, self.authority.remaining_for(None) - 0.1))

    async def _dispatch(self, pool: Pool | None, action: PoolAction, log: Any) -> None:
        if isinstance(action, SetPoolStatus):
            if pool is not None and action.status != pool.status:
                await self.store.write_pool_status(action.pool, action.status)
            self._gauges(action)
        elif isinstance(action, CreatePoolMachine):
            if pool is not None:
                await self._create(pool, action, log)
        elif isinstance(action, ParkPoolMachine):
            await self._park(action, log)
        elif isinstance(action, MarkPoolReady):
            await self.store.mark_pool_machine_ready(action.pool, action.record)
        elif isinstance(action, AdoptPoolMachine):
            await self._adopt(action, log)
        elif isinstance(action, ForgetPoolMachine):
            await self.store.forget_pool_machine(action.pool, action.machine_id, action.slot)
        elif isinstance(action, DestroyPoolMachine):
            await self._destroy(action, log)
        elif isinstance(action, FinishPoolClaim):
            await self.store.finish_pool_claim(action.pool, action.session_id, action.machine_id, action.slot)
        elif isinstance(action, DropPoolClaim):
            await self._drop_claim(action, log)
        elif isinstance(action, RemovePool):
            await self.store.remove_pool(action.pool, action.slots)
            self._errors.pop(action.pool, None)
            log.info("pool_removed")

    async def _create(self, pool: Pool, action: CreatePoolMachine, log: Any) -> None:
        # spec.apps narrows the agent apps this pool's machines go to (empty: every configured app).
        slot = self.create_pacer.background_slot(pool.spec.apps or None)
        if slot.wait > 0:
            return  # sessions first: the next pass tries again
        try:
            token = await self.store.mint_pool_token(pool.name, action.slot)
            config = pool_machine_config(
                pool, self.settings, slot=action.slot, pool_token=token, image=self.image
            )
            created_at = self._now()
            try:
                machine = await self.fly.create_machine(
                    config,
                    name=pool_machine_name(pool.name, action.slot),
                    region=pool.spec.template.region,
                    deadline=self._deadline(),
                    app=slot.app,
                )
            except fly_errors.AmbiguousCreate as err:
                # It may exist: the list shows it with its pool tag and the plan adopts it.
                log.warning("pool_machine_create_ambiguous", error=err.message)
                return
            except fly_errors.FlyError:
                await self.store.revoke_pool_token(pool.name, action.slot)
                raise
        finally:
            self.create_pacer.settled(slot.app)
        record = PoolMachineRecord(
            machine_id=machine.id,
            slot=action.slot,
            state="booting",
            template=template_digest(pool.spec),
            created_at=created_at,
        )
        await self.store.put_pool_machine(pool.name, record)
        self.metrics.pool_refill_creates.labels(pool=pool.name).inc()
        self._errors.pop(pool.name, None)
        log.info("pool_machine_created", machine_id=machine.id, slot=action.slot)

    async def _drop_claim(self, action: DropPoolClaim, log: Any) -> None:
        """Forget a claim that was never handed over and destroy its machine - unless, read afresh,
        the machine carries the session's tag: then it was handed over (our snapshot may not cover
        that session's shard) and only the bookkeeping is left."""
        try:
            machine = await self.fly.get_machine(action.machine_id, deadline=self._deadline())
        except fly_errors.NotFound:
            machine = None
        if machine is not None and (machine.metadata or {}).get(TAG_SESSION) == action.session_id:
            await self.store.finish_pool_claim(
                action.pool, action.session_id, action.machine_id, action.slot or ""
            )
            return
        await self._destroy_machine(action.machine_id, log)
        await self.store.drop_pool_claim(action.pool, action.session_id)
        await self.store.forget_pool_machine(action.pool, action.machine_id, action.slot)
        log.info("pool_claim_dropped", session_id=action.session_id, machine_id=action.machine_id)

    async def _adopt(self, action: AdoptPoolMachine, log: Any) -> None:
        """Record a pool machine the list shows without a record - unless, read afresh, it carries a
        session's tag (a claim handed it over since the list was taken: it is not the pool's)."""
        machine_id = action.record.machine_id
        machine = await self.fly.get_machine(machine_id, deadline=self._deadline())
        if (machine.metadata or {}).get(TAG_SESSION):
            return
        await self.store.put_pool_machine(action.pool, action.record)
        log.info("pool_machine_adopted", machine_id=machine_id)

    async def _park(self, action: ParkPoolMachine, log: Any) -> None:
        machine_id = action.record.machine_id
        deadline = self._deadline()
        try:
            if action.mode == "suspended":
                await self.fly.suspend_machine(machine_id, deadline=deadline)
            else:
                await self.fly.stop_machine(
                    machine_id, timeout=self.settings.stop_grace_seconds, deadline=deadline
                )
        except fly_errors.PreconditionFailed:
            return  # not in a state for it yet: the next pass looks again
        machine = await self.fly.get_machine(machine_id, deadline=deadline)
        wanted = "suspended" if action.mode == "suspended" else "stopped"
        if machine.state != wanted:
            await self.fly.wait_machine(
                machine_id, wanted, version=machine.current_version, timeout=_PARK_WAIT_SECONDS
            )
        await self.store.mark_pool_machine_ready(action.pool, action.record)
        log.info("pool_machine_parked", machine_id=machine_id, mode=action.mode)

    async def _destroy(self, action: DestroyPoolMachine, log: Any) -> None:
        if action.withdraw and not await self.store.withdraw_pool_machine(action.pool, action.machine_id):
            return  # a claim took it first: it is a session's machine now
        await self._destroy_machine(action.machine_id, log)
        await self.store.forget_pool_machine(action.pool, action.machine_id, action.slot)
        log.info("pool_machine_destroyed", machine_id=action.machine_id)

    async def _destroy_machine(self, machine_id: str, log: Any) -> None:
        with contextlib.suppress(fly_errors.NotFound):
            await self.fly.destroy_machine(machine_id, force=True, deadline=self._deadline())

    def _gauges(self, action: SetPoolStatus) -> None:
        status = action.status
        for state, value in (
            ("ready", status.ready),
            ("booting", status.booting),
            ("claimed", status.claimed),
        ):
            self.metrics.pool_machines.labels(pool=action.pool, state=state).set(value)
