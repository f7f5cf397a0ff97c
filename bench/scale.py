"""Scale benchmark of sharded controllers: one resync pass per replica at N sessions, and POST -> plan.

Against a real redis-server and the Fly Machines emulator in its own process (so neither one's CPU
is counted), seeded with N converged sessions: Redis holds N chat sessions whose status already is
what the plan would write (``bench/controller.py``'s ``seed_converged_sessions``), and the
emulator lists N started machines that have no processes (seeded by cloning one machine created
with ``skip_launch``: the emulator's own create is O(machines), too slow for 100 000).

(a) **One resync pass per replica**, with 1, 2 and 4 replicas sharing ``FLYSWARM_SHARDS`` = 16
    shards (replica ``r`` of ``n`` holds the shards ``s`` with ``s % n == r``, what the fair share
    gives): the CPU time of the pass (resync + the per-key reconcile of every session it queued),
    its Redis round trips and its Fly calls, for every replica (the table shows the largest).
    Each replica lists the whole app (Fly cannot list one shard) and reads from Redis only the
    index plus its own shards' sessions.
    **Baseline**: a bare reader that fetches the same data with no models and no plan - the same
    list pages as raw JSON, and one pipelined scan of Redis (index, then session hash, heartbeat,
    launch record, inbox ack and last inbox entry of every session, 1000 sessions per pipeline).
    A replica's share of it is ``baseline / n``; the goal is a pass <= 2x that share.
    Fly rate limits are off in the client for (a): the figure is CPU, not token waits; what the
    shared list budget means for the resync period is printed beside it.
(b) **POST -> plan**: sessions posted to the real API process (``python -m api.server``) while one
    controller replica reconciles the N sessions (resync every 15 s, the default); the delay until
    the create call that the plan asked for reaches the emulator, p50 / p99. The posts start once
    the replica's first whole read is done and its queue has drained, and span more than one
    resync, so the figure includes sessions posted while a resync runs.

Run: ``python bench/scale.py`` (100 000 sessions; seeding takes a few minutes) or
``python bench/scale.py --sessions 20000 --replicas 1,2,4 --posts 100``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from api import keys  # noqa: E402
from api.logs import configure_logging  # noqa: E402
from api.store_controller import ControllerStore  # noqa: E402
from bench.controller import (  # noqa: E402
    APP,
    TOKEN,
    CountingPool,
    api_process,
    child_process,
    counting_client,
    one_pass,
    post_task_sessions,
    seed_converged_sessions,
    settings_for,
)
from controller.fly import FlyClient, FlyClientConfig  # noqa: E402
from controller.machine_config import MachineConfigBuilder  # noqa: E402
from controller.main import Controller, build_reconciler  # noqa: E402
from controller.metrics import ControllerMetrics  # noqa: E402
from controller.observed import MANAGED_VALUE, TAG_MANAGED, TAG_SESSION, machine_tags  # noqa: E402
from controller.reconciler import ReconcilerOptions  # noqa: E402
from controller.shards import shard_of  # noqa: E402
from local.redis_server import free_port, start_redis  # noqa: E402

SHARDS = 16
GOAL_RATIO = 2.0
#: Posts for (b) this far apart: 200 of them span more than one 15 s resync.
SPACING = 0.1
#: Fly's list budget per app (1 req/s, our client runs at 90 %), shared by every replica.
LIST_RATE = 0.9


class FixedShards:
    """The authority of replica ``index`` of ``replicas``: the shards a fair share gives it, no lease
    (the bench measures the pass, not the election); replica 0 also does the app-wide duties."""

    def __init__(self, index: int, replicas: int) -> None:
        self.held = frozenset(s for s in range(SHARDS) if s % replicas == index)
        self.app_wide = index == 0

    def is_leader(self) -> bool:
        return True

    def is_leader_for(self, session_id: str | None) -> bool:
        if session_id is None:
            return self.app_wide
        return shard_of(session_id, SHARDS) in self.held

    def remaining_for(self, session_id: str | None) -> float:
        return float("inf")

    def fence_for(self, session_id: str | None) -> tuple[str, int] | None:
        return None


# -- the emulator process --------------------------------------------------------------------------


def serve_emulator(port: int, work: Path, seed: int) -> None:
    """Entry of the emulator subprocess: ``seed`` started machines without processes, then serve.

    ``/_bench/created`` answers ``{session id: unix time its create arrived}`` for (b).
    """
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from local.emulator import EmulatorSettings, create_app, emulator_state
    from local.emulator_faults import FaultSettings

    settings = EmulatorSettings(
        work_root=work / f"machines-{port}",
        transition_delay=0.05,
        images={"flyswarm-agent": ["sleep", "600"]},
        faults=FaultSettings(rate_limits=False),
    )
    app = create_app(settings)
    state = emulator_state(app)
    arrived: dict[str, float] = {}

    async def created(_request: Request) -> JSONResponse:
        return JSONResponse(arrived)

    app.add_route("/_bench/created", created)
    template, _ = state.create(
        APP,
        {
            "region": "fra",
            "skip_launch": True,
            "name": "seed-template",
            "config": {"image": "flyswarm-agent", "metadata": machine_tags("s00000", "seed-0")},
        },
        "bench",
    )
    template.state = "started"
    for i in range(1, seed):
        sid = f"s{i:05d}"
        config = {**template.config, "metadata": machine_tags(sid, f"seed-{i}")}
        clone = dataclasses.replace(
            template,
            id=secrets.token_hex(7),
            name=f"seed-{i}",
            config=config,
            events=deque(template.events),
            versions=[(template.version, config)],
            changed=asyncio.Event(),
        )
        state.machines[clone.id] = clone
    # The arrival of each create, stamped before the emulator's own (O(machines)) create runs.
    original_create = state.create

    def create_stamped(app_name: str, body: Any, owner: str) -> Any:
        meta = ((body or {}).get("config") or {}).get("metadata") or {}
        if TAG_SESSION in meta:
            arrived.setdefault(meta[TAG_SESSION], time.time())
        return original_create(app_name, body, owner)

    state.create = create_stamped  # type: ignore[method-assign]
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)


@contextlib.contextmanager
def emulator_process(port: int, work: Path, seed: int) -> Iterator[None]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLYSWARM_LOG_LEVEL": "warning"}
    cmd = [sys.executable, __file__, "--serve-emulator", str(port), str(work), str(seed)]
    with child_process(
        cmd, env, work / f"emulator-{port}.log", f"http://127.0.0.1:{port}/_admin/health", 600
    ):
        yield


def fly_client(fly_url: str, metrics: ControllerMetrics | None = None) -> FlyClient:
    return FlyClient(
        FlyClientConfig(
            app_name=APP,
            api_token=TOKEN,
            base_url=fly_url,
            call_deadline=120.0,
            request_timeout=120.0,
            rate_limits=False,
            on_response=metrics.on_fly_response if metrics is not None else None,
        )
    )


# -- (a) one pass per replica, and the bare baseline -------------------------------------------------


async def replica_pass(redis_url: str, fly_url: str, index: int, replicas: int) -> dict[str, float]:
    settings = settings_for(
        redis_url, fly_url, resync_seconds=60.0, heartbeat_ttl_seconds=3600.0, pass_timeout_seconds=600.0
    )
    metrics = ControllerMetrics()
    fly = fly_client(fly_url, metrics)
    store = ControllerStore(counting_client(redis_url))
    try:
        reconciler = build_reconciler(
            store=store,
            fly=fly,
            settings=settings,
            authority=FixedShards(index, replicas),
            config_builder=MachineConfigBuilder(settings),
            metrics=metrics,
            options=ReconcilerOptions(change_feed=False, wake_pubsub=False),
        )
        await one_pass(reconciler)  # warm-up: pools, list mode, the Redis server check
        fly_before = metrics.total("flyswarm_controller_fly_calls_total")
        actions_before = metrics.total("flyswarm_controller_actions_total")
        trips_before = CountingPool.checkouts
        cpu, wall = time.process_time(), time.perf_counter()
        stats = await one_pass(reconciler)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        actions = metrics.total("flyswarm_controller_actions_total") - actions_before
        applied = actions - (metrics.total("flyswarm_controller_actions_total", action="requeue"))
        return {
            "cpu_s": cpu,
            "wall_s": wall,
            "sessions": stats.desired,
            "fly_calls": metrics.total("flyswarm_controller_fly_calls_total") - fly_before,
            "redis_trips": CountingPool.checkouts - trips_before,
            "applied": max(0.0, applied),
        }
    finally:
        await fly.aclose()
        await store.close()


async def bare_read(redis_url: str, fly_url: str) -> dict[str, float]:
    """The same data, no models, no plan: raw list pages, then one pipelined scan of Redis."""
    client = counting_client(redis_url)
    async with httpx.AsyncClient(base_url=fly_url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for warm in (True, False):
            trips_before = CountingPool.checkouts
            cpu, wall = time.process_time(), time.perf_counter()
            pages, cursor, machines = 0, None, 0
            while True:
                params: dict[str, Any] = {f"metadata.{TAG_MANAGED}": MANAGED_VALUE, "summary": "true"}
                params["limit"] = 1000
                if cursor:
                    params["cursor"] = cursor
                response = await http.get(f"/v1/apps/{APP}/machines", params=params, timeout=120)
                machines += len(response.json())
                pages += 1
                cursor = response.headers.get("fly-next-cursor")
                if not cursor:
                    break
            ids = await client.zrange(keys.INDEX, 0, -1)
            rows = 0
            for start in range(0, len(ids), 1000):
                async with client.pipeline(transaction=False) as pipe:
                    for sid in ids[start : start + 1000]:
                        pipe.hgetall(keys.session(sid))
                        pipe.get(keys.heartbeat(sid))
                        pipe.hgetall(keys.launch(sid))
                        pipe.get(keys.inbox_acked(sid))
                        pipe.xrevrange(keys.inbox(sid), count=1)
                    rows += len(await pipe.execute())
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if not warm:
                await client.aclose()
                return {
                    "cpu_s": cpu,
                    "wall_s": wall,
                    "fly_calls": pages,
                    "redis_trips": CountingPool.checkouts - trips_before,
                    "machines": machines,
                    "rows": rows,
                }
    raise AssertionError("unreachable")


# -- (b) POST -> plan --------------------------------------------------------------------------------


async def post_to_plan(
    redis_url: str, fly_url: str, work: Path, posts: int, spacing: float
) -> dict[str, Any]:
    settings = settings_for(
        redis_url, fly_url, heartbeat_ttl_seconds=3600.0, shards=SHARDS, pass_timeout_seconds=600.0
    )
    metrics = ControllerMetrics()
    fly = fly_client(fly_url, metrics)
    controller = Controller(settings, fly=fly, metrics=metrics, serve_health=False)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    api_port = free_port()
    posted: dict[str, float] = {}
    created: dict[str, float] = {}
    try:
        with api_process(api_port, redis_url, work):
            async with asyncio.timeout(600):
                # Steady state: a read covers every shard and its queue has drained once.
                while controller.reconciler is None or not controller.reconciler.covers_its_shards:
                    await asyncio.sleep(0.1)
                while len(controller.reconciler.queue):
                    await asyncio.sleep(0.1)
            assert controller.reconciler.last_pass is not None
            passes = [controller.reconciler.last_pass.seconds]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=60) as http:
                await post_task_sessions(http, [f"react-{i:04d}" for i in range(posts)], spacing, posted)
                deadline = time.monotonic() + 120
                while len(created) < posts and time.monotonic() < deadline:
                    found = (await http.get(f"{fly_url}/_bench/created")).json()
                    created = {k: v for k, v in found.items() if k in posted}
                    await asyncio.sleep(0.2)
            last = controller.reconciler.last_pass
            if last is not None:
                passes.append(last.seconds)
    finally:
        stop.set()
        await asyncio.wait_for(task, 120)
        await fly.aclose()
    delays = sorted((created[s] - posted[s]) * 1000 for s in posted if s in created)
    return {
        "count": len(delays),
        "of": posts,
        "p50_ms": statistics.median(delays) if delays else float("nan"),
        "p99_ms": delays[min(len(delays) - 1, int(round(0.99 * (len(delays) - 1))))]
        if delays
        else float("nan"),
        "max_ms": delays[-1] if delays else float("nan"),
        "resync_s": max(passes),
    }


# -- main ----------------------------------------------------------------------------------------


async def bench_passes(redis_url: str, fly_url: str, n: int, replica_counts: list[int]) -> None:
    base = await bare_read(redis_url, fly_url)
    pages = base["fly_calls"]
    print(
        f"\n(a) one resync pass per replica, {n} sessions, {SHARDS} shards "
        f"(CPU of the controller process; Fly list pages of 1000)"
    )
    print(
        f"    baseline (bare read of the same data: raw list pages + one pipelined Redis scan): "
        f"CPU {base['cpu_s']:.2f} s, wall {base['wall_s']:.2f} s, Fly calls {base['fly_calls']:.0f}, "
        f"Redis round trips {base['redis_trips']:.0f}"
    )
    print(
        f"{'replicas':>9}{'sessions':>9}{'CPU s':>8}{'wall s':>8}{'Fly calls':>10}{'Redis trips':>12}"
        f"{'share s':>9}{'ratio':>7}{'goal':>6}{'list period s':>15}"
    )
    for replicas in replica_counts:
        rows = [await replica_pass(redis_url, fly_url, r, replicas) for r in range(replicas)]
        worst = max(rows, key=lambda row: row["cpu_s"])
        share = base["cpu_s"] / replicas
        print(
            f"{replicas:>9}{worst['sessions']:>9.0f}{worst['cpu_s']:>8.2f}{worst['wall_s']:>8.2f}"
            f"{worst['fly_calls']:>10.0f}{worst['redis_trips']:>12.0f}{share:>9.2f}"
            f"{worst['cpu_s'] / share:>7.2f}{GOAL_RATIO:>6.1f}{pages * replicas / LIST_RATE:>15.0f}"
            + ("" if all(r["applied"] == 0 for r in rows) else "  (some replica acted!)")
        )
    print(
        "    per replica, the largest of its replicas; share = baseline CPU / replicas; "
        "ratio = CPU / share (goal <= 2.0);\n"
        "    list period = the shortest resync period Fly's per-app list budget (0.9 req/s, "
        "shared) allows when every replica lists every page"
    )


async def run(args: argparse.Namespace) -> None:
    configure_logging(os.environ.get("LOG_LEVEL", "error"))
    work = Path(tempfile.mkdtemp(prefix="flyswarm-bench-scale-"))
    redis = start_redis(work / "redis")
    port = free_port()
    n = args.sessions
    try:
        t0 = time.perf_counter()
        with emulator_process(port, work, n):
            fly_url = f"http://127.0.0.1:{port}"
            admin = counting_client(redis.url)
            seeder = fly_client(fly_url)
            try:
                await seed_converged_sessions(admin, seeder, settings_for(redis.url, fly_url), n)
            finally:
                await seeder.aclose()
                await admin.aclose()
            print(f"{n} converged sessions and machines seeded in {time.perf_counter() - t0:.0f} s")
            if "a" in args.parts:
                await bench_passes(redis.url, fly_url, n, args.replicas)
            if "b" in args.parts and args.posts:
                r = await post_to_plan(redis.url, fly_url, work, args.posts, SPACING)
                print(
                    f"\n(b) POST /sessions -> the plan's create at Fly, one replica reconciling {n} sessions "
                    f"(resync 15 s; a pass took up to {r['resync_s']:.1f} s)"
                )
                print(
                    f"    p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, max {r['max_ms']:.0f} ms "
                    f"over {r['count']}/{r['of']} posted {SPACING * 1000:.0f} ms apart, across resyncs "
                    "(goal: p99 well under one resync, 15 s)"
                )
    finally:
        redis.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-emulator":
        serve_emulator(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=100_000, help="converged sessions (at most 100000)")
    parser.add_argument("--parts", default="ab", help="which measurements: any of a, b")
    parser.add_argument("--replicas", default="1,2,4", help="replica counts for (a)")
    parser.add_argument("--posts", type=int, default=200, help="sessions posted for (b); 0 skips (b)")
    args = parser.parse_args()
    args.replicas = [int(x) for x in args.replicas.split(",") if x]
    if not 1 <= args.sessions <= 100_000:
        parser.error("--sessions: 1 to 100000 (ids are s00000..s99999)")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
