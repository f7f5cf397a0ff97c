"""A Redis Cluster master killed mid-run: its replica takes over and the controller converges.

A cluster of its own (3 masters, one replica each, AOF, 1 s node timeout), the emulator and its
machines' heartbeat agents, one controller. Sessions are converging (tasks finishing, chats
running) when the master that holds the listing index is killed with SIGKILL; the replica is
promoted. The machines' agents reach their state through the gateway's channel, which talks to
the cluster too.
After convergence the invariants hold: no lost session, no duplicate or orphan machine, no phase
regression.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from api import keys
from api.models import Phase
from api.store_base import StoreUnavailable
from api.store_base import redis_client as redis_client_for
from local.redis_cluster import LocalCluster, cluster_state, start_cluster
from local.redis_server import RedisServer
from tests.controller.world import World, make_world

# Generous: a failover under a loaded shared machine has taken minutes to settle (32 s when idle).
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def cluster_world(tmp_path: Path) -> AsyncIterator[tuple[World, LocalCluster]]:
    cluster = await asyncio.to_thread(
        start_cluster, tmp_path / "cluster", masters=3, replicas_per_master=1, appendonly=True
    )
    client = redis_client_for(cluster.url)
    try:
        async with make_world(cluster.url, client, tmp_path) as world:
            yield world, cluster
    finally:
        # Closing waits on every node the client knew, the dead one included: bounded.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.aclose(), 5)
        cluster.stop()
        # The cluster clients drop their sockets to the SIGKILLed node without closing them; collect
        # them here, inside this test (whose marker expects it), not in whatever test runs next.
        gc.collect()


def master_of(cluster: LocalCluster, key: str) -> RedisServer:
    """The master node that serves ``key``'s slot right now."""
    probe = cluster.client(cluster.masters[0])
    try:
        slot = int(probe.execute_command("CLUSTER KEYSLOT", key))
        for low, high, master in _slots(probe):
            if low <= slot <= high:
                return next(n for n in cluster.nodes if n.port == master)
    finally:
        probe.close()
    raise AssertionError(f"no master serves {key}")


def _slots(client: redis.Redis) -> list[tuple[int, int, int]]:
    """``(first slot, last slot, master port)`` per range, from ``CLUSTER SLOTS``."""
    reply = client.execute_command("CLUSTER SLOTS")
    if isinstance(reply, dict):  # redis-py parses it: (low, high) -> {"primary": (host, port), ...}
        return [(int(lo), int(hi), int(v["primary"][1])) for (lo, hi), v in reply.items()]
    return [(int(r[0]), int(r[1]), int(r[2][1])) for r in reply]


def _replica_of(cluster: LocalCluster, replica: RedisServer) -> int:
    """The port of the master ``replica`` follows."""
    client = cluster.client(replica)
    try:
        info = client.info("replication")
        return int(info["master_port"])
    finally:
        client.close()


def promoted(cluster: LocalCluster, dead: RedisServer) -> bool:
    """Every live node sees the cluster whole again, with the dead master's slots on its replica."""
    for node in cluster.nodes:
        if node.process.poll() is not None:
            continue
        client = cluster.client(node)
        try:
            if cluster_state(client).get("cluster_state") != "ok":
                return False
            if any(port == dead.port for _, _, port in _slots(client)):
                return False
        except redis.RedisError:
            return False
        finally:
            client.close()
    return True


# redis-py's cluster client abandons the connections of a node that died under it; their
# ResourceWarnings are that library's, expected here and nowhere else.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_killed_master_fails_over_to_its_replica_and_the_invariants_hold(
    cluster_world: tuple[World, LocalCluster],
) -> None:
    world, cluster = cluster_world
    await world.start_controller()
    before = {f"t{i}" for i in range(4)}
    for sid in sorted(before):
        await world.create_session(sid, prompt="finish-after=8 result=done")
    await world.create_session("chat", mode="chat", prompt="heartbeat")
    # All at once: a task must be seen running before it finishes, even on a loaded machine.
    await asyncio.gather(*(world.until_running(sid) for sid in (*sorted(before), "chat")))

    dead = master_of(cluster, keys.INDEX)
    dead.process.kill()  # kill -9, mid-run: the tasks are still working
    dead.process.wait(timeout=5)
    # And a replica of another master: the client must stop counting on a node that is gone.
    lost_replica = next(r for r in cluster.replicas if _replica_of(cluster, r) != dead.port)
    lost_replica.process.kill()
    lost_replica.process.wait(timeout=5)

    # Not world.until: its phase bookkeeping reads Redis, which is down for a moment here.
    async with asyncio.timeout(30):
        while not await asyncio.to_thread(promoted, cluster, dead):
            await asyncio.sleep(0.1)

    after = {"a0", "a1"}
    for sid in sorted(after):
        async with asyncio.timeout(20):
            while True:
                try:
                    await world.create_session(sid, prompt="finish-after=0.5 result=done")
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.1)  # the client is still learning the new topology

    for sid in sorted(before | after):
        await world.until_phase(sid, Phase.SUCCEEDED, timeout=120)
    assert await world.phase("chat") is Phase.RUNNING
    await world.assert_invariants(before | after | {"chat"}, timeout=60)
    for sid in (*sorted(before | after), "chat"):
        assert len(world.machines(sid, live=False)) >= 1
        assert len(world.machines(sid)) <= 1
