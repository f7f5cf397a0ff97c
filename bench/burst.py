"""Burst benchmark of warm pools (issue #13): N task sessions at once, with and without a pool.

Three scenarios, each against its own Fly Machines emulator process with **Fly's rate limits on**
(create 1/s burst 3 per app; start, stop, suspend 1/s burst 3 per machine) and Fly-like transition
times (``--delays``, the emulator's ``FLYSWARM_EMULATOR_TRANSITION_DELAYS``: a suspended machine's
resume and a stopped machine's start both pass through ``starting``), a real redis-server, the real
gateway (``python -m cli gateway``) and the controller in this process:

(a) **no pool**: every session creates its machine; the create limit bounds the last Running at
    (N - 3) / 1 s, printed beside it;
(b) **suspended pool of N**: the pool is filled first (rate limits off while filling: the fill is
    not what is measured), then N sessions claim its machines: resumes, not creates;
(c) **stopped pool of N**: the same with stopped machines (a start: the agent process boots again).

For each: time from the first POST until 50 / 90 / 100 % of the sessions are Running, and for (b)
and (c) POST -> ``Claimed`` event p50 / p90. Goals from the issue are printed beside the figures.
Sessions are written through the API's store (``ApiStore.create_or_get``, what ``POST /sessions``
does) in one tight loop. The machines run ``local/heartbeat_agent.py`` - a real minimal agent that
boots, waits in the pool, heartbeats and reports, and never starts the Claude CLI - so the figures
measure the control plane, not the CLI.

Run: ``python bench/burst.py`` (N = 300: about 10 minutes, 300 agent processes at once), or
``python bench/burst.py --count 100 --parts bc``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from api.logs import configure_logging  # noqa: E402
from api.models import Phase, SessionSpec  # noqa: E402
from api.store import ApiStore  # noqa: E402
from api.store_controller import ControllerStore  # noqa: E402
from bench.controller import FLY_CREATE_BURST, FLY_CREATE_RATE, child_process, settings_for  # noqa: E402
from controller.main import Controller, fly_client_for  # noqa: E402
from controller.metrics import ControllerMetrics  # noqa: E402
from local.redis_server import free_port, start_redis  # noqa: E402
from tests.controller.pools import put_pool  # noqa: E402

#: Fly-like transition times (s): a resume restores a snapshot in a few hundred ms; stop and suspend
#: take a moment; a create goes through ``created`` before it starts.
DEFAULT_DELAYS = {"starting": 0.4, "suspending": 0.3, "stopping": 0.3, "destroying": 0.2}
GOALS = {
    "a": "bound: (N-3)/1 s",
    "b": "p90 <= 1 s, 100 % <= 10 s, POST->Claimed p50 <= 50 ms",
    "c": "100 % <= 30 s",
}


@contextlib.contextmanager
def emulator_process(port: int, work: Path, delays: dict[str, float]) -> Iterator[Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLYSWARM_LOG_LEVEL": "warning"}
    cmd = [sys.executable, __file__, "--serve-emulator", str(port), str(work), json.dumps(delays)]
    with child_process(
        cmd, env, work / f"emulator-{port}.log", f"http://127.0.0.1:{port}/_admin/health", 120
    ) as p:
        yield p


def serve_emulator(port: int, work: Path, delays: dict[str, float]) -> None:
    import uvicorn

    from local.emulator import EmulatorSettings, create_app

    settings = EmulatorSettings(
        work_root=work / f"machines-{port}",
        transition_delay=0.2,
        transition_delays=delays,
        images={"flyswarm-agent": [sys.executable, "-m", "local.heartbeat_agent"]},
    )
    uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="warning")


@contextlib.contextmanager
def gateway_process(redis_url: str, work: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis_url,
        "FLYSWARM_GATEWAY_HOST": "127.0.0.1",
        "FLYSWARM_GATEWAY_PORT": str(port),
        "ANTHROPIC_API_KEY": "bench-unused-key",
        "FLYSWARM_GATEWAY_UPSTREAM_URL": "http://127.0.0.1:9",
        "LOG_LEVEL": "warning",
    }
    url = f"http://127.0.0.1:{port}"
    with child_process(
        [sys.executable, "-m", "cli", "gateway"], env, work / "gateway.log", f"{url}/readyz", 60
    ):
        yield url


async def _faults(fly_url: str, **knobs: Any) -> None:
    async with httpx.AsyncClient(base_url=fly_url) as http:
        (await http.patch("/_admin/faults", json=knobs)).raise_for_status()


async def _controller(settings: Any, *, paced: bool) -> tuple[Controller, asyncio.Event, asyncio.Task[None]]:
    metrics = ControllerMetrics()
    fly = None if paced else fly_client_for(settings, metrics, rate_limits=False)
    controller = Controller(settings, metrics=metrics, fly=fly, serve_health=False)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    # Ready to act: leading, and a snapshot read after it took its shards (else keys wait for one).
    while (
        not controller.elector.is_leader()
        or controller.reconciler is None
        or not controller.reconciler.covers_its_shards
    ):
        await asyncio.sleep(0.05)
    return controller, stop, task


async def _stop(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, 60)


async def fill_pool(settings: Any, store: ControllerStore, n: int, mode: str) -> float:
    """Fill a pool of ``n`` (creates unpaced, the emulator's limits off); the seconds it took."""
    admin = aioredis.Redis.from_url(str(settings.redis_url.get_secret_value()), decode_responses=True)
    try:
        await put_pool(admin, "burst", size=n, mode=mode)
    finally:
        await admin.aclose()
    started = time.perf_counter()
    _controller_, stop, task = await _controller(settings, paced=False)
    try:
        while len((await store.pool_state("burst")).ready) < n:
            if time.perf_counter() - started > 900:
                raise RuntimeError("the pool did not fill within 900 s")
            await asyncio.sleep(0.5)
    finally:
        await _stop(stop, task)
    return time.perf_counter() - started


async def scenario(kind: str, redis_url: str, work: Path, n: int, delays: dict[str, float]) -> dict[str, Any]:
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await admin.flushall()
    await admin.aclose()
    port = free_port()
    with emulator_process(port, work, delays), gateway_process(redis_url, work) as gateway_url:
        fly_url = f"http://127.0.0.1:{port}"
        # Boot grace: a loaded two-core box boots a hundred Python agents at once slowly; the bench
        # measures the control plane, so a slow boot must not turn into restarts.
        settings = settings_for(
            redis_url, fly_url, agent_gateway_url=gateway_url, concurrency=64, boot_grace_seconds=120.0
        )
        api = ApiStore.from_url(redis_url)
        store = ControllerStore.from_url(redis_url)
        try:
            fill = 0.0
            if kind in ("b", "c"):
                await _faults(fly_url, rate_limits=False)
                fill = await fill_pool(settings, store, n, "suspended" if kind == "b" else "stopped")
            await _faults(fly_url, rate_limits=True)
            controller, stop, task = await _controller(settings, paced=True)
            try:
                if kind != "a":
                    while not controller.reconciler or not controller.reconciler.pools:
                        await asyncio.sleep(0.05)
                    while not controller.reconciler.pools.claimer.pools:
                        await asyncio.sleep(0.05)
                return await burst(api, store, controller, n) | {"fill_s": fill}
            finally:
                await _stop(stop, task)
        finally:
            await api.close()
            await store.close()


async def burst(api: ApiStore, store: ControllerStore, controller: Controller, n: int) -> dict[str, Any]:
    spec = SessionSpec(prompt="heartbeat only", mode="task")
    posted: dict[str, float] = {}
    t0 = time.perf_counter()
    wall0 = time.time()
    for i in range(n):
        sid = f"b{i:04d}"
        posted[sid] = time.time()
        await api.create_or_get(api.new_session(sid, spec))
    running: dict[str, float] = {}
    failed: set[str] = set()
    while len(running) + len(failed) < n and time.perf_counter() - t0 < 900:
        for session in await api.all_sessions():
            if session.status.phase is Phase.RUNNING and session.id not in running:
                running[session.id] = time.perf_counter() - t0
            elif session.status.phase.finished and session.id not in running:
                failed.add(session.id)
        await asyncio.sleep(0.05)
    # Percentiles of all N: a session that never ran counts as never (inf).
    times = sorted(running.values()) + [float("inf")] * (n - len(running))
    claimed: list[float] = []
    for sid, at in posted.items():
        for stored in await api.read_events(sid, count=50):
            if stored.event.reason == "Claimed":
                claimed.append(stored.event.time.timestamp() - at)
                break
    metrics = controller.metrics
    return {
        "n": n,
        "p50_s": times[max(0, (n + 1) // 2 - 1)],
        "p90_s": times[max(0, -(-n * 9 // 10) - 1)],
        "p100_s": times[-1],
        "failed": len(failed),
        "claimed": len(claimed),
        "claim_p50_ms": statistics.median(claimed) * 1000 if claimed else float("nan"),
        "claim_p90_ms": sorted(claimed)[max(0, int(len(claimed) * 0.9) - 1)] * 1000
        if claimed
        else float("nan"),
        # Sessions' creates only (a pool's refill after the burst is not the burst's).
        "creates": metrics.total("flyswarm_controller_fly_calls_total", action="create")
        - metrics.total("flyswarm_controller_pool_refill_creates_total"),
        "since_first_post_wall": time.time() - wall0,
    }


def _line(label: str, r: dict[str, Any], goal: str) -> str:
    claim = f"{r['claim_p50_ms']:>8.1f}{r['claim_p90_ms']:>8.1f}" if r["claimed"] else f"{'-':>8}{'-':>8}"
    return (
        f"{label:<22}{r['p50_s']:>8.2f}{r['p90_s']:>8.2f}{r['p100_s']:>8.2f}{claim}"
        f"{r['claimed']:>8}{r['creates']:>8.0f}{r['failed']:>8}   {goal}"
    )


async def run(args: argparse.Namespace) -> None:
    configure_logging(args.log_level)
    work = Path(tempfile.mkdtemp(prefix="flyswarm-bench-burst-"))
    redis = start_redis(work / "redis")
    n = args.count
    try:
        results: dict[str, dict[str, Any]] = {}
        bound = (n - FLY_CREATE_BURST) / FLY_CREATE_RATE
        labels = {"a": "(a) no pool", "b": "(b) suspended pool", "c": "(c) stopped pool"}
        for kind in args.parts:
            results[kind] = await scenario(kind, redis.url, work, n, args.delays)
            print(f"  done: {_line(labels[kind], results[kind], '')}", flush=True)
        print(f"\nN = {n} task sessions written at once; Fly rate limits on; transition times {args.delays}")
        print("machines run local/heartbeat_agent.py (boots, waits in the pool, heartbeats; no Claude CLI)")
        print(
            f"{'scenario':<22}{'50 %':>8}{'90 %':>8}{'100 %':>8}{'cl p50':>8}{'cl p90':>8}{'claims':>8}"
            f"{'creates':>8}{'failed':>8}   goal"
        )
        print(f"{'':<22}{'s':>8}{'s':>8}{'s':>8}{'ms':>8}{'ms':>8}")
        for kind, r in results.items():
            goal = GOALS[kind].replace("(N-3)/1 s", f"{bound:.0f} s")
            print(_line(labels[kind], r, goal))
        if "a" in results and "b" in results:
            print(
                f"(b) vs the create bound: {bound / max(results['b']['p100_s'], 1e-9):.0f}x faster "
                "(goal >= 30x)"
            )
        for kind in ("b", "c"):
            if kind in results:
                fill = results[kind]["fill_s"]
                print(f"{labels[kind]} filled in {fill:.0f} s (creates unpaced: not measured)")
    finally:
        redis.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-emulator":
        serve_emulator(int(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="error", help="the controller's log level (info shows claims)")
    parser.add_argument("--count", type=int, default=300, help="sessions per burst (and pool size)")
    parser.add_argument("--parts", default="abc", help="which scenarios: any of a, b, c")
    parser.add_argument(
        "--delays", type=json.loads, default=DEFAULT_DELAYS, help="emulator transition times (JSON)"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
