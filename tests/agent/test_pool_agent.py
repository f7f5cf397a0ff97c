"""An agent started in pool mode: booted with a slot token only, parked, claimed, then run as its session.

The real agent process, the real SDK and CLI, the real gateway and the scripted model. The
controller's part of a claim is played by the real store methods it calls (mint the session token,
assign the slot); the suspend of the pool machine by SIGSTOP/SIGCONT of the agent's process group,
as the emulator (and Fly) freeze a machine with its connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from api import keys
from tests.agent.conftest import AgentProcess, AgentRig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

POOL, SLOT = "warm", "s1"


def _bash(command: str, out: str) -> dict[str, object]:
    return {"tool": "Bash", "input": {"command": f"( {command} ) 2>&1 | tee {out}", "description": out}}


STEPS = [
    _bash("env", "env.txt"),
    _bash("cat /proc/*/environ | tr '\\0' '\\n' | sort -u", "proc-environ.txt"),
    {"text": "done"},
]
PROMPT = f"[[scenario:script {json.dumps({'steps': STEPS})}]] look around"


def pool_env(rig: AgentRig, pool_token: str, machine: str) -> dict[str, str]:
    """A pool machine's environment: the gateway and the slot token, nothing of any session."""
    env = rig.env("unused", "unused", machine=machine, FLYSWARM_POOL=POOL, FLYSWARM_POOL_SLOT=SLOT)
    del env["FLYSWARM_SESSION_ID"], env["FLYSWARM_SESSION_TOKEN"]
    env["FLYSWARM_POOL_TOKEN"] = pool_token
    return env


async def _until(
    check: Callable[[], Awaitable[object]], what: str, agent: AgentProcess, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if agent.popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened; agent log:\n{agent.log()}")
        await asyncio.sleep(0.05)


def _logged(agent: AgentProcess, event: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return event in agent.log()

    return check


async def test_a_pool_agent_waits_parked_then_runs_its_claimed_session_like_a_fresh_agent(
    rig: AgentRig, redis_client: aioredis.Redis
) -> None:
    spec_env = {"GREETING": "hello-from-the-spec"}
    for sid in ("pooled", "fresh"):
        await rig.create(sid, prompt=PROMPT, machine={"env": spec_env})
    pool_token = await rig.store.mint_pool_token(POOL, SLOT)
    pooled = rig.start(pool_env(rig, pool_token, "m-pool"))
    fresh = await rig.start_session("fresh", machine="m-fresh", **spec_env)

    # Booted: the SDK imported first, then the mark; its process environment holds no slot token.
    await _until(lambda: redis_client.hexists(keys.pool_booted(POOL), SLOT), "booted", pooled)
    await _until(_logged(pooled, "pool_agent_booted"), "the booted answer", pooled)
    assert "pool_agent_warmed" in pooled.log()
    environ = Path(f"/proc/{pooled.pid}/environ").read_bytes()
    assert pool_token.encode() not in environ and b"FLYSWARM_POOL_TOKEN_FD" in environ

    # Parked (suspended) while waiting, claimed meanwhile, resumed: it notices, takes its assignment.
    os.killpg(pooled.pid, signal.SIGSTOP)
    try:
        token = (await rig.store.mint_session_token("pooled")).value
        session_env = {
            **spec_env,
            "FLYSWARM_SESSION_ID": "pooled",
            "FLYSWARM_LAUNCH_ID": "l-1",
            "FLYSWARM_WORK_ROOT": pooled.env["FLYSWARM_WORK_ROOT"],
        }
        await rig.store.assign_pool_slot(POOL, SLOT, "pooled", token, session_env)
        # Parked for a while (a resume is seconds later than a tick was due: the agent notices).
        await asyncio.sleep(3.5)
    finally:
        os.killpg(pooled.pid, signal.SIGCONT)
    assert await pooled.wait(90) == 0, pooled.log()
    assert await fresh.wait(90) == 0, fresh.log()
    assert "pool_agent_resumed" in pooled.log() and "pool_agent_assigned" in pooled.log()

    # The same result, events and report as the fresh agent's.
    reports = {}
    for sid in ("pooled", "fresh"):
        session = await rig.store.get(sid)
        assert session is not None and session.agent is not None
        reports[sid] = session.agent
    assert reports["pooled"].state == reports["fresh"].state == "done"
    assert reports["pooled"].resultText == reports["fresh"].resultText == "done"
    assert reports["pooled"].turns == reports["fresh"].turns
    assert reports["pooled"].machineId == "m-pool"
    events = {sid: [e.event for e in await rig.store.read_events(sid, count=10_000)] for sid in reports}
    agent_events = {sid: [e.type for e in events[sid] if e.source == "agent"] for sid in events}
    assert agent_events["pooled"] == agent_events["fresh"]
    assert "agent_started" in agent_events["pooled"] and "tool_result" in agent_events["pooled"]

    # The tools saw the session's env (it never was in the machine's config) and no slot token.
    work = rig.work_dir("pooled", "m-pool")
    seen = (work / "env.txt").read_text() + (work / "proc-environ.txt").read_text()
    assert "GREETING=hello-from-the-spec" in seen and "FLYSWARM_SESSION_ID=pooled" in seen
    assert f"ANTHROPIC_API_KEY={token}" in seen
    # (Only this token: a tool reads every process of its user, and on a shared test host that
    # includes other tests' pool machines; on Fly the machine is the agent's alone.)
    assert pool_token not in seen
    assert pool_token not in pooled.log()
    # Used once: the slot token opens nothing any more, the assignment is gone.
    assert await redis_client.exists(keys.pool_slot_token(POOL, SLOT), keys.pool_assignment(POOL, SLOT)) == 0
