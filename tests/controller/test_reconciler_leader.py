"""Several controllers: one shard has one actor, a killed leader is replaced, SIGTERM is graceful."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from api import keys
from tests.controller.world import APP, IMAGE, RunningController, World, renewals

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


async def test_two_racing_controllers_make_one_machine_per_session_and_only_the_shard_holder_acts(
    world: World,
) -> None:
    # One shard: exactly one replica may act on sessions at a time (the unsharded behaviour).
    a = await world.start_controller(controller_id="ctl-a", shards=1)
    b = await world.start_controller(controller_id="ctl-b", shards=1)

    async def settled() -> bool:
        # Both see each other and the shard sits with its fair-share owner (the first id).
        return a.controller.shards.replicas == 2 == b.controller.shards.replicas and (
            a.controller.shards.held == [0] and b.controller.shards.held == []
        )

    await world.until(settled, what="the shard settled with one replica")
    acted_before = b.controller.metrics.total("flyswarm_controller_actions_total")
    ids = {f"r{i}" for i in range(5)}
    for sid in ids:
        await world.create_session(sid, mode="chat", idleTimeoutSeconds=0)
    for sid in ids:
        await world.until_running(sid)
    # Not one duplicate, ever: the replica without the shard never acted.
    for sid in ids:
        assert len(world.machines(sid, live=False)) == 1
    assert a.controller.shards.held == [0] and b.controller.shards.held == []
    assert b.controller.metrics.total("flyswarm_controller_actions_total") == acted_before
    assert a.controller.metrics.total("flyswarm_controller_actions_total") > 0
    await world.assert_invariants(ids)


async def test_graceful_stop_of_the_leader_hands_over_at_once(world: World) -> None:
    a = await world.start_controller(controller_id="ctl-a", leader_lease_seconds=30.0)
    await world.until(_leads(a), what="a leads")
    b = await world.start_controller(controller_id="ctl-b", leader_lease_seconds=30.0)
    await a.shutdown()
    # Far sooner than the 30 s lease: a released it on the way out.
    await world.until(_leads(b), timeout=10, what="b takes over")
    await world.create_session("after", mode="chat", idleTimeoutSeconds=0)
    await world.until_running("after")
    await world.assert_invariants({"after"})


async def test_killed_leader_is_replaced_within_the_lease_time(world: World, tmp_path: Path) -> None:
    lease = 2.0
    with _controller_process(world, "ctl-proc", tmp_path, lease) as (proc, port):
        await world.until(_holder_is(world, "ctl-proc"), what="the process leads")
        await world.create_session("before", mode="chat", idleTimeoutSeconds=0)
        await world.until_running("before")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["role"] == "leader"
            assert b"flyswarm_controller_leader 1.0" in (await http.get("/metrics")).content
        standby = await world.start_controller(controller_id="ctl-standby", leader_lease_seconds=lease)
        # The standby has campaigned (it saw the process holding the lease) and the process has
        # renewed since: the standby had its chance and stayed standby.
        await world.until(_sees_holder(standby, "ctl-proc"), what="the standby saw the holder")
        await renewals(world.redis, 2)
        assert not standby.controller.elector.is_leader()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # The lease was not released; the standby must wait for it to expire, then lead.
        await world.until(_leads(standby), timeout=lease * 4, what="standby takes over")
        await world.create_session("after", mode="chat", idleTimeoutSeconds=0)
        await world.until_running("after")
        await world.until_running("before")
        assert len(world.machines("before", live=False)) == 1
        await world.assert_invariants({"before", "after"})


async def test_sigterm_drains_releases_the_lease_and_exits_zero(world: World, tmp_path: Path) -> None:
    with _controller_process(world, "ctl-term", tmp_path, 30.0) as (proc, _port):
        await world.until(_holder_is(world, "ctl-term"), what="the process leads")
        await world.create_session("t", mode="chat", idleTimeoutSeconds=0)
        await world.until_running("t")
        proc.send_signal(signal.SIGTERM)
        # The drain may use its whole shutdown budget (20 s) for an action in flight on a loaded machine.
        assert await asyncio.to_thread(proc.wait, 60) == 0
        assert await world.redis.get(keys.LEADER) is None
        # The machine keeps running: stopping the controller stops nobody's work.
        assert world.live_machine("t") is not None
        log = (tmp_path / "ctl-term.log").read_text()
        assert "controller_stopped" in log
        assert "test-fly-token-0123" not in log


# -- helpers ---------------------------------------------------------------------------------------


def _leads(running: RunningController) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return running.controller.elector.is_leader()

    return check


def _sees_holder(running: RunningController, holder: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return running.controller.elector.current_holder == holder

    return check


def _holder_is(world: World, holder: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        value = await world.redis.get(keys.LEADER)
        return bool(value) and str(value).startswith(f"{holder}/")

    return check


@contextmanager
def _controller_process(
    world: World, controller_id: str, tmp_path: Path, lease: float
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    settings = world.settings()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": world.redis_url,
        "FLY_API_TOKEN": "test-fly-token-0123",
        "FLY_APP_NAME": APP,
        "FLY_AGENT_IMAGE": IMAGE,
        "FLY_API_HOSTNAME": world.fly_url,
        "FLYSWARM_CONTROLLER_ID": controller_id,
        "FLYSWARM_CONTROLLER_PORT": str(settings.controller_port),
        "FLYSWARM_LEADER_LEASE_SECONDS": str(lease),
        "FLYSWARM_AGENT_GATEWAY_URL": world.gateway_url,
        "LOG_LEVEL": "info",
    }
    for name in (
        "resync_seconds",
        "heartbeat_ttl_seconds",
        "boot_grace_seconds",
        "orphan_grace_seconds",
        "create_expectation_seconds",
        "restart_backoff_base_seconds",
        "restart_backoff_max_seconds",
        "stop_grace_seconds",
        "destroy_grace_seconds",
        "call_timeout_seconds",
    ):
        env[f"FLYSWARM_{name.upper()}"] = str(getattr(settings, name))
    log = open(tmp_path / f"{controller_id}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    try:
        yield proc, settings.controller_port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
