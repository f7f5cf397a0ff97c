"""Session removal: the controller's teardown half of the store.

Removing a session must take every one of its keys with it, in one step:

* The session's keys are a fixed set (:func:`api.keys.session_fixed_keys`: the record, heartbeat,
  event and inbox streams, launch record, token, ...) plus the ones writers create on the fly
  (transcripts), which every such writer records in the session's key registry
  (:func:`api.keys.session_registry`) in the same transaction that creates them.
* One Lua script deletes the fixed keys, every registered key and the registry, drops the id from
  the index and appends the ``removed`` change: no SCAN of the keyspace, no half-removed session.

The registry is written only by the control plane (agents reach their state through the gateway's
channel, never Redis), and the script still deletes only members that carry the session's own
prefix. Those members are not declared in ``KEYS`` (they are known only once the script reads the
registry), which Redis allows because they share the registry's hash tag, hence its slot; the
index and the change feed are global keys in the same script, the same single-Redis assumption as
the API's ``apply`` (see :mod:`api.store`).

There are no per-session Redis users any more: a machine holds one per-session token (minted and
revoked by :class:`api.store_tokens.SessionTokens`, deleted here with the session's other keys).
"""

from __future__ import annotations

from typing import Any

from api import keys
from api.store_base import StoreBase, unavailable_on_redis_error

# KEYS: registry, index, changes, fixed per-session keys...
# ARGV: id, changes maxlen, the session's key prefix. Returns the number of keys named for deletion.
_REMOVE_LUA = """
local doomed = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if string.sub(key, 1, #ARGV[3]) == ARGV[3] then table.insert(doomed, key) end
end
for i = 4, #KEYS do table.insert(doomed, KEYS[i]) end
table.insert(doomed, KEYS[1])
for i = 1, #doomed, 500 do
  redis.call('DEL', unpack(doomed, i, math.min(i + 499, #doomed)))
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'id', ARGV[1], 'kind', 'removed')
return #doomed
"""


class SessionTeardown(StoreBase):
    """The atomic removal of a session (controller only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remove = self._redis.register_script(_REMOVE_LUA)

    @unavailable_on_redis_error
    async def remove(self, session_id: str) -> int:
        """Remove the record and every key of the session, atomically; the number of keys named."""
        reply = await self._remove(
            keys=[
                keys.session_registry(session_id),
                keys.INDEX,
                keys.CHANGES,
                *keys.session_fixed_keys(session_id),
            ],
            args=[session_id, self.changes_maxlen, keys.session_key_prefix(session_id)],
        )
        return int(reply)

    @unavailable_on_redis_error
    async def server_identity(self) -> tuple[str, float]:
        """``(run_id, uptime_seconds)`` of the Redis server: a new run id means a restarted server."""
        info = await self._redis.info("server")
        return str(info.get("run_id", "")), float(info.get("uptime_in_seconds", 0))
