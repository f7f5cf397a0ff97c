"""Pool slots, the gateway's half of the handoff: a waiting pool agent's booted mark and assignment.

Mixed into :class:`api.store_channel.ChannelStore` (the agent channel serves the pool routes,
:mod:`gateway.pool_routes`). Every key carries the pool's hash tag, so each script stays in one
cluster slot. The controller's half is :mod:`api.store_pool_handoff`.

* :meth:`PoolSlots.pool_slot_digest` - the stored digest the route compares a slot token with;
* :meth:`PoolSlots.mark_pool_booted` - the slot's agent is booted (``keys.pool_booted``: slot ->
  time), written only while the slot's token exists, so a late mark never re-creates a key of a
  pool the controller has removed;
* :meth:`PoolSlots.take_pool_assignment` - one script: if the slot's token is still the one
  presented, ``GETDEL`` the assignment and, when there was one, delete the slot token. The session
  token in it crosses Redis once; from then on the machine's slot token opens nothing;
* :meth:`PoolSlots.pool_assignment_wakes` - the assignments announced, as ``(pool, slot)``, from
  one pattern subscription per gateway process (a hint: the waiter's agent takes the key itself).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from api import keys
from api.models import utcnow
from api.store_base import StoreBase, StoreUnavailable, unavailable_on_redis_error

# KEYS: booted hash, slot token. ARGV: slot, time. Writes only while the slot's token exists.
_BOOTED_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: assignment, slot token. ARGV: the presented token's digest.
# Returns the assignment JSON (and revokes the slot token), false when none, -1 when revoked.
_TAKE_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local body = redis.call('GETDEL', KEYS[1])
if body then redis.call('DEL', KEYS[2]) end
return body
"""


@dataclass(frozen=True)
class PoolAssignment:
    """The session a claimed slot now serves. ``session_token`` is a secret (``repr`` hides it)."""

    session_id: str
    session_token: str
    env: dict[str, str]

    def __repr__(self) -> str:
        return f"PoolAssignment(session_id={self.session_id!r}, session_token='***', env=<{len(self.env)}>)"

    __str__ = __repr__


class SlotRevoked(Exception):
    """The slot's token was revoked (or replaced) between the route's check and the take."""


class PoolSlots(StoreBase):
    """The gateway's pool-slot operations (the agent channel's pool routes)."""

    def __init__(self, redis: aioredis.Redis, **kwargs: Any) -> None:
        super().__init__(redis, **kwargs)
        self._booted = redis.register_script(_BOOTED_LUA)
        self._take = redis.register_script(_TAKE_LUA)

    @unavailable_on_redis_error
    async def pool_slot_digest(self, pool: str, slot: str) -> str | None:
        digest = await self._redis.get(keys.pool_slot_token(pool, slot))
        return str(digest) if digest else None

    @unavailable_on_redis_error
    async def mark_pool_booted(self, pool: str, slot: str) -> bool:
        """Record that the slot's agent is booted and waiting; False when the slot is revoked."""
        written = await self._booted(
            keys=[keys.pool_booted(pool), keys.pool_slot_token(pool, slot)],
            args=[slot, utcnow().isoformat()],
        )
        return bool(written)

    @unavailable_on_redis_error
    async def take_pool_assignment(self, pool: str, slot: str, token_digest: str) -> PoolAssignment | None:
        """The slot's assignment, taken once (None: not assigned yet); :class:`SlotRevoked` if the
        token presented is no longer the slot's."""
        reply = await self._take(
            keys=[keys.pool_assignment(pool, slot), keys.pool_slot_token(pool, slot)], args=[token_digest]
        )
        if reply == -1:
            raise SlotRevoked(f"slot {slot} of pool {pool} was revoked")
        if not reply:
            return None
        body = json.loads(reply)
        return PoolAssignment(
            session_id=str(body["sessionId"]),
            session_token=str(body["sessionToken"]),
            env={str(k): str(v) for k, v in dict(body.get("env") or {}).items()},
        )

    async def pool_assignment_wakes(self) -> AsyncGenerator[tuple[str, str] | None]:
        """``(pool, slot)`` of each assignment as it is announced (until an error).

        ``None`` items are ticks: the first says the subscription is in place (an assignment
        written after it is announced to this iterator), later ones that a second went by without
        news (so the caller may stop listening). Fire-and-forget like the controller's wake
        channel; on Redis Cluster one node's ``PSUBSCRIBE`` hears every node's ``PUBLISH``. Any
        Redis error ends the iteration with :class:`StoreUnavailable`; the caller resubscribes.
        """
        prefix = keys.POOL_ASSIGNED_PATTERN[:-1]
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(keys.POOL_ASSIGNED_PATTERN)
            yield None
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None or message.get("type") != "pmessage":
                    yield None
                    continue
                channel = str(message.get("channel", ""))
                if channel.startswith(prefix):
                    pool, _, slot = channel[len(prefix) :].rpartition(":")
                    yield (pool, slot)
        except (redis_errors.RedisError, OSError) as exc:
            raise StoreUnavailable("the pool assignment subscription failed") from exc
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
