"""The controller process: settings, logs, shards and leader election, the reconciler, health.

``flyswarm controller`` and ``python -m controller`` both call :func:`main`. One process is one
:class:`Controller`, one replica among any number:

* it holds its share of the ``FLYSWARM_SHARDS`` shard leases (:mod:`controller.shards`) and runs
  the reconciler (:mod:`controller.reconciler`) on the sessions of those shards; a shard that is
  lost (not renewable in time, or taken) has the work on its sessions cancelled at once;
* it campaigns for the Redis leader lease (:mod:`controller.leader`), which now elects the one
  replica that does the app-wide duties: orphan machines, the credential finalizer and the
  webhook worker (:mod:`controller.webhook_worker`);
* it divides Fly's per-app budget (creates, lists) by the number of live replicas;
* it serves ``/healthz``, ``/readyz`` and ``/metrics`` on ``FLYSWARM_CONTROLLER_PORT``, the shards
  it holds included (a replica that holds nothing checks Fly with a cheap list now and then so
  its readiness means something);
* on SIGTERM (or SIGINT) it stops taking work, lets in-flight actions finish within
  ``shutdown_seconds`` (their Fly leases are released as they end), releases its shards and the
  leader lease so the other replicas take over at once, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Generator
from dataclasses import replace
from datetime import datetime
from typing import Any

import uvicorn

from api.logs import configure_logging, get_logger, register_secret
from api.models import utcnow
from api.store_controller import ControllerStore
from controller.backoff import Backoff
from controller.executor import (
    Authority,
    ConfigBuilder,
    DestroyBudget,
    Executor,
    ExecutorSettings,
)
from controller.expectations import Expectations
from controller.fly import FlyClient, FlyClientConfig, normalize_base_url
from controller.fly_errors import FlyError
from controller.health import Readiness, create_health_app
from controller.leader import LeaderElector, LeaderTiming
from controller.machine_config import MachineConfigBuilder
from controller.metrics import ControllerMetrics
from controller.observed import MANAGED_VALUE, TAG_MANAGED
from controller.pool_claim import PoolClaimer
from controller.pool_loop import PoolRunner, pool_plan_settings
from controller.queue import WorkQueue
from controller.reconciler import Reconciler, ReconcilerOptions
from controller.settings import ControllerSettings
from controller.shards import ShardManager, shard_of
from controller.snapshot import WorldReader
from controller.webhook_sender import WebhookSender
from controller.webhook_worker import WebhookTiming, WebhookWorker

_log = get_logger("controller.main")

#: Time in-flight actions get to finish after SIGTERM (Fly's own stop timeout is 10 s by default).
DEFAULT_SHUTDOWN_SECONDS = 20.0


def leader_timing(settings: ControllerSettings) -> LeaderTiming:
    """client-go's proportions (15 / 10 / 2) scaled to ``FLYSWARM_LEADER_LEASE_SECONDS``."""
    lease = settings.leader_lease_seconds
    return LeaderTiming(
        lease_seconds=lease,
        renew_deadline_seconds=lease * 2 / 3,
        retry_period_seconds=lease * 2 / 15,
    )


def build_reconciler(
    *,
    settings: ControllerSettings,
    store: ControllerStore,
    fly: FlyClient,
    authority: Authority,
    config_builder: ConfigBuilder,
    metrics: ControllerMetrics | None = None,
    options: ReconcilerOptions | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Reconciler:
    """The wiring of one reconciler: its reader, executor, queue and the expectations they share."""
    metrics = metrics or ControllerMetrics()
    options = options or ReconcilerOptions()
    expectations = Expectations(max_age_seconds=settings.create_expectation_seconds)
    destroy_budget = DestroyBudget(settings.max_destroys_per_pass)
    executor = Executor(
        store=store,
        fly=fly,
        authority=authority,
        expectations=expectations,
        config_builder=config_builder,
        settings=ExecutorSettings(
            call_timeout_seconds=settings.call_timeout_seconds,
            stop_grace_seconds=settings.stop_grace_seconds,
            max_destroys_per_pass=settings.max_destroys_per_pass,
        ),
        metrics=metrics,
        destroy_budget=destroy_budget,
        clock=clock,
    )
    claimer = PoolClaimer(
        store=store,
        fly=fly,
        authority=authority,
        expectations=expectations,
        settings=settings,
        metrics=metrics,
        clock=clock,
    )
    executor.claimer = claimer
    reader = WorldReader(
        store=store,
        fly=fly,
        expectations=expectations,
        metrics=metrics,
        call_timeout_seconds=settings.call_timeout_seconds,
        page_size=options.list_page_size,
        clock=clock,
    )
    queue = WorkQueue(backoff=Backoff(base=options.backoff_base_seconds, cap=options.backoff_cap_seconds))
    reconciler = Reconciler(
        store=store,
        fly=fly,
        reader=reader,
        executor=executor,
        queue=queue,
        expectations=expectations,
        destroy_budget=destroy_budget,
        settings=settings,
        authority=authority,
        metrics=metrics,
        options=options,
        plan_settings=settings.plan_settings(),
        clock=clock,
    )
    reconciler.pools = PoolRunner(
        store=store,
        fly=fly,
        authority=authority,
        claimer=claimer,
        create_pacer=executor.create_pacer,
        settings=settings,
        metrics=metrics,
        machines=reconciler.pool_view,
        plan_settings=pool_plan_settings(settings),
        interval=min(1.0, settings.resync_seconds),
        image=getattr(config_builder, "image", None),
        clock=clock,
    )
    return reconciler


def fly_client_for(settings: ControllerSettings, metrics: ControllerMetrics, **overrides: Any) -> FlyClient:
    token = settings.fly_api_token.get_secret_value() if settings.fly_api_token is not None else ""
    config = FlyClientConfig(
        app_name=settings.fly_app_name,
        apps=settings.agent_apps,
        api_token=token,
        base_url=normalize_base_url(settings.fly_api_hostname),
        call_deadline=settings.call_timeout_seconds,
        on_response=metrics.on_fly_response,
        # Which replica called, in Fly's logs and the emulator's request log.
        user_agent=f"flyswarm-controller/{settings.controller_id}",
    )
    transport = overrides.pop("transport", None)
    if overrides:
        config = replace(config, **overrides)
    return FlyClient(config, transport=transport)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the controller owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Controller:
    """One controller replica. ``await Controller(settings).run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        settings: ControllerSettings,
        *,
        store: ControllerStore | None = None,
        fly: FlyClient | None = None,
        metrics: ControllerMetrics | None = None,
        config_builder: ConfigBuilder | None = None,
        timing: LeaderTiming | None = None,
        options: ReconcilerOptions | None = None,
        serve_health: bool = True,
        shutdown_seconds: float = DEFAULT_SHUTDOWN_SECONDS,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ControllerMetrics()
        self._owns_store = store is None
        self._owns_fly = fly is None
        self.store = store or ControllerStore.from_url(settings.redis_url.get_secret_value())
        self.fly = fly or fly_client_for(settings, self.metrics)
        self.config_builder = config_builder or MachineConfigBuilder(settings)
        self.options = options
        self.serve_health = serve_health
        self.shutdown_seconds = shutdown_seconds
        timing = timing or leader_timing(settings)
        self.elector = LeaderElector(
            self.store,
            holder_id=settings.controller_id,
            timing=timing,
            on_started=self._start_leading,
            on_stopped=self._stop_leading,
        )
        self.shards = ShardManager(
            self.store,
            holder_id=settings.controller_id,
            count=settings.shards,
            timing=timing,
            app_wide=self.elector,
            on_gained=self._shards_gained,
            on_lost=self._shards_lost,
            on_members=self._replicas_changed,
            busy=self._shard_busy,
        )
        self.reconciler: Reconciler | None = None
        self._term: asyncio.Task[None] | None = None
        self._webhooks: asyncio.Task[None] | None = None
        self._fly_probe_ok = False
        self.health_app = create_health_app(self.readiness, self.metrics)
        self._show_shards()

    # -- readiness --------------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        leading = self.elector.is_leader()
        reconciler = self.reconciler
        acting = self.shards.is_leader()
        if acting and reconciler is not None and reconciler.last_pass is not None:
            redis_ok, fly_ok = reconciler.redis_ok, reconciler.fly_ok
        else:
            redis_ok, fly_ok = self.elector.redis_ok and self.shards.redis_ok, self._fly_probe_ok
        self.metrics.ready.set(1 if redis_ok and fly_ok else 0)
        return Readiness(
            redis=redis_ok,
            fly=fly_ok,
            leader=leading,
            holder=self.elector.current_holder,
            shards=tuple(self.shards.held),
            shard_count=self.shards.count,
            replicas=self.shards.replicas,
        )

    # -- leadership (the app-wide duties) and shards ------------------------------------------------

    async def _start_leading(self) -> None:
        self.metrics.leader.set(1)
        self._start_webhooks()
        if self.reconciler is not None:
            self.reconciler.nudge()  # orphans are ours to collect now

    async def _stop_leading(self) -> None:
        self.metrics.leader.set(0)
        await self._stop_webhooks()

    # -- webhooks: the leader's worker (controller/webhook_worker.py) ------------------------------

    def _start_webhooks(self) -> None:
        if self._webhooks is not None and not self._webhooks.done():
            return
        sender = WebhookSender(
            timeout_seconds=self.settings.webhook_timeout_seconds,
            allow_private=self.settings.webhook_allow_private,
            max_connections=self.settings.webhook_concurrency,
        )
        worker = WebhookWorker(
            self.store, sender, timing=WebhookTiming.from_settings(self.settings), metrics=self.metrics
        )
        self._webhooks = asyncio.create_task(_run_webhooks(worker), name="controller-webhooks")

    async def _stop_webhooks(self) -> None:
        task, self._webhooks = self._webhooks, None
        if task is not None and not task.done():
            task.cancel()
            await _wait_quietly(task)

    async def _shards_gained(self, shards: frozenset[int]) -> None:
        self._show_shards()
        if self.reconciler is not None:
            count = self.shards.count
            # Resync now; until then nothing is planned for the new shards' sessions.
            self.reconciler.uncovered(lambda sid: shard_of(sid, count) in shards)

    async def _shards_lost(self, shards: frozenset[int]) -> None:
        self._show_shards()
        reconciler = self.reconciler
        if reconciler is not None:
            count = self.shards.count
            # Another replica may hold these within lease_seconds: stop acting on them now.
            reconciler.stop_acting(lambda sid: shard_of(sid, count) in shards)

    def _shard_busy(self, shard: int) -> bool:
        reconciler, count = self.reconciler, self.shards.count
        return reconciler is not None and reconciler.busy(lambda sid: shard_of(sid, count) == shard)

    def _replicas_changed(self, replicas: int) -> None:
        """Fly's per-app limits are the app's, not a replica's: each of N replicas takes 1/N."""
        self.metrics.replicas.set(replicas)
        self.fly.set_app_share(1.0 / replicas)
        if self.reconciler is not None:
            self.reconciler.executor.create_pacer.set_share(1.0 / replicas)

    def _show_shards(self) -> None:
        held = set(self.shards.held)
        self.metrics.shards_held.set(len(held))
        for shard in range(self.shards.count):
            self.metrics.shard_held.labels(shard=str(shard)).set(1 if shard in held else 0)

    # -- the process ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, reconcile while leading, serve health; return after a graceful shutdown."""
        _log.info(
            "controller_starting",
            controller_id=self.settings.controller_id,
            fly_apps=",".join(self.settings.agent_apps),
            fly_api=normalize_base_url(self.settings.fly_api_hostname),
            resync_seconds=self.settings.resync_seconds,
            concurrency=self.settings.concurrency,
            shards=self.settings.shards,
        )
        self.reconciler = build_reconciler(
            store=self.store,
            fly=self.fly,
            settings=self.settings,
            authority=self.shards,
            config_builder=self.config_builder,
            metrics=self.metrics,
            options=self.options,
        )
        self._term = asyncio.create_task(self.reconciler.run(), name="controller-reconciler")
        background = [
            asyncio.create_task(self.elector.run(), name="controller-elector"),
            asyncio.create_task(self.shards.run(), name="controller-shards"),
            asyncio.create_task(self._probe_fly_loop(), name="controller-fly-probe"),
        ]
        server: _QuietServer | None = None
        if self.serve_health:
            config = uvicorn.Config(
                self.health_app,
                host=self.settings.controller_host,
                port=self.settings.controller_port,
                log_level="warning",
                lifespan="off",
                access_log=False,
                # A scrape or probe in flight must not hold up the controller's exit (uvicorn
                # would otherwise wait for every open request without limit).
                timeout_graceful_shutdown=2,
            )
            server = _QuietServer(config)
            background.append(asyncio.create_task(server.serve(), name="controller-health"))
        try:
            await stop.wait()
        finally:
            await self._shutdown(background, server)

    async def _shutdown(self, background: list[asyncio.Task[Any]], server: _QuietServer | None) -> None:
        _log.info("controller_stopping", shutdown_seconds=self.shutdown_seconds)
        reconciler, term = self.reconciler, self._term
        finished = True
        if reconciler is not None and term is not None and not term.done():
            # Stop taking work; in-flight actions finish (and release their Fly leases).
            finished = await reconciler.drain(self.shutdown_seconds)
        if term is not None and not term.done():
            term.cancel()
            await _wait_quietly(term)
        # An attempt in flight is cut: its delivery is sent again (same webhook-id) by the next leader.
        await self._stop_webhooks()
        # Release the shards and the leader lease so the others take over now, not after the TTL.
        self.elector.stop()
        self.shards.stop()
        for task in background[:2]:
            task.cancel()
        for task in background[:2]:
            await _wait_quietly(task)
        if server is not None:
            server.should_exit = True
        for task in background[2:]:
            if task.get_name() != "controller-health":
                task.cancel()
        await asyncio.gather(*background[2:], return_exceptions=True)
        if self._owns_fly:
            await self.fly.aclose()
        if self._owns_store:
            await self.store.close()
        _log.info("controller_stopped", in_flight_finished=finished)

    async def _probe_fly_loop(self) -> None:
        """While holding nothing, check now and then that Fly answers (readiness); one cheap call."""
        interval = max(self.settings.resync_seconds, 5.0)
        while True:
            if not self.shards.is_leader():
                try:
                    await self.fly.list_machines(
                        metadata={TAG_MANAGED: MANAGED_VALUE},
                        summary=True,
                        limit=1,
                        deadline=5.0,
                        app=self.fly.config.apps[0],
                    )
                    self._fly_probe_ok = True
                except FlyError as err:
                    self._fly_probe_ok = False
                    _log.warning("fly_probe_failed", error=str(err))
            await asyncio.sleep(interval)


async def _run_webhooks(worker: WebhookWorker) -> None:
    try:
        await worker.run()
    finally:
        await worker.sender.aclose()


async def _wait_quietly(task: asyncio.Task[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def run_until_signalled(settings: ControllerSettings) -> int:
    """Run one controller until SIGTERM/SIGINT; the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    controller = Controller(settings)
    await controller.run(stop)
    return 0


def main() -> None:
    """Entry point of ``flyswarm controller`` / ``python -m controller``."""
    settings = ControllerSettings()
    configure_logging(settings.log_level)
    register_secret(settings.redis_url.get_secret_value())
    if settings.fly_api_token is not None:
        register_secret(settings.fly_api_token.get_secret_value())
    sys.exit(asyncio.run(run_until_signalled(settings)))
