"""The leader lease in Redis: the store half of :mod:`controller.leader` (which owns the timing).

The lease is one key (:data:`api.keys.LEADER`) holding ``<holder>/<token>`` with a TTL. Taking it
also ``INCR``s the fence counter (:data:`api.keys.LEADER_FENCE`) in the same script, so every term
has a token larger than every earlier one; renew and release act only while the key still holds
the caller's value, so a holder that lost the lease can neither extend nor drop another's. Both
keys carry the hash tag ``{leader}``: one slot, so the script runs on Redis Cluster too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis.exceptions as redis_errors

from api import keys
from api.store_base import StoreBase, StoreUnavailable, unavailable_on_redis_error

# KEYS: lease, fence. ARGV: holder id, ttl ms. Returns {token, ""} when taken, {0, current} when held.
_ACQUIRE_LUA = """
local current = redis.call('GET', KEYS[1])
if current then return {0, current} end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. token, 'PX', ARGV[2])
return {token, ''}
"""

# KEYS: lease. ARGV: our value, ttl ms. 1 renewed, 0 not ours any more.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: our value. 1 released, 0 not ours.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


@contextlib.contextmanager
def _lease_errors() -> Iterator[None]:
    """Any Redis error of a lease call (a read-only replica, a script error) is an outage to the
    elector: it keeps campaigning instead of dying."""
    try:
        yield
    except redis_errors.RedisError as exc:
        raise StoreUnavailable(f"leader lease: {type(exc).__name__}") from exc


class LeaderLease(StoreBase):
    """Take, renew and release the controller leader lease (part of the controller's store)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire = self._redis.register_script(_ACQUIRE_LUA)
        self._renew = self._redis.register_script(_RENEW_LUA)
        self._release = self._redis.register_script(_RELEASE_LUA)

    @unavailable_on_redis_error
    async def acquire_lease(self, holder_id: str, ttl_ms: int) -> tuple[int, str]:
        """Take the lease if free: ``(token, "")``, the term's fencing token; else ``(0, current value)``."""
        with _lease_errors():
            reply = await self._acquire(keys=[keys.LEADER, keys.LEADER_FENCE], args=[holder_id, ttl_ms])
        return int(reply[0]), str(reply[1])

    @unavailable_on_redis_error
    async def renew_lease(self, value: str, ttl_ms: int) -> bool:
        """Extend the lease if it still holds ``value``; False when another holder has it."""
        with _lease_errors():
            return int(await self._renew(keys=[keys.LEADER], args=[value, ttl_ms])) == 1

    @unavailable_on_redis_error
    async def release_lease(self, value: str) -> bool:
        """Give the lease back if it still holds ``value``."""
        with _lease_errors():
            return int(await self._release(keys=[keys.LEADER], args=[value])) == 1
