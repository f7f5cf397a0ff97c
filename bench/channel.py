"""Benchmark of the agent channel: what an agent's state costs over the control plane vs direct Redis.

Agents used to hold a per-session Redis user and write their state themselves; now they hold one
session token and go through the gateway's agent channel (``/agent/v1``). This measures, on one
machine over loopback, the latency the extra hop adds to what an agent does most:

* **heartbeat**: one write (``SET ... EX``) vs ``PUT /agent/v1/heartbeat``;
* **event**: one event appended (``XADD``) vs ``POST /agent/v1/events`` with one event;
* **inbox delivery**: from the moment a message is sent (the store call ``POST /sessions/{id}/messages``
  makes) to the waiting agent holding it: a blocking ``XREAD`` vs the channel's long-poll, which
  waits on the gateway's shared inbox reader (:mod:`gateway.inbox`).

Both sides run the same calls one after another from one client process; the gateway is a separate
process (``python -m gateway.server``), as in production. Printed: p50 / p95 of each, the added
p50, and the goal: added p50 <= 20 ms for a write (0.2 % of the 10 s heartbeat interval; events are
written off the SDK loop, batched) and <= 50 ms for a delivery (a message a person typed).

Run: ``python bench/channel.py`` (about half a minute), or ``--rounds 1000``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from agent.channel import AgentChannel  # noqa: E402
from api.models import InboxMessage, SessionEvent, SessionSpec  # noqa: E402
from api.store import ApiStore  # noqa: E402
from api.store_agent import AgentStore  # noqa: E402
from api.store_controller import ControllerStore  # noqa: E402
from local.redis_server import free_port, start_redis  # noqa: E402

GOAL_WRITE_MS = 20.0
GOAL_DELIVERY_MS = 50.0
Store = AgentStore | AgentChannel


async def timed(rounds: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    for i in range(min(20, rounds)):  # warm-up: connections, scripts, caches
        await call(i)
    samples = []
    for i in range(rounds):
        started = time.perf_counter()
        await call(i)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def delivery(api: ApiStore, agent: Store, sid: str, rounds: int) -> list[float]:
    """Send a message while the agent waits on its inbox; the time until the agent holds it."""
    samples = []
    for i in range(rounds + 5):
        waiting: asyncio.Future[InboxMessage | None] = asyncio.ensure_future(
            agent.inbox_next(sid, block_ms=5000)
        )
        await asyncio.sleep(0.02)  # the agent is waiting before the message is sent
        started = time.perf_counter()
        sent = await api.send_message(sid, f"message {i}")
        got = await waiting
        elapsed = (time.perf_counter() - started) * 1000
        assert got is not None and got.id == sent.id, (got, sent)
        await agent.inbox_ack(sid, sent.id)
        if i >= 5:
            samples.append(elapsed)
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_side(api: ApiStore, store: Store, sid: str, rounds: int) -> dict[str, list[float]]:
    event = SessionEvent(type="bench", source="agent", message="x" * 200)

    async def beat(_i: int) -> None:
        await store.heartbeat(sid, "m-1", 30, "idle")

    async def append(_i: int) -> None:
        await store.append_event(sid, event)

    return {
        "heartbeat": await timed(rounds, beat),
        "event": await timed(rounds, append),
        "inbox delivery": await delivery(api, store, sid, max(20, rounds // 10)),
    }


async def measure(redis_url: str, gateway_url: str, rounds: int) -> dict[str, dict[str, list[float]]]:
    api = ApiStore.from_url(redis_url)
    controller = ControllerStore.from_url(redis_url)
    direct = AgentStore.from_url(redis_url)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for sid in ("bench-direct", "bench-channel"):
            await api.create_or_get(api.new_session(sid, SessionSpec(mode="chat")))
        token = await controller.mint_session_token("bench-channel")
        channel = AgentChannel(gateway_url, token.value, "bench-channel")
        try:
            sides: dict[str, tuple[Store, str]] = {
                "direct Redis": (direct, "bench-direct"),
                "agent channel": (channel, "bench-channel"),
            }
            for name, (store, sid) in sides.items():
                results[name] = await measure_side(api, store, sid, rounds)
        finally:
            await channel.close()
    finally:
        for s in (api, controller, direct):
            await s.close()
    return results


def start_gateway(redis_url: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "FLYSWARM_GATEWAY_PORT": str(port),
        "FLYSWARM_GATEWAY_UPSTREAM_URL": "http://127.0.0.1:9",
        "ANTHROPIC_API_KEY": "sk-ant-bench-unused",
        "LOG_LEVEL": "warning",
    }
    process = subprocess.Popen([sys.executable, "-m", "gateway.server"], env=env, cwd=ROOT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the gateway did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=500, help="writes per operation and side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-channel-") as tmp:
        redis = start_redis(Path(tmp))
        port = free_port()
        gateway = start_gateway(redis.url, port)
        try:
            results = asyncio.run(measure(redis.url, f"http://127.0.0.1:{port}", args.rounds))
        finally:
            gateway.terminate()
            gateway.wait(10)
            redis.stop()
    print(
        f"\nagent state: direct Redis vs the agent channel (gateway process, loopback), {args.rounds} writes"
    )
    columns = ("direct p50/p95 ms", "channel p50/p95 ms", "added p50 ms", "goal")
    header = f"{'operation':<16}{columns[0]:>20}{columns[1]:>21}{columns[2]:>14}{columns[3]:>14}"
    print(header)
    print("-" * len(header))
    for op in ("heartbeat", "event", "inbox delivery"):
        d, c = results["direct Redis"][op], results["agent channel"][op]
        added = statistics.median(c) - statistics.median(d)
        goal = GOAL_DELIVERY_MS if op == "inbox delivery" else GOAL_WRITE_MS
        verdict = "ok" if added <= goal else "MISSED"
        print(
            f"{op:<16}{statistics.median(d):>10.2f} / {pct(d, 0.95):<7.2f}"
            f"{statistics.median(c):>11.2f} / {pct(c, 0.95):<7.2f}"
            f"{added:>12.2f}{f'<= {goal:g} ' + verdict:>14}"
        )


if __name__ == "__main__":
    main()
