"""Benchmark: the flyswarm agent beside the bare Claude Code CLI doing the same one-tool task.

Both run the scripted model's default scenario (one Bash call writing a file, then a final
answer) against a local model server, so the numbers measure our overhead, not a model:

* agent: ``python -m agent`` from spawn to its first event in Redis (``agent_started``), and
  from spawn to exit with the ``done`` report written;
* bare CLI: ``claude -p ... --output-format json`` (the SDK's bundled binary), spawn to exit;
* a pool agent (``FLYSWARM_POOL_TOKEN``, ``agent/pool_wait.py``): started ahead, booted (SDK
  imported), frozen with SIGSTOP as a suspend freezes it; the figure runs from the claim (the
  session token minted, the assignment written, SIGCONT as the resume) to its first event and to
  exit. Fly's resume time itself is not in it (``bench/burst.py`` has the whole claim path).

It prints medians, the ratio agent/CLI, and the agent's peak RSS (its Python process alone, and
the whole tree with the CLI and the tool, sampled from /proc while it runs).

    .venv/bin/python bench/agent.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.logs import configure_logging  # noqa: E402
from api.models import SessionSpec  # noqa: E402
from api.store import ApiStore  # noqa: E402
from api.store_controller import ControllerStore  # noqa: E402
from local.model import ModelServer, start_in_thread  # noqa: E402
from local.redis_server import start_redis  # noqa: E402
from tests.gateway.conftest import start_gateway  # noqa: E402

PROMPT = "[[scenario:default]] write the file"
#: A claimed pool agent's first event: a few control-plane round trips, nothing imported or started.
POOL_FIRST_EVENT_GOAL = 0.1


def _rss_kb(pid: int, field: str = "VmHWM") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def base_env(model: ModelServer, home: Path) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "ANTHROPIC_BASE_URL": model.url,
        "ANTHROPIC_API_KEY": "sk-bench-dummy",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "1",
    }
    if os.geteuid() == 0:
        env["IS_SANDBOX"] = "1"
    return env


async def run_agent(
    store: ApiStore, controller: ControllerStore, gateway_url: str, model: ModelServer, tmp: Path, n: int
) -> dict[str, float]:
    sid = f"bench-{n}"
    await store.create_or_get(store.new_session(sid, SessionSpec(prompt=PROMPT)))
    token = await controller.mint_session_token(sid)
    env = base_env(model, tmp / "home")
    # As on a machine: the gateway is the agent's model endpoint and its only way to its state.
    for name in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"):
        env.pop(name)
    env.update(
        FLYSWARM_SESSION_ID=sid,
        FLYSWARM_CONTROL_URL=gateway_url,
        FLYSWARM_SESSION_TOKEN=token.value,
        FLYSWARM_WORK_ROOT=str(tmp / "work"),
        FLYSWARM_MACHINE_ID="bench",
        FLYSWARM_LOG_LEVEL="warning",
    )
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent"], env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL
    )
    first_event = None
    peak_agent = peak_tree = 0
    tick = 0
    while proc.poll() is None:
        if first_event is None and await store.read_events(sid, count=1):
            first_event = time.perf_counter() - started
        peak_agent = max(peak_agent, _rss_kb(proc.pid))
        if tick % 5 == 0:  # the /proc walk is not free on 2 cores: sample the tree less often
            peak_tree = max(peak_tree, sum(_rss_kb(p, "VmRSS") for p in _tree(proc.pid)))
        tick += 1
        await asyncio.sleep(0.01)
    done = time.perf_counter() - started
    session = await store.get(sid)
    if proc.returncode != 0 or session is None or session.agent is None or session.agent.state != "done":
        raise RuntimeError(
            f"agent run {n} failed: exit {proc.returncode}, report {session and session.agent}"
        )
    if not (tmp / "work" / sid / "work" / "out.txt").exists():
        raise RuntimeError("the agent's tool did not write its file")
    return {
        "first_event": first_event if first_event is not None else done,
        "done": done,
        "rss_agent_mb": peak_agent / 1024,
        "rss_tree_mb": peak_tree / 1024,
    }


async def run_pool_agent(
    store: ApiStore, controller: ControllerStore, gateway_url: str, model: ModelServer, tmp: Path, n: int
) -> dict[str, float]:
    sid, slot = f"bench-pool-{n}", f"s{n}"
    await store.create_or_get(store.new_session(sid, SessionSpec(prompt=PROMPT)))
    env = base_env(model, tmp / "home")
    for name in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"):
        env.pop(name)
    # A pool machine's environment: the gateway and a slot token, nothing of any session.
    env.update(
        FLYSWARM_CONTROL_URL=gateway_url,
        FLYSWARM_POOL_TOKEN=await controller.mint_pool_token("bench", slot),
        FLYSWARM_WORK_ROOT=str(tmp / "work"),
        FLYSWARM_MACHINE_ID="bench-pool",
        FLYSWARM_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent"],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while slot not in (await controller.pool_state("bench")).booted:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pool agent {n} never booted (exit {proc.poll()})")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # into its long-poll
    os.killpg(proc.pid, signal.SIGSTOP)  # parked, as a suspended machine
    # The claim: what the controller does for the agent, then the resume.
    started = time.perf_counter()
    token = await controller.mint_session_token(sid)
    session_env = {"FLYSWARM_SESSION_ID": sid, "FLYSWARM_LAUNCH_ID": f"l{n}"}
    await controller.assign_pool_slot("bench", slot, sid, token.value, session_env)
    os.killpg(proc.pid, signal.SIGCONT)
    first_event = None
    while proc.poll() is None:
        if first_event is None and await store.read_events(sid, count=1):
            first_event = time.perf_counter() - started
        await asyncio.sleep(0.01)
    done = time.perf_counter() - started
    session = await store.get(sid)
    if proc.returncode != 0 or session is None or session.agent is None or session.agent.state != "done":
        raise RuntimeError(
            f"pool agent run {n} failed: exit {proc.returncode}, report {session and session.agent}"
        )
    return {"first_event": first_event if first_event is not None else done, "done": done}


def run_cli(model: ModelServer, tmp: Path, n: int) -> dict[str, float]:
    import claude_agent_sdk

    cli = str(Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude")
    work = tmp / f"cli-{n}"
    work.mkdir(parents=True)
    home = tmp / f"cli-home-{n}"
    env = base_env(model, home)
    env["CLAUDE_CONFIG_DIR"] = str(home / ".claude")
    args = [
        cli,
        "-p",
        PROMPT,
        "--output-format",
        "json",
        "--permission-mode",
        "bypassPermissions",
        "--tools",
        "Read,Write,Edit,Bash,Glob,Grep",
    ]
    started = time.perf_counter()
    out = subprocess.run(args, env=env, cwd=str(work), capture_output=True, timeout=120, check=False)
    done = time.perf_counter() - started
    if out.returncode != 0 or json.loads(out.stdout).get("is_error") or not (work / "out.txt").exists():
        raise RuntimeError(
            f"bare CLI run {n} failed: {out.returncode} {out.stdout[:300]!r} {out.stderr[:300]!r}"
        )
    return {"done": done}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    # The in-process model server logs every request; the figures are what this prints.
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="flyswarm-bench-") as raw_tmp:
        tmp = Path(raw_tmp)
        redis = start_redis(tmp / "redis")
        model = start_in_thread()
        gateway = start_gateway(redis_url=redis.url, upstream_url=model.url, upstream_api_key="sk-bench")
        store = ApiStore.from_url(redis.url)
        controller = ControllerStore.from_url(redis.url)
        try:
            run_cli(model, tmp, -1)  # warm the page cache for both
            agent = [await run_agent(store, controller, gateway.url, model, tmp, n) for n in range(args.runs)]
            pool = [
                await run_pool_agent(store, controller, gateway.url, model, tmp, n) for n in range(args.runs)
            ]
            cli = [run_cli(model, tmp, n) for n in range(args.runs)]
        finally:
            await store.close()
            await controller.close()
            gateway.stop()
            model.stop()
            redis.stop()

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    agent_first, agent_done, cli_done = med(agent, "first_event"), med(agent, "done"), med(cli, "done")
    print(f"one-tool task, median of {args.runs} runs (scripted model on loopback)")
    print(f"  agent  start -> first event : {agent_first * 1000:7.0f} ms")
    print(f"  agent  start -> done        : {agent_done * 1000:7.0f} ms")
    print(f"  bare CLI start -> done      : {cli_done * 1000:7.0f} ms")
    print(f"  ratio agent/CLI (done)      : {agent_done / cli_done:7.2f}x")
    print(f"  ratio first event/CLI done  : {agent_first / cli_done:7.2f}x")
    pool_first, pool_done = med(pool, "first_event"), med(pool, "done")
    goal = POOL_FIRST_EVENT_GOAL * 1000
    print(f"  pool agent claim -> first event : {pool_first * 1000:7.0f} ms", end="")
    print(f"   (fresh {agent_first * 1000:.0f} ms; goal <= {goal:.0f} ms: no Python start-up, no SDK import)")
    print(
        f"  pool agent claim -> done        : {pool_done * 1000:7.0f} ms   (fresh {agent_done * 1000:.0f} ms)"
    )
    print(f"  agent peak RSS (python)     : {max(r['rss_agent_mb'] for r in agent):7.0f} MB")
    print(f"  agent+CLI+tool RSS (sum)    : {max(r['rss_tree_mb'] for r in agent):7.0f} MB")


if __name__ == "__main__":
    asyncio.run(main())
