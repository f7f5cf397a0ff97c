"""Claims: a session about to be created takes a ready pool machine instead, when one fits.

The executor asks :meth:`PoolClaimer.claim` before every create (:meth:`Executor._create`). A claim
is a resume, not a create: it does not wait on Fly's per-app create limit (only on the per-machine
start limit), so claims run in parallel on every reconcile worker. The steps, each safe to repeat:

1. **Pop** a ready machine of the first fitting pool (:func:`api.pool_models.fits`) with the claim
   script (:meth:`api.store_pool_claims.PoolClaims.claim_pool_machine`): atomic, fenced by the
   session's shard, and idempotent per session - a session that already holds a claim (a
   controller died mid-claim) gets the same machine back, never a second one.
2. **Hand over** a fresh session token and the session's env to the waiting agent through the
   gateway (:meth:`api.store_pool_handoff.PoolHandoff.assign_pool_slot`), then write the session's
   launch record naming the machine (the session side of the claim) and the ``Claimed`` lifecycle
   event (pool, machine).
3. **Tag** the machine with the session (Fly metadata, one call) so every later list shows it as
   the session's machine, and **resume** it (start: one call). From here the machine is the
   session's exactly like a fresh one: same phases, heartbeats, restarts, sleep/wake, teardown.
4. **Finish**: the claim record goes.

A crash anywhere before 4 leaves the claim record: the session's next pass comes back here (its
plan still wants a machine, or finds the launched one missing) and the claim script returns the
same machine; the pool plan finishes claims whose machine already carries the session's tag and
drops (destroying the machine) those whose session is gone. A machine that fails to resume is
destroyed and the session falls back to a fresh create at once: a pool never makes it slower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from api.models import Reason, Session, SessionEvent, utcnow
from api.pool_models import Pool, fits
from api.store_controller import ControllerStore
from controller import fly_errors
from controller.actions import (
    CreateMachine,
    Done,
    Outcome,
    Permanent,
    Requeue,
    RestartMachine,
    StartMachine,
    Transient,
)
from controller.expectations import Expectations
from controller.fly import FlyClient
from controller.metrics import ControllerMetrics
from controller.observed import TAG_LAUNCH, TAG_SESSION, ObservedMachine
from controller.pool_config import session_env
from controller.settings import ControllerSettings

if TYPE_CHECKING:
    from controller.executor import Authority, ConfigBuilder

#: The lifecycle event reason of a session that got a pool machine (a fresh one: ``CreateRequested``).
CLAIMED = "Claimed"


class PoolClaimer:
    """Claims for the executor; :attr:`pools` is refreshed by the pool loop (and by each resync)."""

    def __init__(
        self,
        *,
        store: ControllerStore,
        fly: FlyClient,
        authority: Authority,
        expectations: Expectations,
        settings: ControllerSettings,
        metrics: ControllerMetrics,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.fly = fly
        self.authority = authority
        self.expectations = expectations
        self.settings = settings
        self.metrics = metrics
        self._now = clock
        self.pools: Sequence[Pool] = ()
        self._loaded = False

    def set_pools(self, pools: Sequence[Pool]) -> None:
        """The pools as the pool loop last read them (every second or so)."""
        self.pools = pools
        self._loaded = True

    def fitting(self, session: Session) -> list[Pool]:
        return [p for p in self.pools if not p.deleted and fits(p.spec, session)]

    async def claim(
        self, action: CreateMachine, session: Session, deadline: float, log: Any
    ) -> Outcome | None:
        """The outcome of a claim, or None: no pool fits, none has a ready machine, or the claimed
        machine would not resume (it is destroyed): the caller creates a fresh machine at once."""
        if not self._loaded:
            # A controller's first creates may come before its pool loop's first read: a session
            # holding a claim from a controller that died must find it, not create another machine.
            self.set_pools(await self.store.all_pools())
        pools = self.fitting(session)
        if not pools:
            return None
        started = time.monotonic()
        sid = session.id
        fence = self.authority.fence_for(sid)
        for pool in pools:
            got = await self.store.claim_pool_machine(pool.name, sid, self._now(), fence=fence)
            if got == "fenced":
                return Transient("pool claim fenced: a newer holder of the session's shard exists")
            if got is not None:
                break
        else:
            self.metrics.pool_claim_misses.labels(pool=pools[0].name).inc()
            log.info("pool_claim_missed", pools=[p.name for p in pools])
            return None
        machine_id, record = got
        log = log.bind(pool=pool.name, machine_id=machine_id, slot=record.slot)
        token = await self.store.mint_session_token(sid)
        env = session_env(session, self.settings, launch_id=action.launch_id)
        await self.store.assign_pool_slot(pool.name, record.slot, sid, token.value, env)
        region = pool.spec.template.region
        await self.store.record_launch(
            sid, action.launch_id, {"region": region, "machineId": machine_id, "pool": pool.name}
        )
        # The session has its machine from here (a resume that fails says so in a warning after).
        await self.store.append_event(
            sid,
            SessionEvent(
                type="lifecycle",
                reason=CLAIMED,
                message=f"claimed machine {machine_id} of pool {pool.name}",
                data={"pool": pool.name, "machineId": machine_id, "slot": record.slot},
            ),
        )
        now = self._now()
        self.expectations.launch_requested(sid, action.launch_id, now)
        try:
            await self.fly.update_metadata(
                machine_id, {TAG_SESSION: sid, TAG_LAUNCH: action.launch_id}, deadline=deadline
            )
            await self.fly.start_machine(machine_id, deadline=deadline)
        except fly_errors.FlyError as err:
            if err.transient and not isinstance(err, fly_errors.PreconditionFailed):
                # Try again on the key's backoff: the claim script hands back the same machine.
                return Transient(f"claimed machine {machine_id}: {err}", retry_after=err.retry_after)
            await self._fall_back(pool.name, sid, machine_id, record.slot, str(err), log)
            return None
        # What we know (we just resumed it) stands in until the list shows it; the session's next
        # pass reads a machine in a transient state afresh anyway, so no read-back here.
        observed = ObservedMachine(
            id=machine_id,
            state="starting",
            region=region,
            session_id=sid,
            launch_id=action.launch_id,
            managed=True,
            created_at=record.created_at,
            updated_at=self._now(),
            pool=pool.name,
            pool_slot=record.slot,
        )
        # Until the list shows the new tag, the session's view has the machine (and the launch its
        # id) from here: no plan mistakes the claimed machine for a missing one.
        self.expectations.machine_created(sid, observed, self._now())
        await self.store.finish_pool_claim(pool.name, sid, machine_id, record.slot)
        self.metrics.pool_claim_seconds.labels(pool=pool.name).observe(time.monotonic() - started)
        self.metrics.pool_claims.labels(pool=pool.name).inc()
        log.info("pool_machine_claimed")
        return Done()

    async def rebuild(
        self,
        action: StartMachine | RestartMachine,
        session: Session,
        config_builder: ConfigBuilder,
        deadline: float,
        log: Any,
    ) -> Outcome:
        """Start (or restart) a claimed pool machine whose agent boots afresh: its pool config's slot
        token was spent at the handover, so first it gets the config a fresh machine of the session
        would have (a fresh session token, the session tags, no pool tags) - from then on it is a
        plain session machine. An update of a machine at rest leaves it at rest: then it is started."""
        launch = await self.store.get_launch(session.id)
        launch_id = launch.get("launchId") or "pool"
        token = await self.store.mint_session_token(session.id)
        region = launch.get("region") or session.spec.machine.region or self.settings.default_region
        config = config_builder(session, launch_id=launch_id, region=region, session_token=token.value)
        # Not auto_destroy, even for a task: the update's own restart of the agent must not destroy
        # the machine; the session plan destroys it when the session is done, as for any machine.
        config = config.model_copy(update={"auto_destroy": False})
        machine = await self.fly.update_machine(action.machine_id, config, deadline=deadline)
        log.info("pool_machine_rebuilt", machine_id=action.machine_id)
        if isinstance(action, StartMachine):
            try:
                await self.fly.wait_machine(
                    action.machine_id, "stopped", version=machine.current_version, timeout=min(deadline, 30.0)
                )
            except fly_errors.FlyError as err:
                return Requeue(1.0) if err.transient else Permanent(str(err))
            await self.fly.start_machine(action.machine_id, deadline=deadline)
        return Done()

    async def _fall_back(self, pool: str, sid: str, machine_id: str, slot: str, error: str, log: Any) -> None:
        """The claimed machine would not resume: destroy it, forget the claim; the caller creates."""
        log.warning("pool_claim_resume_failed", error=error)
        self.metrics.pool_claim_fallbacks.labels(pool=pool).inc()
        try:
            await self.fly.destroy_machine(machine_id, force=True)
        except fly_errors.NotFound:
            pass
        except fly_errors.FlyError as err:
            # Tagged with the session already: the session plan's duplicate rule destroys it.
            log.warning("pool_claim_destroy_failed", error=str(err))
        self.expectations.machine_destroyed(sid, machine_id, self._now())
        await self.store.drop_pool_claim(pool, sid)
        await self.store.forget_pool_machine(pool, machine_id, slot)
        await self.store.clear_launch(sid)
        await self.store.append_event(
            sid,
            SessionEvent(
                type="warning",
                reason=Reason.CREATE_REQUESTED,
                message=f"pool machine {machine_id} of {pool} would not resume ({error}); creating one",
                data={"pool": pool, "machineId": machine_id},
            ),
        )
