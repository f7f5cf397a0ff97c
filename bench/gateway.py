"""Benchmark: streamed Messages API responses through the model gateway vs straight to the model.

The scripted model and the gateway each run as their own process (``flyswarm model`` requiring
the upstream key, ``flyswarm gateway`` forwarding to it with that key) over a real Redis; this
process is the client. It sends the same streamed request (a text reply of ~40 SSE events)
``--requests`` times at ``--concurrency`` in flight, straight to the model (the baseline) and
through the gateway with a session token (auth, budget admission, metering and the usage write
included), alternating the two for ``--rounds`` rounds so that a neighbour's load hits both
alike; samples are pooled per path. A last row sends 50 requests one at a time each way: the
latency the gateway adds when nothing queues behind it. It prints, in one table: time to first
byte and total time (p50, p95), throughput, the added p50 latency and the throughput ratio
against their goals (added p50 <= 5 ms, throughput >= 0.8x direct), and the CPU time per request
of the gateway and of the model.

    .venv/bin/python bench/gateway.py [--requests 200] [--concurrency 20] [--rounds 3]

On a shared 2-core machine the client, the model and the gateway compete for the same cores, so
the gateway's CPU per request is the figure that least depends on the neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.models import SessionSpec  # noqa: E402
from api.store import ApiStore  # noqa: E402
from api.store_controller import ControllerStore  # noqa: E402
from local.redis_server import free_port, start_redis  # noqa: E402

UPSTREAM_KEY = "sk-ant-bench-upstream"
GOAL_ADDED_P50_MS = 5.0
GOAL_THROUGHPUT_RATIO = 0.8
TEXT = "the quick brown fox jumps over the lazy dog " * 8
BODY = {
    "model": "claude-bench-1",
    "max_tokens": 1024,
    "stream": True,
    "messages": [{"role": "user", "content": f'[[scenario:text {{"text": "{TEXT}"}}]]'}],
    "tools": [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}],
}


@dataclass(frozen=True)
class Run:
    ttfb: list[float]
    total: list[float]
    wall: float

    def p(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def rps(self) -> float:
        return len(self.total) / self.wall

    def __add__(self, other: Run) -> Run:
        return Run(self.ttfb + other.ttfb, self.total + other.total, self.wall + other.wall)


class BenchStore(ApiStore, ControllerStore):
    """Seeds a session as the API does and mints its token as the controller does."""


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "warning", **env},
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait(url: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(url: str, key: str, requests: int, concurrency: int) -> Run:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ttfb: list[float] = []
    total: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                first = None
                async with client.stream("POST", "/v1/messages?beta=true", json=BODY, headers=headers) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"{url}: status {r.status_code}: {(await r.aread())[:200]!r}")
                    async for _chunk in r.aiter_raw():
                        if first is None:
                            first = time.perf_counter()
                done = time.perf_counter()
                ttfb.append((first or done) - started)
                total.append(done - started)

        wall_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - wall_start
    return Run(ttfb, total, wall)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="flyswarm-bench-gw-") as tmp:
        redis = start_redis(Path(tmp) / "redis", appendonly=False)
        model_port, gateway_port = free_port(), free_port()
        model = _spawn(["model", "--port", str(model_port)], {"FLYSWARM_MODEL_API_KEY": UPSTREAM_KEY})
        gateway = _spawn(
            ["gateway"],
            {
                "REDIS_URL": redis.url,
                "ANTHROPIC_API_KEY": UPSTREAM_KEY,
                "FLYSWARM_GATEWAY_UPSTREAM_URL": f"http://127.0.0.1:{model_port}",
                "FLYSWARM_GATEWAY_PORT": str(gateway_port),
            },
        )
        store = BenchStore.from_url(redis.url)
        try:
            model_url, gateway_url = f"http://127.0.0.1:{model_port}", f"http://127.0.0.1:{gateway_port}"
            _wait(f"{model_url}/healthz")
            _wait(f"{gateway_url}/readyz")
            await store.create_or_get(store.new_session("bench", SessionSpec(prompt="bench")))
            token = (await store.mint_session_token("bench")).value
            # Warm-up: connections, imports, the first script load in Redis.
            await _load(model_url, UPSTREAM_KEY, args.concurrency * 2, args.concurrency)
            await _load(gateway_url, token, args.concurrency * 2, args.concurrency)
            direct, via, gateway_cpu, model_cpu = Run([], [], 0.0), Run([], [], 0.0), 0.0, 0.0
            for _round in range(args.rounds):
                before = _cpu_seconds(model.pid)
                direct += await _load(model_url, UPSTREAM_KEY, args.requests, args.concurrency)
                model_cpu += _cpu_seconds(model.pid) - before
                before = _cpu_seconds(gateway.pid)
                via += await _load(gateway_url, token, args.requests, args.concurrency)
                gateway_cpu += _cpu_seconds(gateway.pid) - before
            # One at a time: the latency the gateway adds to a request when nothing queues behind it.
            lone_direct = await _load(model_url, UPSTREAM_KEY, 50, 1)
            lone_via = await _load(gateway_url, token, 50, 1)
            cpu_per_request = gateway_cpu / (args.requests * args.rounds)
            model_cpu_per_request = model_cpu / (args.requests * args.rounds)
            session = await store.get("bench")
            metered = session.usage.requests if session and session.usage else 0
        finally:
            await store.close()
            for proc in (gateway, model):
                proc.terminate()
                proc.wait(10)
            redis.stop()

    added_p50 = via.p(via.total, 0.5) - direct.p(direct.total, 0.5)
    ratio = via.rps / direct.rps
    print(
        f"streamed responses, {args.requests} requests at {args.concurrency} concurrent (loopback), "
        f"{args.rounds} alternating rounds pooled"
    )
    print(f"{'':24}{'direct (baseline)':>20}{'via gateway':>14}{'added':>10}")
    for name, values_d, values_v in (("ttfb", direct.ttfb, via.ttfb), ("total", direct.total, via.total)):
        for q in (0.5, 0.95):
            d, v = direct.p(values_d, q), via.p(values_v, q)
            print(f"  {name} p{int(q * 100):<2} (ms){'':12}{d:>20.2f}{v:>14.2f}{v - d:>10.2f}")
    print(f"  throughput (req/s){'':6}{direct.rps:>20.1f}{via.rps:>14.1f}{ratio:>9.2f}x")
    d, v = lone_direct.p(lone_direct.total, 0.5), lone_via.p(lone_via.total, 0.5)
    print(f"  total p50, 1 at a time (ms){'':0}{d:>17.2f}{v:>14.2f}{v - d:>10.2f}")
    print(
        f"  CPU per request: gateway {cpu_per_request * 1000:.2f} ms, scripted model "
        f"{model_cpu_per_request * 1000:.2f} ms; requests metered by the gateway: {metered}"
    )
    ok_latency = "meets" if added_p50 <= GOAL_ADDED_P50_MS else "MISSES"
    ok_rate = "meets" if ratio >= GOAL_THROUGHPUT_RATIO else "MISSES"
    print(f"goal: added p50 total <= {GOAL_ADDED_P50_MS:g} ms: {added_p50:.2f} ms ({ok_latency})")
    print(f"goal: throughput >= {GOAL_THROUGHPUT_RATIO:g}x direct: {ratio:.2f}x ({ok_rate})")


if __name__ == "__main__":
    asyncio.run(main())
