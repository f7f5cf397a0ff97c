"""Benchmark of the controller: cost of a resync pass, time to Running under Fly's limits, reaction delay.

Three measurements, each against a real redis-server and the Fly Machines emulator:

(a) **Cost of one full resync pass** over N converged sessions (default 1 000 and 10 000): CPU
    time of the controller process, wall time, Fly calls, Redis round trips and Redis commands.
    The emulator runs in its own process (so its CPU is not counted), seeded with N started
    machines without processes; Redis holds N sessions whose status already matches the plan.
    The point: Fly calls and Redis round trips per pass must not grow per session (pages of 1000
    machines and pipelined batches grow with N / batch, never with N).
(b) **Time for 100 new sessions to reach Running** with Fly's rate limits on in the emulator,
    beside the lower bound those limits allow: create is 1 req/s with a burst of 3 per app, so the
    100th create cannot happen before (100 - 3) / 1 s = 97 s. The machines run
    ``local/heartbeat_agent.py`` (a real minimal agent that only heartbeats), so the figure measures
    the controller, not the Claude CLI. Run once per agent-app count (``--apps 1,2``): creates are
    limited per app, so N apps lower the bound to (100 - 3N) / N s; the split of the creates over
    the apps and the emulator's 429 count are printed beside it.
(c) **Delay from ``POST /sessions`` to the Fly create call**, p50 / p99, over 100 sessions posted
    20 ms apart to the real API app; Fly's rate limits and our client's token buckets are off for
    this one, so the figure is the controller's reaction time (change feed -> worker -> plan ->
    launch record -> create), not the wait for create tokens that (b) shows. The API and the
    emulator run as their own processes; the emulator stamps each create as it arrives.

Run: ``python bench/controller.py`` (about 3-4 minutes), or pick parts:
``python bench/controller.py --parts a --sizes 1000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from redis.asyncio.connection import ConnectionPool  # noqa: E402

from api.logs import configure_logging  # noqa: E402
from api.models import Phase, SessionSpec  # noqa: E402
from api.store import ApiStore  # noqa: E402
from api.store_agent import AgentStore  # noqa: E402
from api.store_controller import ControllerStore  # noqa: E402
from bench.channel import start_gateway  # noqa: E402
from controller.executor import SoleAuthority, observed_from_fly  # noqa: E402
from controller.fly import FlyClient, FlyClientConfig  # noqa: E402
from controller.machine_config import MachineConfigBuilder  # noqa: E402
from controller.main import Controller, build_reconciler  # noqa: E402
from controller.metrics import ControllerMetrics  # noqa: E402
from controller.observed import MANAGED_VALUE, TAG_MANAGED, TAG_SESSION, machine_tags  # noqa: E402
from controller.plan import plan  # noqa: E402
from controller.reconciler import Reconciler, ReconcilerOptions  # noqa: E402
from controller.settings import ControllerSettings  # noqa: E402
from local.redis_server import free_port, start_redis  # noqa: E402

APP = "flyswarm-bench"
TOKEN = "bench-fly-token-4242"
FLY_CREATE_RATE = 1.0
FLY_CREATE_BURST = 3


# -- shared plumbing -------------------------------------------------------------------------------


class CountingPool(ConnectionPool):
    """A connection pool that counts checkouts: one per command or pipeline, i.e. Redis round trips."""

    checkouts = 0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        CountingPool.checkouts += 1
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]


def counting_client(url: str) -> aioredis.Redis:
    pool = CountingPool.from_url(url, decode_responses=True, socket_timeout=10.0, max_connections=1000)
    return aioredis.Redis(connection_pool=pool)


async def commands_processed(client: aioredis.Redis) -> int:
    info = await client.info("stats")
    return int(info["total_commands_processed"])


def settings_for(redis_url: str, fly_url: str, **overrides: Any) -> ControllerSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "fly_api_token": TOKEN,
        "fly_app_name": APP,
        "fly_agent_image": "flyswarm-agent",
        "fly_api_hostname": fly_url,
        "controller_port": free_port(),
        "log_level": "error",
    }
    values.update(overrides)
    return ControllerSettings(**values)


@contextlib.contextmanager
def child_process(
    cmd: list[str], env: dict[str, str], log_path: Path, ready_url: str, ready_seconds: float
) -> Iterator[subprocess.Popen[bytes]]:
    """A server child process, yielded once ``ready_url`` answers 200; always stopped afterwards."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + ready_seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[1:3]} exited early; see {log_path}")
            try:
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def emulator_process(port: int, work: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """This file run as ``--serve-emulator``: an emulator in its own process, seeded if asked."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLYSWARM_LOG_LEVEL": "warning"}
    cmd = [sys.executable, __file__, "--serve-emulator", str(port), str(work), *extra]
    health = f"http://127.0.0.1:{port}/_admin/health"
    with child_process(cmd, env, work / f"emulator-{port}.log", health, 120) as proc:
        yield proc


def serve_emulator(port: int, work: Path, seed: int, rate_limits: bool, cheap: bool) -> None:
    """Entry of the emulator subprocess: seed ``seed`` started machines (no processes), then serve.

    ``/_bench/created`` answers ``{session id: unix time the create arrived}`` for (c).
    """
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from local.emulator import EmulatorSettings, create_app, emulator_state
    from local.emulator_faults import FaultSettings

    command = ["sleep", "600"] if cheap else [sys.executable, "-m", "local.heartbeat_agent"]
    settings = EmulatorSettings(
        work_root=work / f"machines-{port}",
        transition_delay=0.05,
        images={"flyswarm-agent": command},
        faults=FaultSettings(rate_limits=rate_limits),
    )
    app = create_app(settings)
    state = emulator_state(app)

    async def created(_request: Request) -> JSONResponse:
        found: dict[str, float] = {}
        for m in state.machines.values():
            sid = (m.config.get("metadata") or {}).get(TAG_SESSION)
            if sid:
                found.setdefault(sid, m.created_at)
        return JSONResponse(found)

    app.add_route("/_bench/created", created)
    for i in range(seed):
        sid = f"s{i:05d}"
        body = {
            "region": "fra",
            "skip_launch": True,
            "config": {"image": "flyswarm-agent", "metadata": machine_tags(sid, f"seed-{i}")},
        }
        machine, _nonce = state.create(APP, body, "bench")
        machine.state = "started"  # a converged fleet: started, as a list shows it
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)


# -- (a) one resync pass ---------------------------------------------------------------------------


async def seed_converged_sessions(
    client: aioredis.Redis, fly: FlyClient, settings: ControllerSettings, n: int
) -> None:
    """N chat sessions whose status already is what plan() would write, with fresh heartbeats.

    Written as each role would write it: the API creates, the agent heart-beats, the controller
    writes the status.
    """
    await _seed(ControllerStore(client), ApiStore(client), AgentStore(client), fly, settings, n)


async def _seed(
    store: ControllerStore,
    api: ApiStore,
    agent: AgentStore,
    fly: FlyClient,
    settings: ControllerSettings,
    n: int,
) -> None:
    machines = {
        m.metadata[TAG_SESSION]: m
        for m in await fly.list_all_machines(metadata={TAG_MANAGED: MANAGED_VALUE}, page_size=1000)
    }
    plan_settings = settings.plan_settings()
    spec = SessionSpec(prompt="bench", mode="chat", idleTimeoutSeconds=0)
    for start in range(0, n, 500):
        chunk = [f"s{i:05d}" for i in range(start, min(n, start + 500))]
        await asyncio.gather(*(api.create_or_get(api.new_session(sid, spec)) for sid in chunk))
        await asyncio.gather(*(agent.heartbeat(sid, machines[sid].id, 3600, "running") for sid in chunk))
    now = datetime.now(UTC)
    sessions = await store.all_sessions()
    heartbeats = await store.heartbeats([s.id for s in sessions])
    writes = []
    for session in sessions:
        observed = [observed_from_fly(machines[session.id])]
        for action in plan(session, observed, heartbeats.get(session.id), now, plan_settings):
            status = getattr(action, "status", None)
            if status is not None:
                writes.append(store.write_status(session.id, status))
    for start in range(0, len(writes), 500):
        await asyncio.gather(*writes[start : start + 500])


async def bench_pass(redis_url: str, work: Path, n: int) -> dict[str, Any]:
    port = free_port()
    with emulator_process(port, work, "--seed", str(n)):
        fly_url = f"http://127.0.0.1:{port}"
        settings = settings_for(redis_url, fly_url, resync_seconds=15.0, heartbeat_ttl_seconds=3600.0)
        metrics = ControllerMetrics()
        fly = FlyClient(
            FlyClientConfig(
                app_name=APP,
                api_token=TOKEN,
                base_url=fly_url,
                call_deadline=60.0,
                on_response=metrics.on_fly_response,
            )
        )
        client = counting_client(redis_url)
        store = ControllerStore(client)
        admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await admin.flushall()
            await seed_converged_sessions(client, fly, settings, n)
            reconciler = build_reconciler(
                store=store,
                fly=fly,
                settings=settings,
                authority=SoleAuthority(),
                config_builder=MachineConfigBuilder(settings),
                metrics=metrics,
                options=ReconcilerOptions(change_feed=False, wake_pubsub=False),
            )
            await one_pass(reconciler)  # warm-up: connection pools, list mode discovery
            fly_before = metrics.total("flyswarm_controller_fly_calls_total")
            actions_before = _applied(metrics)
            trips_before = CountingPool.checkouts
            commands_before = await commands_processed(admin)
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            stats = await one_pass(reconciler)
            cpu = time.process_time() - cpu_before
            wall = time.perf_counter() - wall_before
            commands = await commands_processed(admin) - commands_before - 1  # minus our INFO
            phases = {s.status.phase for s in await store.all_sessions()}
            return {
                "sessions": n,
                "machines": stats.observed,
                "cpu_s": cpu,
                "wall_s": wall,
                "fly_calls": metrics.total("flyswarm_controller_fly_calls_total") - fly_before,
                "fly_pages": stats.fly_pages,
                "redis_round_trips": CountingPool.checkouts - trips_before,
                "redis_commands": commands,
                "actions": _applied(metrics) - actions_before,
                "all_running": phases == {Phase.RUNNING},
            }
        finally:
            await fly.aclose()
            await store.close()
            await admin.aclose()


def _applied(metrics: ControllerMetrics) -> float:
    """Actions that did something (a RequeueAfter only schedules the next look)."""
    total = metrics.total("flyswarm_controller_actions_total")
    return total - metrics.total("flyswarm_controller_actions_total", action="requeue")


async def one_pass(reconciler: Reconciler) -> Any:
    """A resync plus the per-key reconcile of every session it queued (what one pass costs)."""
    stats = await reconciler.resync()
    if not stats.ok:
        raise RuntimeError(f"resync failed: {stats.error}")
    queue = reconciler.queue
    while len(queue):
        key = await queue.get()
        assert key is not None
        try:
            await reconciler.reconcile_key(key)
        finally:
            queue.done(key)
    return stats


# -- (b) 100 sessions to Running under Fly's rate limits --------------------------------------------


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.asynccontextmanager
async def running_controller(settings: ControllerSettings, **kwargs: Any) -> AsyncIterator[Controller]:
    controller = Controller(settings, serve_health=False, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    try:
        yield controller
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def bench_time_to_running(redis_url: str, work: Path, count: int, apps: int = 1) -> dict[str, Any]:
    port = free_port()
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await admin.flushall()
    app_names = [APP] + [f"{APP}-{i + 1}" for i in range(1, apps)]
    # The agents reach their sessions' state through the gateway's agent channel (no Redis on machines).
    gateway_port = free_port()
    gateway = start_gateway(redis_url, gateway_port)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_stop, gateway)
        cleanup.enter_context(emulator_process(port, work, "--rate-limits"))
        fly_url = f"http://127.0.0.1:{port}"
        settings = settings_for(
            redis_url,
            fly_url,
            fly_apps=",".join(app_names),
            agent_gateway_url=f"http://127.0.0.1:{gateway_port}",
        )
        store = ApiStore.from_url(redis_url)
        try:
            async with running_controller(settings) as controller:
                while not controller.elector.is_leader():
                    await asyncio.sleep(0.05)
                submitted: dict[str, float] = {}
                spec = SessionSpec(prompt="heartbeat only", mode="task")
                t0_wall = time.time()
                t0 = time.perf_counter()
                for i in range(count):
                    sid = f"run-{i:03d}"
                    submitted[sid] = time.perf_counter()
                    await store.create_or_get(store.new_session(sid, spec))
                running_at: dict[str, float] = {}
                while len(running_at) < count:
                    for session in await store.all_sessions():
                        if session.status.phase is Phase.RUNNING and session.id not in running_at:
                            running_at[session.id] = time.perf_counter()
                    if time.perf_counter() - t0 > 900:
                        raise RuntimeError(f"only {len(running_at)}/{count} running after 900 s")
                    await asyncio.sleep(0.1)
                total = max(running_at.values()) - t0
                stats = httpx.get(f"{fly_url}/_admin/stats", timeout=10).json()
                per_session = sorted(running_at[s] - submitted[s] for s in running_at)
                created = [r for r in stats["recent"] if r["op"] == "Machines_create" and r["status"] == 200]
                creates_at = [r["t"] for r in created]
                per_app = {app: sum(1 for r in created if r["scope"] == app) for app in app_names}
                return {
                    "count": count,
                    "apps": apps,
                    "per_app": per_app,
                    "seconds": total,
                    "lower_bound_s": (count - FLY_CREATE_BURST * apps) / (FLY_CREATE_RATE * apps),
                    "p50_s": statistics.median(per_session),
                    "rate_limited_429": stats["rate_limited"],
                    "last_create_s": max(creates_at) - t0_wall if creates_at else float("nan"),
                    "creates": controller.metrics.total(
                        "flyswarm_controller_fly_calls_total", action="create"
                    ),
                }
        finally:
            await store.close()
            await admin.aclose()


# -- (c) POST /sessions -> Fly create --------------------------------------------------------------


@contextlib.contextmanager
def api_process(port: int, redis_url: str, work: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The real API server (``python -m api.server``) on loopback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "HOST": "127.0.0.1"}
    env.update({"PORT": str(port), "LOG_LEVEL": "warning"})
    env.pop("API_TOKENS", None)
    cmd = [sys.executable, "-m", "api.server"]
    with child_process(cmd, env, work / "api.log", f"http://127.0.0.1:{port}/health", 60) as proc:
        yield proc


async def post_task_sessions(
    http: httpx.AsyncClient, ids: list[str], spacing: float, posted: dict[str, float]
) -> None:
    """POST one task session per id, ``spacing`` s apart, stamping each in ``posted`` (epoch s)."""
    for sid in ids:
        body = {"metadata": {"name": sid}, "spec": {"prompt": "p", "mode": "task"}}
        posted[sid] = time.time()
        response = await http.post("/sessions", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"POST /sessions: {response.status_code} {response.text}")
        await asyncio.sleep(spacing)


async def bench_reaction(redis_url: str, work: Path, count: int, spacing: float) -> dict[str, Any]:
    """POST /sessions to the API process; the emulator process says when each create arrived."""
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await admin.flushall()
    fly_port, api_port = free_port(), free_port()
    store = ApiStore.from_url(redis_url)
    posted: dict[str, float] = {}
    try:
        with emulator_process(fly_port, work, "--cheap-machines"), api_process(api_port, redis_url, work):
            fly_url = f"http://127.0.0.1:{fly_port}"
            settings = settings_for(redis_url, fly_url, resync_seconds=15.0)
            metrics = ControllerMetrics()
            fly = FlyClient(
                FlyClientConfig(
                    app_name=APP,
                    api_token=TOKEN,
                    base_url=fly_url,
                    rate_limits=False,
                    on_response=metrics.on_fly_response,
                )
            )
            try:
                async with running_controller(settings, fly=fly, metrics=metrics) as controller:
                    while not controller.elector.is_leader():
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)  # let the first resync pass go by
                    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as http:
                        await post_task_sessions(
                            http, [f"react-{i:03d}" for i in range(count)], spacing, posted
                        )
                        created: dict[str, float] = {}
                        deadline = time.monotonic() + 60
                        while len(created) < count and time.monotonic() < deadline:
                            created = httpx.get(f"{fly_url}/_bench/created", timeout=10).json()
                            await asyncio.sleep(0.1)
            finally:
                await fly.aclose()
        delays = sorted((created[s] - posted[s]) * 1000 for s in posted if s in created)
        return {
            "via": "POST /sessions to the API server (python -m api.server)",
            "count": len(delays),
            "p50_ms": statistics.median(delays),
            "p99_ms": delays[min(len(delays) - 1, int(round(0.99 * (len(delays) - 1))))],
            "max_ms": delays[-1],
        }
    finally:
        await store.close()
        await admin.aclose()


# -- main ----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    configure_logging("warning")
    work = Path(tempfile.mkdtemp(prefix="flyswarm-bench-controller-"))
    redis = start_redis(work / "redis")
    try:
        if "a" in args.parts:
            print("(a) one full resync pass over N converged sessions (controller process only)")
            print(
                f"{'sessions':>9}{'CPU s':>8}{'wall s':>8}{'Fly calls':>10}{'Redis trips':>12}"
                f"{'Redis cmds':>11}{'Fly/sess':>9}{'trips/sess':>11}{'actions':>8}"
            )
            for n in args.sizes:
                r = await bench_pass(redis.url, work, n)
                print(
                    f"{r['sessions']:>9}{r['cpu_s']:>8.2f}{r['wall_s']:>8.2f}{r['fly_calls']:>10.0f}"
                    f"{r['redis_round_trips']:>12}{r['redis_commands']:>11}"
                    f"{r['fly_calls'] / n:>9.4f}{r['redis_round_trips'] / n:>11.4f}{r['actions']:>8.0f}"
                    + ("" if r["all_running"] else "  (not all Running!)")
                )
            print(
                "    Fly calls are list pages of 1000 machines; Redis round trips are pipelined batches "
                "(500 sessions, 1000 heartbeats); neither is a call per session."
            )
        if "b" in args.parts:
            print(f"\n(b) {args.create} new sessions to Running, Fly rate limits ON in the emulator")
            print(
                "    machines run local/heartbeat_agent.py (heartbeats only): "
                "this measures the controller, not the CLI"
            )
            for apps in args.apps:
                r = await bench_time_to_running(redis.url, work, args.create, apps)
                best = (args.create - FLY_CREATE_BURST * apps) / (0.9 * FLY_CREATE_RATE * apps)
                print(
                    f"  {apps} agent app(s): all Running after {r['seconds']:.1f} s; lower bound from Fly's "
                    f"create limit (1/s, burst 3, per app): {r['lower_bound_s']:.0f} s; "
                    f"ratio {r['seconds'] / r['lower_bound_s']:.2f}"
                )
                print(
                    f"    last create answered at {r['last_create_s']:.1f} s (our client paces creates at "
                    f"90 % of Fly's rate: {best:.0f} s at best)"
                )
                print(
                    f"    p50 time to Running per session {r['p50_s']:.1f} s; creates {r['creates']:.0f} "
                    f"per app {r['per_app']}; 429s from the emulator {r['rate_limited_429']}"
                )
        if "c" in args.parts:
            print(
                f"\n(c) delay from POST /sessions to the Fly create call ({args.react} sessions, 20 ms apart)"
            )
            r = await bench_reaction(redis.url, work, args.react, 0.02)
            print(f"    via {r['via']}; rate limits off (measures reaction, not token waits)")
            print(
                f"    p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                f"max {r['max_ms']:.1f} ms over {r['count']}"
            )
    finally:
        redis.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-emulator":
        port, work = int(sys.argv[2]), Path(sys.argv[3])
        rest = sys.argv[4:]
        seed = int(rest[rest.index("--seed") + 1]) if "--seed" in rest else 0
        serve_emulator(port, work, seed, "--rate-limits" in rest, "--cheap-machines" in rest)
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="abc", help="which measurements: any of a, b, c")
    parser.add_argument("--sizes", default="1000,10000", help="session counts for (a)")
    parser.add_argument("--create", type=int, default=100, help="sessions for (b)")
    parser.add_argument("--react", type=int, default=100, help="sessions for (c)")
    parser.add_argument("--apps", default="1,2", help="agent-app counts for (b), one run each")
    args = parser.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.apps = [int(x) for x in args.apps.split(",") if x]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
