"""Benchmark of event streams at app scale: N followers of one chat session on one API process.

Starts its own redis-server and one API process (``python -m api.server``, the production entry
point). Per run it creates a chat session, measures ``POST /sessions/{id}/messages`` with no
followers (the idle bound), then a separate load-generator process (this file with ``--worker``,
raw asyncio sockets for SSE, the ``websockets`` client for WebSocket) opens N followers. Once the
API's ``flyswarm_api_followers`` gauge shows all N, a producer appends events straight to Redis (as
an agent does) at ``--rate`` per second for ``--seconds``, each carrying its append time, while
``POST /messages`` is measured again. Printed per run:

* delivery latency append -> receipt by the follower, p50/p99 over every (event, follower) pair,
  and how many followers got every event exactly once and in order;
* API RSS per follower ((RSS with N followers - RSS before) / N) and API CPU (cores) while producing;
* ``POST /messages`` p99 under that load beside the idle p99.

Goals: 5 000 followers with delivery p99 <= 250 ms, POST p99 <= 2x idle, <= 50 KB RSS per follower;
10 000 reported as far as the machine allows. The load generator, Redis and the API share the same
CPUs, so the latency includes the generator's own queueing. The file-descriptor soft limit is raised
to the hard limit (inherited by the API and the generator) and the run says so.

Run: ``python bench/streams.py`` (a few minutes), ``--sizes 1000`` for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.models import SessionEvent  # noqa: E402
from bench.api import cpu_seconds, server_process, wait_until_up  # noqa: E402
from local.redis_server import free_port, start_redis  # noqa: E402
from tests.store import Store  # noqa: E402

_T_RE = re.compile(rb'"t": ?([0-9.eE+-]+)')
_ID_RE = re.compile(rb"^id: (\d+)-(\d+)$", re.M)
GOAL_FOLLOWERS, GOAL_P99_MS, GOAL_POST_RATIO, GOAL_KB = 5000, 250.0, 2.0, 50.0


# -- the load generator (a separate process) --------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.counts: list[int] = []
        self.in_order = 0
        self.retries = 0
        self.live: list[_Count] = []  # per follower, while it follows


class _Count:
    count = 0


class _SseProtocol(asyncio.Protocol, _Count):
    """One SSE follower as a bare protocol: no task, no stream reader, a regex over what arrives
    (the generator must cost far less per event than the API, or it measures itself)."""

    def __init__(self, path: str, tally: Tally, ready: asyncio.Event, done: asyncio.Future[bool]) -> None:
        self.path, self.tally, self.ready, self.done = path, tally, ready, done
        tally.live.append(self)
        self.head = True
        self.tail = b""
        self.count = 0
        self.ordered = True
        self.last = (0, 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        request = f"GET {self.path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"
        transport.write(request.encode())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.tail += data
        if self.head:
            end = self.tail.find(b"\r\n\r\n")
            if end < 0:
                return
            if self.tail.split(b" ", 2)[1] != b"200":
                self.done.set_result(False)  # 503 at a limit: the caller retries
                return
            self.head, self.tail = False, self.tail[end + 4 :]
            self.ready.set()
        cut = self.tail.rfind(b"\n\n")
        if cut < 0:
            return
        frames, self.tail = self.tail[: cut + 2], self.tail[cut + 2 :]
        for match in _ID_RE.finditer(frames):
            key = (int(match[1]), int(match[2]))
            self.ordered = self.ordered and key > self.last
            self.last = key
            self.count += 1
        self.tally.latencies.extend(now - float(t) for t in _T_RE.findall(frames))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(True)


async def _sse_follower(
    host: str, port: int, path: str, tally: Tally, stop: asyncio.Event, ready: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        done: asyncio.Future[bool] = loop.create_future()
        transport, protocol = await loop.create_connection(
            functools.partial(_SseProtocol, path, tally, ready, done), host, port
        )
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({done, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        transport.close()
        if done.done() and not done.result():
            tally.retries += 1
            await asyncio.sleep(0.5)
            continue
        break
    tally.counts.append(protocol.count)
    tally.in_order += protocol.ordered


async def _ws_follower(url: str, tally: Tally, stop: asyncio.Event, ready: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    ordered, last, counter = True, (0, 0), _Count()
    tally.live.append(counter)
    async with connect(url, compression=None, max_size=None) as ws:
        ready.set()
        stopping = asyncio.ensure_future(stop.wait())
        while True:
            receiving = asyncio.ensure_future(ws.recv())
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
                break
            raw = receiving.result()
            frame = raw.encode() if isinstance(raw, str) else raw
            found = _T_RE.search(frame)
            if found is None:
                continue
            tally.latencies.append(time.time() - float(found[1]))
            ms, _, seq = json.loads(frame)["id"].partition("-")
            key = (int(ms), int(seq))
            ordered = ordered and key > last
            last = key
            counter.count += 1
    tally.counts.append(counter.count)
    tally.in_order += ordered


async def worker(args: argparse.Namespace) -> None:
    """Open ``--n`` followers (``--ramp`` at a time), say STARTED, follow until ``STOP <events>`` on
    stdin and every follower got that many (or a minute passed), then print the tally."""
    tally, stop = Tally(), asyncio.Event()
    gate = asyncio.Semaphore(args.ramp)
    host, port = "127.0.0.1", int(args.url.rsplit(":", 1)[1])

    async def one() -> None:
        ready = asyncio.Event()
        async with gate:  # hold a slot until connected: at most --ramp handshakes at once
            if args.transport == "sse":
                follower = asyncio.create_task(_sse_follower(host, port, args.path, tally, stop, ready))
            else:
                url = f"ws://{host}:{port}{args.path}"
                follower = asyncio.create_task(_ws_follower(url, tally, stop, ready))
            await asyncio.wait(
                {follower, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
        await follower

    tasks = [asyncio.create_task(one()) for _ in range(args.n)]
    print("STARTED", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    expected, deadline = int(line.split()[1]), time.monotonic() + 60
    # Every event produced, or a minute past the end of production: whatever is late is counted missing.
    while time.monotonic() < deadline and any(c.count < expected for c in tally.live):
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(
        json.dumps(
            {
                "latencies": tally.latencies,
                "counts": tally.counts,
                "in_order": tally.in_order,
                "retries": tally.retries,
            }
        ),
        flush=True,
    )


# -- the driver -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    transport: str
    followers: int
    p50_ms: float
    p99_ms: float
    complete: int
    kb_per_follower: float
    api_cores: float
    generator_cores: float
    redis_cores: float
    post_p99_ms: float
    idle_post_p99_ms: float
    retries: int
    connect_seconds: float
    load: float = 0.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


async def followers_gauge(client: httpx.AsyncClient) -> int:
    text = (await client.get("/metrics")).text
    return int(
        sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("flyswarm_api_followers{"))
    )


async def post_latencies(client: httpx.AsyncClient, path: str, seconds: float, rate: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        response = await client.post(path, json={"text": "how is it going?"})
        latencies.append(time.perf_counter() - started)
        if response.status_code != 202:
            raise SystemExit(f"POST {path}: {response.status_code} {response.text[:200]}")
        await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - started)))
    return latencies


async def produce(store: Store, session_id: str, seconds: float, rate: float) -> int:
    sent, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        event = SessionEvent(
            type="assistant_text", source="agent", message="x" * 200, data={"t": time.time()}
        )
        await store.append_event(session_id, event)
        sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
    return sent


async def one_run(
    args: argparse.Namespace, base: str, api_pid: int, redis_pid: int, store: Store, transport: str, n: int
) -> RunResult:
    session_id = f"bench-{transport}-{n}"
    async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
        created = await client.post(
            "/sessions", json={"prompt": "bench", "session_id": session_id, "mode": "chat"}
        )
        assert created.status_code in (200, 201), created.text
        messages = f"/sessions/{session_id}/messages"
        idle = await post_latencies(client, messages, args.post_seconds, args.post_rate)
        rss_before = rss_kb(api_pid)
        path = f"/sessions/{session_id}/{'events' if transport == 'sse' else 'ws'}"
        command = [
            sys.executable,
            __file__,
            "--worker",
            "--url",
            base,
            "--path",
            path,
            "--n",
            str(n),
            "--transport",
            transport,
            "--ramp",
            str(args.ramp),
        ]
        gen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert gen.stdout is not None and gen.stdin is not None
            gen.stdout.readline()
            started = time.monotonic()
            while await followers_gauge(client) < n:
                if time.monotonic() - started > args.connect_timeout:
                    raise SystemExit(
                        f"only {await followers_gauge(client)} of {n} followers after {args.connect_timeout}s"
                    )
                await asyncio.sleep(0.2)
            connect_seconds = time.monotonic() - started
            await asyncio.sleep(1.0)
            rss_with = rss_kb(api_pid)
            cpu_before, wall = cpu_seconds(api_pid) or 0.0, time.monotonic()
            gen_before, redis_before = cpu_seconds(gen.pid) or 0.0, cpu_seconds(redis_pid) or 0.0
            sent, loaded = await asyncio.gather(
                produce(store, session_id, args.seconds, args.rate),
                post_latencies(client, messages, args.seconds, args.post_rate),
            )
            elapsed = time.monotonic() - wall
            cores = ((cpu_seconds(api_pid) or 0.0) - cpu_before) / elapsed
            gen_cores = ((cpu_seconds(gen.pid) or 0.0) - gen_before) / elapsed
            redis_cores = ((cpu_seconds(redis_pid) or 0.0) - redis_before) / elapsed
            gen.stdin.write(f"STOP {sent}\n")
            gen.stdin.flush()
            result = json.loads(await asyncio.get_running_loop().run_in_executor(None, gen.stdout.readline))
        finally:
            gen.kill()
            gen.wait()
        while await followers_gauge(client) > 0:
            await asyncio.sleep(0.2)
    lat_ms = [x * 1000 for x in result["latencies"]]
    complete = sum(1 for c in result["counts"] if c == sent)
    return RunResult(
        transport,
        n,
        statistics.median(lat_ms) if lat_ms else float("nan"),
        p99(lat_ms),
        min(complete, result["in_order"]),
        (rss_with - rss_before) / n,
        cores,
        gen_cores,
        redis_cores,
        p99(loaded) * 1000,
        p99(idle) * 1000,
        result["retries"],
        connect_seconds,
    )


def raise_fd_limit() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if soft == hard:
        return (
            f"RLIMIT_NOFILE: soft limit already at the hard limit {hard} (API and load generator inherit it)"
        )
    return f"RLIMIT_NOFILE raised from {soft} to {hard} (API and load generator inherit it)"


def report(args: argparse.Namespace, results: list[RunResult], fd_note: str) -> None:
    print(
        f"flyswarm stream benchmark: one API process, one chat session producing {args.rate:g} events/s "
        f"for {args.seconds:g} s, {os.cpu_count()} CPUs shared by API, Redis and the load generator"
    )
    print(fd_note)
    print(
        f"{'run':<12}{'connect s':>10}{'p50 ms':>9}{'p99 ms':>9}{'complete':>15}{'KB/follower':>13}"
        f"{'API cores':>11}{'gen cores':>11}{'redis':>7}{'load':>6}"
        f"{'POST p99 ms':>13}{'idle p99':>10}{'ratio':>7}"
    )
    for r in results:
        ratio = r.post_p99_ms / r.idle_post_p99_ms if r.idle_post_p99_ms else float("nan")
        name = f"{r.transport} {r.followers}"
        print(
            f"{name:<12}{r.connect_seconds:>10.1f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}"
            f"{f'{r.complete}/{r.followers}':>15}{r.kb_per_follower:>13.1f}{r.api_cores:>11.2f}"
            f"{r.generator_cores:>11.2f}{r.redis_cores:>7.2f}{r.load:>6.1f}"
            f"{r.post_p99_ms:>13.1f}{r.idle_post_p99_ms:>10.1f}{ratio:>7.2f}"
        )
        if r.retries:
            print(f"  {r.retries} connection attempts answered 503 at a limit and were retried")
        if r.transport == "sse" and r.followers == GOAL_FOLLOWERS:
            checks = [
                (f"delivery p99 {r.p99_ms:.0f} ms <= {GOAL_P99_MS:.0f} ms", r.p99_ms <= GOAL_P99_MS),
                (f"POST p99 {ratio:.2f}x idle <= {GOAL_POST_RATIO:g}x", ratio <= GOAL_POST_RATIO),
                (f"{r.kb_per_follower:.1f} KB/follower <= {GOAL_KB:g} KB", r.kb_per_follower <= GOAL_KB),
            ]
            print(
                "  goals at 5 000: " + "; ".join(f"{text} {'ok' if ok else 'MISSED'}" for text, ok in checks)
            )
    print("complete = followers that got every produced event exactly once and in order;")
    print("load = the machine's 1-minute load average when the run started (other work shares the CPUs).")


def api_env(args: argparse.Namespace, redis_url: str, port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis_url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "warning",
        "FLYSWARM_LOG_JSON": "true",
        "FLYSWARM_STREAM_MAX_FOLLOWERS": str(max([*args.sizes, *args.ws_sizes, 1]) + 100),
    }
    env.pop("API_TOKENS", None)
    return env


async def run_with_store(
    args: argparse.Namespace, base: str, api_pid: int, redis_pid: int, redis_url: str, transport: str, n: int
) -> RunResult:
    store = Store.from_url(redis_url)
    try:
        return await one_run(args, base, api_pid, redis_pid, store, transport, n)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[1000, 5000, 10000], help="SSE follower counts"
    )
    parser.add_argument("--ws-sizes", type=int, nargs="*", default=[1000], help="WebSocket follower counts")
    parser.add_argument("--rate", type=float, default=2.0, help="events per second from the session")
    parser.add_argument("--seconds", type=float, default=15.0, help="producing window per run")
    parser.add_argument("--post-seconds", type=float, default=8.0, help="idle POST measurement per run")
    parser.add_argument("--post-rate", type=float, default=25.0, help="POST /messages per second")
    parser.add_argument("--ramp", type=int, default=200, help="followers connecting at once")
    parser.add_argument("--connect-timeout", type=float, default=180.0)
    parser.add_argument("--profile", help="write a cProfile of the API process to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--transport", default="sse", help=argparse.SUPPRESS)
    args = parser.parse_args()
    fd_note = raise_fd_limit()
    if args.worker:
        try:
            import uvloop

            uvloop.run(worker(args))
        except ImportError:
            asyncio.run(worker(args))
        return
    with tempfile.TemporaryDirectory(prefix="flyswarm-bench-streams-") as tmp:
        work = Path(tmp)
        redis = start_redis(work / "redis")
        try:
            results = []
            # A fresh API process per run: RSS per follower is then not blurred by the previous run.
            for transport, n in [("sse", n) for n in args.sizes] + [("ws", n) for n in args.ws_sizes]:
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                command = [sys.executable, "-m", "api.server"]
                if args.profile:  # cProfile of the API process, written when it exits
                    command = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "api.server"]
                env = api_env(args, redis.url, port)
                with server_process(command, env, work / f"api-{transport}-{n}.log") as api:
                    wait_until_up(f"{base}/health", api)
                    load = os.getloadavg()[0]
                    result = asyncio.run(
                        run_with_store(args, base, api.pid, redis.process.pid, redis.url, transport, n)
                    )
                    results.append(dataclasses.replace(result, load=load))
        finally:
            redis.stop()
    report(args, results, fd_note)


if __name__ == "__main__":
    main()
