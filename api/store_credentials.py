"""Per-session Redis users and session removal: the controller's teardown half of the store.

Each session's agent connects as its own ACL user, which reaches only ``fs:{<id>}:*`` and its wake
channel. Removing a session must take every one of its keys *and* that user with it:

* **The keys, in one step.** The session's keys are a fixed set (:func:`api.keys.session_fixed_keys`)
  plus the ones writers create on the fly (transcripts), which every such writer records in the
  session's key registry (:func:`api.keys.session_registry`) in the same transaction that creates
  them. One Lua script deletes the fixed keys, every registered key and the registry: no SCAN of
  the keyspace, no half-removed session. All of those keys share the ``{<id>}`` hash tag, so they
  sit in one slot, on a single node and on Redis Cluster alike.
* **The global records around it, in crash-safe order** (each its own command, other slots):
  the id joins the finalizer set :data:`api.keys.ACL_PENDING_DELETE` *first*, then the script
  deletes the keys, then the id leaves the index (and is put back should a racing create have
  written the hash meanwhile, see :mod:`api.store`), then the ``removed`` change. A crash after
  the marker leaves a session whose removal the controller simply repeats; after the script, an
  index entry without a session, which readers skip and the resync drops; before the change, a
  lost early wake-up only.
* **The user survives a Redis restart.** Redis keeps ACL users in memory only (``ACL SETUSER``
  is not in the AOF), so the SHA-256 of each agent's password is kept in the global hash
  :data:`api.keys.CREDENTIALS` - out of reach of every session's own user - and
  :meth:`SessionTeardown.restore_session_credentials` re-creates the users whenever the
  controller sees a new server.
* **The user, eventually for sure.** ``ACL DELUSER`` cannot run inside a script, so the id waits
  in :data:`api.keys.ACL_PENDING_DELETE` (a finalizer, as Kubernetes has them) until the user is
  deleted, and leaves the set only once it is; a crash in between leaves the id there, and
  :meth:`SessionTeardown.finish_credential_deletions` (every resync pass) deletes the user then.
  Creating credentials for the id again clears a stale marker, since ``ACL SETUSER ... reset``
  already invalidates the old password.
* **Every node.** ACL users are per node and not replicated: on Redis Cluster every ``SETUSER`` and
  ``DELUSER`` goes to every node, replicas included, so a replica promoted by a failover already
  knows every agent; :meth:`SessionTeardown.server_identity` combines the run ids of every node, so
  a node that restarted (and forgot its users) makes the controller restore them everywhere. The
  control plane's own credentials (the ``default`` user's password, ``requirepass``) are node
  configuration and must be the same on every node (``masterauth`` too, for replication).

The registry is writable by the session's own user; the script deletes only members that carry
the session's own prefix, so a hostile agent cannot make the controller delete anyone else's keys.
Those members are not declared in ``KEYS`` (they are known only once the script reads the
registry), which Redis allows because they share the registry's hash tag, hence its slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
from typing import Any

import redis.exceptions as redis_errors

from api import keys
from api.models import SessionCredentials
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
    """Per-session credentials and the atomic removal of a session (controller only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remove = self._redis.register_script(_REMOVE_LUA)

    # -- removal ----------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def remove(self, session_id: str) -> None:
        """Remove the record and every key of the session, then its Redis user (finalization)."""
        await self.remove_keys(session_id)
        await self.delete_session_credentials(session_id)

    @unavailable_on_redis_error
    async def remove_keys(self, session_id: str) -> int:
        """Step one of :meth:`remove`: every key, atomically, leaving the user's deletion pending.

        The order of the separate writes is the module docstring's.
        """
        await self._redis.sadd(keys.ACL_PENDING_DELETE, session_id)
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
    async def finish_credential_deletions(self) -> list[str]:
        """Delete the users of removed sessions whose deletion did not finish (a crash, an outage)."""
        pending = sorted(str(sid) for sid in await self._redis.smembers(keys.ACL_PENDING_DELETE))
        for session_id in pending:
            await self.delete_session_credentials(session_id)
        return pending

    # -- per-session credentials ------------------------------------------------------------------

    @unavailable_on_redis_error
    async def acl_supported(self) -> bool:
        try:
            await self._on_one_node("ACL", "WHOAMI")
        except redis_errors.ResponseError:
            return False
        return True

    async def _cluster_nodes(self) -> list[Any]:
        """Every node the cluster client knows (masters and replicas), topology loaded first.

        Nodes are passed explicitly: redis-py 8.1 still looks for a key in ``ACL``/``INFO``
        commands when given only a node flag such as ``ALL_NODES``.
        """
        await self._redis.initialize()
        return list(self._redis.get_nodes())

    async def _on_one_node(self, *command: str) -> Any:
        if not self.cluster:
            return await self._redis.execute_command(*command)
        await self._redis.initialize()  # the topology, should this be the client's first command
        try:
            return await self._redis.execute_command(
                *command, target_nodes=random.choice(self._redis.get_primaries())
            )
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            await self._redis.nodes_manager.initialize()  # a master that died: learn who serves now
            return await self._redis.execute_command(
                *command, target_nodes=random.choice(self._redis.get_primaries())
            )

    async def _on_every_node(self, *command: str) -> list[Any]:
        """Run a node-local command (ACL) on every node: the one of a single Redis, each of a cluster."""
        if not self.cluster:
            return [await self._redis.execute_command(*command)]
        failed: list[BaseException] = []
        for attempt in range(2):
            nodes = await self._cluster_nodes()
            replies = await asyncio.gather(
                *(self._redis.execute_command(*command, target_nodes=node) for node in nodes),
                return_exceptions=True,
            )
            failed = [r for r in replies if isinstance(r, BaseException)]
            if not failed:
                return replies
            unreachable = all(
                isinstance(r, (redis_errors.ConnectionError, redis_errors.TimeoutError)) for r in failed
            )
            if not unreachable or attempt == 1:
                raise failed[0]
            # A node the client still lists is gone (a dead replica, a failed-over master): learn
            # the topology again - the cluster drops a node it marked failed - and try once more.
            # Still failing: an outage for this call (the node is not yet marked failed); the users
            # of a node that comes back are restored when its new run id is seen (server_identity).
            await self._redis.nodes_manager.initialize()
        raise failed[0]

    async def _nodes_info(self) -> list[dict[str, Any]]:
        if not self.cluster:
            return [dict(await self._redis.info("server"))]
        nodes = await self._cluster_nodes()
        replies = await self._redis.info("server", target_nodes=nodes)
        if len(nodes) == 1:
            return [dict(replies)]
        return [dict(info) for info in replies.values()]

    @unavailable_on_redis_error
    async def ensure_session_credentials(self, session_id: str) -> SessionCredentials | None:
        """(Re)create the session's Redis user with a fresh password; None without ACL support.

        The user reaches only ``fs:{<id>}:*`` keys and its own wake channel, and cannot run admin
        or dangerous commands. A fresh password per launch means a replaced machine's credentials
        stop working the moment a new machine is launched.
        """
        if not await self.acl_supported():
            return None
        username = keys.acl_user(session_id)
        password = secrets.token_urlsafe(24)
        digest = hashlib.sha256(password.encode()).hexdigest()
        # The durable copy first: should we die between the two, a restore re-creates the user with
        # the password the machine will be given, never an older one.
        await self._redis.hset(keys.CREDENTIALS, session_id, digest)
        try:
            await self._on_every_node(*_acl_setuser(session_id, digest))
        except redis_errors.ResponseError:
            return None
        # A marker left by an earlier removal of this id is moot: ``reset`` dropped the old password.
        await self._redis.srem(keys.ACL_PENDING_DELETE, session_id)
        return SessionCredentials(username=username, password=password)

    @unavailable_on_redis_error
    async def restore_session_credentials(self) -> int:
        """Re-create every per-session ACL user from its durable password hash; returns how many.

        Redis keeps ACL users in memory only: after a restart (graceful or not) every agent's
        credentials are gone although its session lives on in the AOF. The controller calls this
        whenever the server it talks to is new (see :meth:`server_identity`); ``ACL SETUSER`` is
        idempotent, so repeating it is harmless. Users of sessions being removed are not restored.
        """
        if not await self.acl_supported():
            return 0
        digests = await self._redis.hgetall(keys.CREDENTIALS)
        pending = {str(sid) for sid in await self._redis.smembers(keys.ACL_PENDING_DELETE)}
        live = {str(sid): str(d) for sid, d in digests.items() if str(sid) not in pending}
        if not live:
            return 0
        if self.cluster:
            # A cluster pipeline cannot aim at every node; bounded concurrency instead.
            restored = 0
            items = list(live.items())
            for start in range(0, len(items), 100):
                chunk = items[start : start + 100]
                results = await asyncio.gather(
                    *(self._on_every_node(*_acl_setuser(sid, digest)) for sid, digest in chunk),
                    return_exceptions=True,
                )
                restored += sum(1 for r in results if not isinstance(r, BaseException))
            return restored
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id, digest in live.items():
                pipe.execute_command(*_acl_setuser(session_id, digest))
            results = await pipe.execute(raise_on_error=False)
        return sum(1 for r in results if not isinstance(r, Exception))

    @unavailable_on_redis_error
    async def server_identity(self) -> tuple[str, float]:
        """``(run_id, uptime_seconds)`` of the Redis server: a new run id means a restarted server.

        On a cluster: every node's run id, joined (any node that restarted, or joined, changes it),
        and the shortest uptime.
        """
        infos = await self._nodes_info()
        run_id = ",".join(sorted(str(info.get("run_id", "")) for info in infos))
        return run_id, min(float(info.get("uptime_in_seconds", 0)) for info in infos)

    @unavailable_on_redis_error
    async def delete_session_credentials(self, session_id: str) -> None:
        """Delete the session's Redis user (no-op when absent) and clear its pending-delete marker."""
        try:
            await self._on_every_node("ACL", "DELUSER", keys.acl_user(session_id))
        except redis_errors.ResponseError:
            pass  # no ACL support: there is no user to delete
        await self._redis.hdel(keys.CREDENTIALS, session_id)
        # Only now, with the user gone, is the removal's finalizer done.
        await self._redis.srem(keys.ACL_PENDING_DELETE, session_id)


def _acl_setuser(session_id: str, password_sha256: str) -> tuple[str, ...]:
    """The ``ACL SETUSER`` of a session's agent: its own keys and wake channel, no admin commands."""
    return (
        "ACL",
        "SETUSER",
        keys.acl_user(session_id),
        "reset",
        "resetchannels",
        "on",
        f"#{password_sha256}",
        f"~{keys.session_key_pattern(session_id)}",
        f"&{keys.wake_channel(session_id)}",
        "+@all",
        "-@dangerous",
        "-@admin",
        # A cluster client learns the topology from any node; read-only, and harmless on one node.
        "+cluster|slots",
        "+cluster|nodes",
    )
