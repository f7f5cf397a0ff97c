"""Benchmark of the API: ``POST /sessions`` and ``GET /sessions/{id}`` beside a bare-``SET`` baseline.

Starts its own redis-server and two servers on loopback, both under the same uvicorn settings
(:func:`api.server.uvicorn_config`) and the same Redis:

* the API (``python -m api.server``, access log on, written to a file as in production);
* the baseline (``python -m bench.api_baseline``): a raw ASGI app doing one ``SET`` per request.

Then ``--concurrency`` httpx clients (one keep-alive connection each) send ``--requests`` requests
per phase, interleaving baseline and API phases for ``--rounds`` rounds; each phase's best round is
kept. Printed: throughput, p50 and p99 latency, and the API/baseline throughput ratio (the target is
>= 0.6). The load generator shares the machine's cores with the servers, so absolute numbers say
little; the ratio is the point.

Run: ``python bench/api.py`` (about 30 s with the defaults), ``--json`` for machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from local.redis_server import free_port, start_redis  # noqa: E402

PROMPT = "List files in the current directory and summarise what the project does."


@dataclass(frozen=True)
class PhaseResult:
    name: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float | None  # CPU time of the server process per request
    redis_cpu_us: float | None  # CPU time of redis-server per request

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_request_us(before: float | None, after: float | None, count: int) -> float | None:
    if before is None or after is None:
        return None
    return (after - before) / count * 1e6


@contextmanager
def server_process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server for {url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"server for {url} did not come up within {timeout}s")


RequestFactory = Callable[[int], tuple[str, str, bytes | None]]


async def drive(base: str, make: RequestFactory, count: int, concurrency: int) -> tuple[float, list[float]]:
    """``count`` requests from ``concurrency`` clients; returns (seconds, latencies in seconds)."""
    next_index = 0
    latencies: list[float] = []
    failures: list[str] = []

    async def worker() -> None:
        nonlocal next_index
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0, headers=headers) as client:
            while next_index < count:
                index = next_index
                next_index += 1
                method, path, body = make(index)
                started = time.perf_counter()
                response = await client.request(method, path, content=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code >= 300:
                    failures.append(f"{method} {path}: {response.status_code} {response.text[:200]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return seconds, latencies


@dataclass(frozen=True)
class Target:
    base: str
    pid: int


async def measure(
    name: str, target: Target, redis_pid: int, make: RequestFactory, count: int, concurrency: int
) -> PhaseResult:
    server_before, redis_before = cpu_seconds(target.pid), cpu_seconds(redis_pid)
    seconds, latencies = await drive(target.base, make, count, concurrency)
    server_after, redis_after = cpu_seconds(target.pid), cpu_seconds(redis_pid)
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return PhaseResult(
        name,
        len(latencies),
        seconds,
        statistics.median(ordered) * 1000,
        p99 * 1000,
        per_request_us(server_before, server_after, count),
        per_request_us(redis_before, redis_after, count),
    )


TARGETS = ("baseline", "fastapi", "api")
LABELS = {
    ("POST", "baseline"): "POST baseline (1 SET)",
    ("POST", "fastapi"): "POST FastAPI bare route",
    ("POST", "api"): "POST /sessions",
    ("GET", "baseline"): "GET baseline (1 SET)",
    ("GET", "fastapi"): "GET FastAPI bare route",
    ("GET", "api"): "GET /sessions/{id}",
}


async def run(args: argparse.Namespace, targets: dict[str, Target], redis_pid: int) -> dict[str, PhaseResult]:
    best: dict[str, PhaseResult] = {}

    def post(tag: str) -> RequestFactory:
        def make(i: int) -> tuple[str, str, bytes | None]:
            body = json.dumps({"prompt": PROMPT, "session_id": f"b-{tag}-{i}"}).encode()
            return "POST", "/sessions", body

        return make

    def get(tag: str, count: int) -> RequestFactory:
        return lambda i: ("GET", f"/sessions/b-{tag}-{i % count}", None)

    n, c = args.requests, args.concurrency
    for target in targets.values():  # warm-up: connections, caches, the Lua script load
        await drive(target.base, post("warm"), 200, c)
    for round_no in range(args.rounds):
        tag = f"r{round_no}-{os.getpid()}"
        for verb, make in (("POST", post(tag)), ("GET", get(tag, n))):
            for key in TARGETS:
                result = await measure(LABELS[(verb, key)], targets[key], redis_pid, make, n, c)
                if result.name not in best or result.throughput > best[result.name].throughput:
                    best[result.name] = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2500, help="requests per phase and round")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (best round per phase is kept)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="flyswarm-bench-") as tmp:
        work = Path(tmp)
        redis = start_redis(work / "redis")
        try:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis.url, "HOST": "127.0.0.1"}
            env.pop("API_TOKENS", None)
            ports = {key: free_port() for key in TARGETS}
            commands = {
                "api": (
                    [sys.executable, "-m", "api.server"],
                    {"LOG_LEVEL": "info", "FLYSWARM_LOG_JSON": "true"},
                ),
                "baseline": ([sys.executable, "-m", "bench.api_baseline"], {}),
                "fastapi": (
                    [sys.executable, "-m", "bench.api_baseline"],
                    {"FLYSWARM_BENCH_BASELINE": "fastapi"},
                ),
            }
            with ExitStack() as stack:
                targets: dict[str, Target] = {}
                for key, (command, extra) in commands.items():
                    process_env = {**env, **extra, "PORT": str(ports[key])}
                    process = stack.enter_context(server_process(command, process_env, work / f"{key}.log"))
                    targets[key] = Target(f"http://127.0.0.1:{ports[key]}", process.pid)
                    wait_until_up(f"{targets[key].base}/health", process)
                results = asyncio.run(run(args, targets, redis.process.pid))
        finally:
            redis.stop()
    report(args, results)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def report(args: argparse.Namespace, results: dict[str, PhaseResult]) -> None:
    ratios: dict[str, dict[str, float | None]] = {}
    for verb in ("POST", "GET"):
        base, bare, api = (results[LABELS[(verb, key)]] for key in TARGETS)
        ratios[verb] = {
            "throughput": api.throughput / base.throughput,
            "server_cpu": _ratio(base.server_cpu_us, api.server_cpu_us),
            "server_cpu_vs_fastapi": _ratio(bare.server_cpu_us, api.server_cpu_us),
        }
    if args.json:
        phases = {name: {**asdict(r), "throughput": r.throughput} for name, r in results.items()}
        print(json.dumps({"phases": phases, "ratios": ratios, "concurrency": args.concurrency}, indent=2))
        return
    print(
        f"flyswarm API benchmark: {args.requests} requests per phase, {args.concurrency} concurrent httpx "
        f"clients, best of {args.rounds} round(s), {os.cpu_count()} CPUs"
    )
    print(f"{'phase':<26}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}", end="")
    print(f"{'server CPU us/req':>19}{'redis CPU us/req':>18}")
    for verb in ("POST", "GET"):
        for key in TARGETS:
            r = results[LABELS[(verb, key)]]
            server = f"{r.server_cpu_us:.0f}" if r.server_cpu_us is not None else "n/a"
            redis = f"{r.redis_cpu_us:.0f}" if r.redis_cpu_us is not None else "n/a"
            print(f"{r.name:<26}{r.throughput:>8.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{server:>19}{redis:>18}")
        ratio = ratios[verb]
        throughput = ratio["throughput"] or 0.0
        verdict = "ok" if throughput >= 0.6 else "BELOW TARGET 0.6"
        line = f"  {verb} ratio API/baseline: throughput {throughput:.2f} ({verdict})"
        if ratio["server_cpu"] is not None and ratio["server_cpu_vs_fastapi"] is not None:
            line += (
                f"; server CPU per request {ratio['server_cpu']:.2f} "
                f"(vs the FastAPI bare route {ratio['server_cpu_vs_fastapi']:.2f})"
            )
        print(line)
    print(
        "throughput: end to end, with the httpx load generator on the same CPUs (often the bottleneck).\n"
        "server CPU ratio: baseline CPU/request over API CPU/request, i.e. the throughput ratio where\n"
        "the server process, not the load generator, is the bottleneck."
    )


if __name__ == "__main__":
    main()
