"""A small real world for controller tests: Redis, the Fly emulator on a loopback port, controllers.

Everything is real: a ``redis-server`` (tests/conftest.py), the emulator served by uvicorn over
HTTP (so a cancelled controller cannot cancel the emulator's work, as on Fly), the real
:class:`FlyClient`, and machines that are real subprocesses running ``local/heartbeat_agent.py``
(a minimal agent that heartbeats and reports, scripted through its prompt and inbox).

:class:`World` also checks the invariants of DESIGN.md on the state of Redis and the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis.asyncio as aioredis
import uvicorn

from api import keys
from api.models import TERMINAL_PHASES, Phase, Session, SessionSpec
from controller.fly import FlyClient, FlyClientConfig
from controller.leader import LeaderTiming
from controller.main import Controller
from controller.metrics import ControllerMetrics
from controller.observed import TAG_MANAGED, TAG_POOL, TAG_SESSION
from controller.reconciler import ReconcilerOptions
from controller.settings import ControllerSettings
from local.emulator import EmulatorSettings, create_app, emulator_state
from local.emulator_faults import FaultSettings
from local.emulator_state import EmulatorState
from local.redis_server import free_port
from tests.gateway.conftest import start_gateway
from tests.store import Store

APP = "flyswarm-agents-test"
IMAGE = "flyswarm-agent"
T = TypeVar("T")


class QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def heartbeat_images() -> dict[str, list[str]]:
    return {IMAGE: [sys.executable, "-m", "local.heartbeat_agent"]}


def fast_settings(redis_url: str, fly_url: str, **overrides: Any) -> ControllerSettings:
    """Controller settings with test timings (sub-second resync, seconds-long graces)."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "fly_api_token": "test-fly-token-0123",
        "fly_app_name": APP,
        "fly_agent_image": IMAGE,
        "fly_api_hostname": fly_url,
        "resync_seconds": 0.3,
        "heartbeat_ttl_seconds": 2.0,
        # Room for a Python agent to start on a loaded two-core CI machine (4 test workers at once).
        "boot_grace_seconds": 10.0,
        "orphan_grace_seconds": 1.0,
        "create_expectation_seconds": 3.0,
        "wedge_seconds": 60.0,
        "wedge_updating_seconds": 60.0,
        "restart_backoff_base_seconds": 0.2,
        "restart_backoff_max_seconds": 1.0,
        "stop_grace_seconds": 3.0,
        "destroy_grace_seconds": 3.0,
        "default_region": "fra",
        "concurrency": 4,
        "max_destroys_per_pass": 20,
        "pass_timeout_seconds": 20.0,
        "call_timeout_seconds": 5.0,
        "leader_lease_seconds": 2.0,
        "controller_port": free_port(),
        "log_level": "warning",
    }
    values.update(overrides)
    return ControllerSettings(**values)


@dataclass
class RunningController:
    controller: Controller
    task: asyncio.Task[None]
    stop: asyncio.Event

    async def shutdown(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 30)

    def crash(self) -> None:
        """Die without any cleanup: no drain, no lease release (the leader lease just expires)."""
        self.controller.elector._stopping = True
        self.controller.elector._value = "crashed"  # its release will not match: the lease stays
        self.controller.shards.release_on_exit = False  # its shards and membership just expire
        self.task.cancel()


@dataclass
class World:
    redis_url: str
    redis: aioredis.Redis
    store: Store
    emulator: EmulatorState
    fly_url: str
    fly: FlyClient
    http: httpx.AsyncClient
    gateway_url: str = "http://127.0.0.1:9"
    controllers: list[RunningController] = field(default_factory=list)
    finished_seen: dict[str, Phase] = field(default_factory=dict)

    # -- controllers ------------------------------------------------------------------------------

    def settings(self, **overrides: Any) -> ControllerSettings:
        return fast_settings(
            self.redis_url, self.fly_url, **{"agent_gateway_url": self.gateway_url, **overrides}
        )

    async def start_controller(
        self, *, fly: FlyClient | None = None, metrics: ControllerMetrics | None = None, **overrides: Any
    ) -> RunningController:
        settings = self.settings(**overrides)
        controller = Controller(
            settings,
            store=Store.from_url(self.redis_url),
            fly=fly,
            metrics=metrics or ControllerMetrics(),
            timing=LeaderTiming(
                lease_seconds=settings.leader_lease_seconds,
                renew_deadline_seconds=settings.leader_lease_seconds * 2 / 3,
                retry_period_seconds=0.1,
            ),
            options=ReconcilerOptions(change_block_ms=200, backoff_cap_seconds=2.0),
            serve_health=False,
            shutdown_seconds=10.0,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        running = RunningController(controller, task, stop)
        self.controllers.append(running)
        return running

    # -- sessions ---------------------------------------------------------------------------------

    async def create_session(self, session_id: str, **spec: Any) -> Session:
        spec.setdefault("prompt", "heartbeat")
        session = self.store.new_session(session_id, SessionSpec.model_validate(spec))
        outcome = await self.store.create_or_get(session)
        assert outcome.session is not None
        return outcome.session

    async def session(self, session_id: str) -> Session | None:
        return await self.store.get(session_id)

    async def phase(self, session_id: str) -> Phase | None:
        session = await self.store.get(session_id)
        return session.status.phase if session is not None else None

    # -- machines ---------------------------------------------------------------------------------

    def machines(self, session_id: str | None = None, *, live: bool = True) -> list[Any]:
        """Machines of ours as the emulator knows them (its truth, not the lagging list)."""
        found = []
        for m in self.emulator.machines.values():
            meta = m.config.get("metadata") or {}
            if meta.get(TAG_MANAGED) != "true":
                continue
            if session_id is not None and meta.get(TAG_SESSION) != session_id:
                continue
            if live and m.state == "destroyed":
                continue
            found.append(m)
        return found

    def live_machine(self, session_id: str) -> Any | None:
        machines = self.machines(session_id)
        return machines[0] if len(machines) == 1 else None

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, path, **kwargs)
        response.raise_for_status()
        return response

    async def set_faults(self, **knobs: Any) -> None:
        await self.admin("PATCH", "/_admin/faults", json=knobs)

    # -- waiting and invariants -------------------------------------------------------------------

    async def until(
        self, check: Callable[[], Awaitable[T | None]], timeout: float = 30.0, what: str = ""
    ) -> T:
        """Poll ``check`` until it returns something truthy; fail fast after ``timeout``."""
        last: T | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    last = await check()
                    if last:
                        await self.record_phases()
                        return last
                    await self.record_phases()
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what or check}: last={last!r}") from None

    async def until_phase(self, session_id: str, *phases: Phase, timeout: float = 30.0) -> Session:
        async def check() -> Session | None:
            session = await self.store.get(session_id)
            return session if session is not None and session.status.phase in phases else None

        return await self.until(check, timeout, f"{session_id} in {phases}")

    async def until_running(self, session_id: str, timeout: float = 30.0) -> Session:
        """Running with exactly one live, started machine (a converged session)."""

        async def check() -> Session | None:
            session = await self.store.get(session_id)
            if session is not None and session.status.phase in TERMINAL_PHASES:
                # Fail now, saying why, rather than after the timeout with nothing to go on.
                raise AssertionError(
                    f"{session_id} finished while waiting for it to run: {session.status.phase} "
                    f"{session.status.reason}: {session.status.message}"
                )
            if session is None or session.status.phase is not Phase.RUNNING:
                return None
            machine = self.live_machine(session_id)
            if machine is None or machine.state != "started" or session.status.machineId != machine.id:
                return None
            return session

        return await self.until(check, timeout, f"{session_id} running on one machine")

    async def until_launched(self, session_id: str, timeout: float = 30.0) -> Session:
        """Running or already Sleeping on its one machine: for chats with a short idle timeout, which
        one pass may take from Creating straight to Sleeping (its agent was idle by then)."""

        async def check() -> Session | None:
            session = await self.store.get(session_id)
            if session is None or session.status.phase not in (Phase.RUNNING, Phase.SLEEPING):
                return None
            machine = self.live_machine(session_id)
            if machine is None or session.status.machineId != machine.id:
                return None
            return session

        return await self.until(check, timeout, f"{session_id} launched on one machine")

    async def record_phases(self) -> None:
        """Remember every finished phase seen, to prove it never flips back."""
        for session in await self.store.all_sessions():
            phase = session.status.phase
            before = self.finished_seen.get(session.id)
            if before is not None:
                assert phase in (before, Phase.TERMINATING), f"{session.id} flipped from {before} to {phase}"
            if phase in TERMINAL_PHASES:
                self.finished_seen[session.id] = phase

    async def converged(self) -> bool:
        """No session with two live machines, and no live machine of ours without a session (or pool)."""
        sessions = {s.id for s in await self.store.all_sessions()}
        per_session: dict[str, int] = {}
        for m in self.machines():
            meta = m.config.get("metadata") or {}
            sid = meta.get(TAG_SESSION)
            if sid is None and meta.get(TAG_POOL):
                continue  # a pool's unclaimed machine: the pool's, not an orphan
            if sid not in sessions:
                return False
            per_session[sid] = per_session.get(sid, 0) + 1
        return all(count <= 1 for count in per_session.values())

    async def assert_invariants(self, expected_sessions: set[str], timeout: float = 30.0) -> None:
        """DESIGN.md's invariants, after convergence, on Redis and the emulator."""
        await self.until(self.converged, timeout, "at most one machine per session and no orphan")
        stored = {s.id for s in await self.store.all_sessions()}
        missing = expected_sessions - stored
        assert not missing, f"sessions lost: {missing}"
        await self.record_phases()
        for session_id in stored:
            for stored_event in await self.store.read_events(session_id, count=2000):
                data = stored_event.event.data
                previous, phase = data.get("previousPhase"), data.get("phase")
                if previous in ("Succeeded", "Failed"):
                    assert phase in (previous, "Terminating"), f"{session_id}: {previous} -> {phase}"


@contextlib.asynccontextmanager
async def make_world(
    redis_url: str,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    *,
    faults: FaultSettings | None = None,
    **emulator: Any,
) -> AsyncIterator[World]:
    settings = EmulatorSettings(
        work_root=tmp_path / "machines",
        transition_delay=emulator.pop("transition_delay", 0.05),
        images=heartbeat_images(),
        faults=faults or FaultSettings(),
        stop_timeout=3.0,
        **emulator,
    )
    app = create_app(settings)
    state = emulator_state(app)
    port = free_port()
    server = QuietServer(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=1
        )
    )
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            await asyncio.sleep(0.01)
    fly_url = f"http://127.0.0.1:{port}"
    fly = FlyClient(FlyClientConfig(app_name=APP, api_token="test-fly-token-0123", base_url=fly_url))
    http = httpx.AsyncClient(base_url=fly_url)
    store = Store.from_url(redis_url)
    # The machines' heartbeat agents reach their sessions' state through the gateway's agent channel.
    gateway = start_gateway(redis_url=redis_url, upstream_url="http://127.0.0.1:9")
    world = World(redis_url, redis_client, store, state, fly_url, fly, http, gateway_url=gateway.url)
    try:
        yield world
    finally:
        gateway.stop()
        for running in world.controllers:
            if not running.task.done():
                running.stop.set()
        for running in world.controllers:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(running.task, 15)
            # The controller does not close a store it was given: its connections are ours to close.
            await running.controller.store.close()
        await fly.aclose()
        await http.aclose()
        await store.close()
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(serving, 10)
        await state.aclose()


async def renewals(redis_client: aioredis.Redis, count: int, timeout: float = 10.0) -> None:
    """Return once the leader lease's TTL has been pushed back up ``count`` times (renewals seen)."""
    seen, last = 0, await redis_client.pttl(keys.LEADER)
    async with asyncio.timeout(timeout):
        while seen < count:
            await asyncio.sleep(0.01)
            now = await redis_client.pttl(keys.LEADER)
            if now > last:
                seen += 1
            last = now
