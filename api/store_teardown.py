"""Session removal: the controller's teardown half of the store.

Removing a session must take every one of its keys with it, in one step:

* The session's keys are a fixed set (:func:`api.keys.session_fixed_keys`: the record, heartbeat,
  event and inbox streams, launch record, token, ...) plus the ones writers create on the fly
  (transcripts), which every such writer records in the session's key registry
  (:func:`api.keys.session_registry`) in the same transaction that creates them.
* One Lua script deletes the fixed keys, every registered key and the registry: no SCAN of the
  keyspace, no half-removed session. All of those keys share the ``{<id>}`` hash tag, so they sit
  in one slot, on a single node and on Redis Cluster alike.
* The global records around it are separate commands (other slots), in crash-safe order: the
  script first, then the id leaves the index (and is put back should a racing create have written
  the hash meanwhile, see :mod:`api.store`), then the ``removed`` change. A crash after the script
  leaves an index entry without a session, which readers skip and the resync drops; before the
  change, a lost early wake-up only.

The registry is written only by the control plane (agents reach their state through the gateway's
channel, never Redis), and the script still deletes only members that carry the session's own
prefix. Those members are not declared in ``KEYS`` (they are known only once the script reads the
registry), which Redis allows because they share the registry's hash tag, hence its slot.

There are no per-session Redis users any more: a machine holds one per-session token (minted and
revoked by :class:`api.store_tokens.SessionTokens`, deleted here with the session's other keys).
"""

from __future__ import annotations

from typing import Any

from api import keys
from api.store_base import StoreBase, unavailable_on_redis_error

# KEYS: registry, fixed per-session keys... (one slot). ARGV: the session's key prefix.
# Returns the number of keys named for deletion.
_REMOVE_LUA = """
local doomed = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if string.sub(key, 1, #ARGV[1]) == ARGV[1] then table.insert(doomed, key) end
end
for i = 2, #KEYS do table.insert(doomed, KEYS[i]) end
table.insert(doomed, KEYS[1])
for i = 1, #doomed, 500 do
  redis.call('DEL', unpack(doomed, i, math.min(i + 499, #doomed)))
end
return #doomed
"""


class SessionTeardown(StoreBase):
    """The atomic removal of a session (controller only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remove = self._redis.register_script(_REMOVE_LUA)

    @unavailable_on_redis_error
    async def remove(self, session_id: str) -> int:
        """Remove the record and every key of the session, atomically; the number of keys named.

        The order of the separate writes is the module docstring's.
        """
        reply = await self._remove(
            keys=[keys.session_registry(session_id), *keys.session_fixed_keys(session_id)],
            args=[keys.session_key_prefix(session_id)],
        )
        await self._redis.zrem(keys.INDEX, session_id)
        if await self._redis.exists(keys.session(session_id)):
            # A create of the same id slipped in after the script: keep the new session listed.
            await self._redis.zadd(keys.INDEX, {session_id: 0})
        await self._redis.xadd(
            keys.CHANGES, {"id": session_id, "kind": "removed"}, maxlen=self.changes_maxlen, approximate=True
        )
        return int(reply)

    @unavailable_on_redis_error
    async def server_identity(self) -> tuple[str, float]:
        """``(run_id, uptime_seconds)`` of the Redis server: a new run id means a restarted server.

        On a cluster: every node's run id, joined (any node that restarted, or joined, changes it),
        and the shortest uptime.
        """
        if not self.cluster:
            info = await self._redis.info("server")
            return str(info.get("run_id", "")), float(info.get("uptime_in_seconds", 0))
        # Nodes passed explicitly: redis-py 8.1 looks for a key in INFO given only a node flag.
        await self._redis.initialize()
        nodes = self._redis.get_nodes()
        replies = await self._redis.info("server", target_nodes=nodes)
        infos = [dict(replies)] if len(nodes) == 1 else [dict(info) for info in replies.values()]
        run_id = ",".join(sorted(str(info.get("run_id", "")) for info in infos))
        return run_id, min(float(info.get("uptime_in_seconds", 0)) for info in infos)
