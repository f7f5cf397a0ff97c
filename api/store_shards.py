"""Controller shards in Redis: one fenced lease per shard and the replicas' membership record.

The store half of :mod:`controller.shards` (which owns the timing and the balancing). Each shard
``n`` has a lease key and a fence counter sharing the hash tag ``{shard:n}``
(:func:`api.keys.shard_lease`, :func:`api.keys.shard_fence`), so taking a shard (``GET``, ``INCR``,
``SET NX PX`` in one script) stays inside one Redis Cluster slot; the scripts are the leader lease's
(:mod:`api.store_lease`) run on a shard's keys.

Membership is one sorted set (:data:`api.keys.CONTROLLER_MEMBERS`): replica id -> expiry in Redis
server time (ms). A replica re-announces itself every retry period; a dead one drops out when its
expiry passes. The script reads ``TIME`` on the server, so replicas' clocks need not agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from api import keys
from api.store_base import StoreBase, unavailable_on_redis_error
from api.store_lease import _ACQUIRE_LUA, _RELEASE_LUA, _RENEW_LUA, _lease_errors

# KEYS: members zset. ARGV: replica id, ttl ms. Returns the live replica ids (expired ones removed).
_ANNOUNCE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class ShardLeases(StoreBase):
    """Take, renew and release controller shard leases; announce a replica (controller store part)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shard_acquire = self._redis.register_script(_ACQUIRE_LUA)
        self._shard_renew = self._redis.register_script(_RENEW_LUA)
        self._shard_release = self._redis.register_script(_RELEASE_LUA)
        self._announce = self._redis.register_script(_ANNOUNCE_LUA)

    @unavailable_on_redis_error
    async def acquire_shard(self, shard: int, holder_id: str, ttl_ms: int) -> tuple[int, str]:
        """Take shard ``shard`` if free: ``(token, "")``; else ``(0, current value)``."""
        with _lease_errors():
            reply = await self._shard_acquire(
                keys=[keys.shard_lease(shard), keys.shard_fence(shard)], args=[holder_id, ttl_ms]
            )
        return int(reply[0]), str(reply[1])

    @unavailable_on_redis_error
    async def renew_shards(self, values: dict[int, str], ttl_ms: int) -> dict[int, bool]:
        """Extend each shard's lease that still holds its value; ``{shard: renewed}``.

        One script call per shard, sent together: a shard's keys live in their own cluster slot.
        """
        shards = sorted(values)

        async def renew(shard: int) -> bool:
            with _lease_errors():
                reply = await self._shard_renew(keys=[keys.shard_lease(shard)], args=[values[shard], ttl_ms])
            return int(reply) == 1

        results = await asyncio.gather(*(renew(s) for s in shards))
        return dict(zip(shards, results, strict=True))

    @unavailable_on_redis_error
    async def release_shard(self, shard: int, value: str) -> bool:
        """Give shard ``shard`` back if its lease still holds ``value``."""
        with _lease_errors():
            return int(await self._shard_release(keys=[keys.shard_lease(shard)], args=[value])) == 1

    @unavailable_on_redis_error
    async def shard_holders(self, shards: Sequence[int]) -> dict[int, str | None]:
        """Who holds each shard (``<replica id>/<token>``), None when free; for status and tests."""
        values = await asyncio.gather(*(self._redis.get(keys.shard_lease(s)) for s in shards))
        return {s: (str(v) if v else None) for s, v in zip(shards, values, strict=True)}

    @unavailable_on_redis_error
    async def announce_member(self, replica_id: str, ttl_ms: int) -> list[str]:
        """Say this replica is alive for ``ttl_ms`` more; the ids of every live replica, sorted."""
        with _lease_errors():
            reply = await self._announce(keys=[keys.CONTROLLER_MEMBERS], args=[replica_id, ttl_ms])
        return sorted(str(x) for x in reply)

    @unavailable_on_redis_error
    async def leave_members(self, replica_id: str) -> None:
        """Drop this replica from the membership at once (a graceful stop)."""
        await self._redis.zrem(keys.CONTROLLER_MEMBERS, replica_id)
