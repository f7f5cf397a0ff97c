"""The controller's triggers hold a fixed number of Redis connections, however many sessions there are.

The change feed is one blocking ``XREAD`` on ``fs:changes`` (on the store's blocking pool) and the
wake-ups are one ``PSUBSCRIBE fs:wake:*``; neither is per session. This test wakes hundreds of
sessions through both triggers and counts, in Redis's own ``CLIENT LIST``, what the controller holds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from api import keys
from api.store_pools import DEFAULT_POOL_SIZE
from tests.controller.world import World

pytestmark = pytest.mark.timeout(60)


async def _clients(redis: aioredis.Redis) -> list[dict[str, Any]]:
    return [c for c in await redis.client_list() if c.get("cmd") != "client|list"]


def _blocked_on_changes(clients: list[dict[str, Any]]) -> int:
    return sum(1 for c in clients if c.get("cmd") == "xread" and "b" in str(c.get("flags", "")))


def _subscribed(clients: list[dict[str, Any]]) -> int:
    return sum(1 for c in clients if int(c.get("psub", 0) or 0) > 0)


async def test_triggers_hold_one_connection_each_whatever_the_number_of_sessions(
    world: World, redis_client: aioredis.Redis
) -> None:
    baseline = len(await _clients(redis_client))
    await world.start_controller()
    counts: list[int] = []
    for sessions in (10, 1200):
        for i in range(sessions):
            sid = f"ghost-{sessions}-{i}"
            # Both triggers fire for every one of them (the ids have no record: nothing is launched).
            await redis_client.xadd(keys.CHANGES, {"id": sid, "kind": "message"})
            await redis_client.publish(keys.wake_channel(sid), "idle")
        async with asyncio.timeout(20):
            while True:
                clients = await _clients(redis_client)
                if _blocked_on_changes(clients) == 1 and _subscribed(clients) == 1:
                    break
                await asyncio.sleep(0.05)
        counts.append(len(clients) - baseline)
    # At every size: one change-feed reader, one subscription, and at most the command pool besides
    # (a connection per session would be 1 200 here; measured: between 6 and 19 at either size).
    assert max(counts) <= DEFAULT_POOL_SIZE + 2
