"""The controller's store: what one reconcile needs from Redis, and the leader lease.

A role of the store (see :mod:`api.store_base`): batched reads of sessions, heartbeats, launch
records and inbox depth; the status write, fenced by the leader's token; launch records written
*before* a Fly create; the change feed and the agents' wake channel (the early triggers); the
controller-seen record; the per-session gateway tokens (:class:`api.store_tokens.SessionTokens`:
minted per launch, revoked at the end); the leader lease (:class:`api.store_lease.LeaderLease`, which
:mod:`controller.leader` drives); the shard leases and membership (:class:`api.store_shards.ShardLeases`,
which :mod:`controller.shards` drives); and session removal (:class:`api.store_teardown.SessionTeardown`).

**Fencing is per session** (one hash slot, so it holds on Redis Cluster). ``write_status`` takes
``fence=(fence_key, token)`` from the lease the caller holds for the session (the leader's, or a
shard's). The script cannot read ``fence_key`` (another slot), so the guarantee is split in two:

* atomically, in the session's own hash: the field ``fence:<fence_key>`` keeps the highest token
  that ever wrote the status; a write with a lower token is refused. Once a newer lease holder has
  written a session, an older one never can again; tokens only grow (``INCR``);
* just before, a plain ``GET`` of ``fence_key``: a write whose token is no longer the current one
  is refused even when the newer holder has not written this session yet. That check and the
  script are two commands, so it narrows the window to one round trip rather than closing it;
  the lease itself (a holder stops acting before its lease can expire) is the first line.

``write_status`` validates the status it is given before writing it: a status built around the
model's validation (``model_copy(update=...)``, ``model_construct``) with a phase or a reason
outside :class:`api.models.Phase` / :class:`api.models.Reason` is refused, never stored.
"""

from __future__ import annotations

import builtins
import contextlib
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from api import keys
from api.models import Heartbeat, Session, SessionStatus, utcnow
from api.store_base import (
    OUTBOX_MAXLEN,
    EventWrites,
    SessionIndexReads,
    StoreUnavailable,
    unavailable_on_redis_error,
)
from api.store_lease import LeaderLease
from api.store_pool_claims import PoolClaims
from api.store_pool_claims import PoolMachineRecord as PoolMachineRecord
from api.store_pool_claims import PoolMachineState as PoolMachineState
from api.store_pool_claims import PoolState as PoolState
from api.store_pool_handoff import PoolHandoff
from api.store_shards import ShardLeases
from api.store_teardown import SessionTeardown
from api.store_tokens import SessionTokens
from api.store_volumes import SessionVolumes
from api.store_webhook_queue import ClaimedDelivery as ClaimedDelivery
from api.store_webhook_queue import NewDelivery as NewDelivery
from api.store_webhook_queue import OutboxEntry as OutboxEntry
from api.store_webhook_queue import StoredWebhook as StoredWebhook
from api.store_webhook_queue import WebhookQueue
from api.store_webhook_queue import outbox_data as outbox_data

StatusWrite = Literal["written", "missing", "refused", "fenced"]

# KEYS: session hash, webhook outbox, notices hash. ARGV: status json, new phase, fence field ('' for
# none), fence token, now (ISO), outbox maxlen, then (notice type, notice data json) pairs.
# Returns 1 written, 0 missing, -1 refused (finished session), -2 fenced out (a newer token wrote).
# A phase change and each notice not sent before go on the outbox in the same step as the status
# (api/store_webhook_queue.py): a crash can lose neither the change nor its webhook.
_STATUS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local token = nil
if ARGV[3] ~= '' then
  token = tonumber(ARGV[4])
  local seen = tonumber(redis.call('HGET', KEYS[1], ARGV[3]) or '0')
  if token < seen then return -2 end
end
local cur = redis.call('HGET', KEYS[1], 'status')
local old = 'Pending'
if cur then
  old = cjson.decode(cur)['phase']
  if (old == 'Succeeded' or old == 'Failed') and ARGV[2] ~= old and ARGV[2] ~= 'Terminating' then
    return -1
  end
end
if token then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if old ~= ARGV[2] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'kind', 'phase', 'from', old, 'to', ARGV[2],
    'status', ARGV[1], 'at', ARGV[5], 'agent', redis.call('HGET', KEYS[1], 'agent') or '',
    'usage', redis.call('HGET', KEYS[1], 'usage') or '')
end
for i = 7, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[5]) == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'kind', 'notice', 'type', ARGV[i],
      'at', ARGV[5], 'data', ARGV[i + 1])
  end
end
return 1
"""


@dataclass(frozen=True)
class Change:
    """One entry of the change feed: a session's (``session_id``) or a pool's (``pool``, and no session)."""

    entry_id: str
    session_id: str
    kind: str
    pool: str | None = None


class ControllerStore(
    SessionIndexReads,
    EventWrites,
    SessionTeardown,
    SessionTokens,
    SessionVolumes,
    LeaderLease,
    ShardLeases,
    PoolHandoff,
    PoolClaims,
    WebhookQueue,
):
    """Async access for the controller. One instance per process, shared by all tasks."""

    def __init__(self, redis: aioredis.Redis, **kwargs: Any) -> None:
        super().__init__(redis, **kwargs)
        self._status = redis.register_script(_STATUS_LUA)

    # -- status -----------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def write_status(
        self,
        session_id: str,
        status: SessionStatus,
        *,
        fence: tuple[str, int] | None = None,
        notices: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> StatusWrite:
        """Write the controller-owned status (only the controller calls this).

        ``fence`` is ``(fence_key, token)``: the write happens only while that key still holds the
        token and no larger token of that key has written this session (see the module
        docstring), so a controller that lost its lease cannot write after a newer holder.
        The status is validated first (:meth:`SessionStatus.checked`): an invalid one raises
        ``ValueError`` and nothing is written.

        A phase change, and each of ``notices`` (``(webhook event type, data)``, sent once per
        session) go on the session's webhook outbox in the same script as the status.
        """
        status = status.checked()
        fence_args = ["", ""]
        if fence is not None:
            fence_key, token = fence
            if await self._redis.get(fence_key) != str(token):
                return "fenced"
            fence_args = [keys.session_fence_field(fence_key), str(token)]
        args: list[Any] = [
            status.model_dump_json(),
            status.phase.value,
            *fence_args,
            utcnow().isoformat(),
            OUTBOX_MAXLEN,
        ]
        for kind, data in notices:
            args += [kind, json.dumps(data)]
        session_keys = [keys.session(session_id), keys.outbox(session_id), keys.session_notices(session_id)]
        code = int(await self._status(keys=session_keys, args=args))
        outcomes: dict[int, StatusWrite] = {
            1: "written",
            0: "missing",
            -1: "refused",
            -2: "fenced",
        }
        return outcomes[code]

    # -- the index ---------------------------------------------------------------------------------

    async def all_sessions(self) -> builtins.list[Session]:
        """Every session, in id order; index entries whose session is gone are dropped on the way.

        Such entries are what a crash between the index write and the session write leaves (see
        :mod:`api.store`); readers skip them, the controller's resync (this read) removes them.
        """
        ids = await self.all_ids()
        sessions = await self.get_many(ids)
        if len(sessions) < len(ids):
            found = {s.id for s in sessions}
            await self.drop_from_index([sid for sid in ids if sid not in found])
        return sessions

    @unavailable_on_redis_error
    async def drop_from_index(self, session_ids: Sequence[str]) -> int:
        """Drop ids whose session hash is missing; put back any that a racing create wrote meanwhile.

        ``ZREM`` then ``EXISTS``: a creation adds the id to the index after writing the hash, so
        whichever of the two runs last, a live session stays indexed (see :mod:`api.store`).
        """
        if not session_ids:
            return 0
        await self._redis.zrem(keys.INDEX, *session_ids)
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.exists(keys.session(sid))
            alive = await pipe.execute()
        back = {sid: 0 for sid, live in zip(session_ids, alive, strict=True) if live}
        if back:
            await self._redis.zadd(keys.INDEX, back)
        return len(session_ids) - len(back)

    # -- heartbeats -------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def get_heartbeat(self, session_id: str) -> Heartbeat | None:
        raw = await self._redis.get(keys.heartbeat(session_id))
        return Heartbeat.model_validate_json(raw) if raw else None

    @unavailable_on_redis_error
    async def heartbeats(self, session_ids: Sequence[str], *, batch: int = 1000) -> dict[str, Heartbeat]:
        """Batched heartbeat read (pipelined GETs: no cross-slot MGET)."""
        found: dict[str, Heartbeat] = {}
        for start in range(0, len(session_ids), batch):
            chunk = session_ids[start : start + batch]
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in chunk:
                    pipe.get(keys.heartbeat(sid))
                raws = await pipe.execute()
            for sid, raw in zip(chunk, raws, strict=True):
                if raw:
                    found[sid] = Heartbeat.model_validate_json(raw)
        return found

    # -- inbox ------------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def inbox_pending(self, session_id: str, *, cap: int = 1000) -> int:
        acked = await self._redis.get(keys.inbox_acked(session_id)) or "0-0"
        entries = await self._redis.xrange(keys.inbox(session_id), min=f"({acked}", max="+", count=cap)
        return len(entries)

    @unavailable_on_redis_error
    async def inbox_pending_many(self, session_ids: Sequence[str]) -> dict[str, int]:
        """Pending counts (0 or 1+, capped at 1) for many sessions in two pipelined round trips."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.get(keys.inbox_acked(sid))
            acked = await pipe.execute()
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid, ack in zip(session_ids, acked, strict=True):
                pipe.xrange(keys.inbox(sid), min=f"({ack or '0-0'}", max="+", count=1)
            found = await pipe.execute()
        return {sid: len(entries) for sid, entries in zip(session_ids, found, strict=True)}

    # -- change feed ------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def last_change_id(self) -> str:
        """The id of the newest change-feed entry (``0-0`` when empty): where a new reader starts."""
        entries = await self._redis.xrevrange(keys.CHANGES, max="+", min="-", count=1)
        return str(entries[0][0]) if entries else "0-0"

    @unavailable_on_redis_error
    async def read_changes(
        self, after_id: str, *, count: int = 1000, block_ms: int | None = None
    ) -> builtins.list[Change]:
        """Entries after ``after_id``; a reader resumes from the last id it saw."""
        if block_ms is None:
            entries = await self._redis.xrange(keys.CHANGES, min=f"({after_id}", max="+", count=count)
        else:
            reply = await self._blocking.xread({keys.CHANGES: after_id}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [
            Change(entry_id=str(eid), session_id=f.get("id", ""), kind=f["kind"], pool=f.get("pool"))
            for eid, f in entries
        ]

    # -- wake channel -----------------------------------------------------------------------------

    async def wake_sessions(self) -> AsyncGenerator[str]:
        """Ids of sessions whose agent announced a report, as they come (until an error).

        Pub/sub is fire-and-forget: it only wakes the loop early, the resync is the truth. Any
        Redis error ends the iteration with :class:`StoreUnavailable`; the caller resubscribes.
        On Redis Cluster the subscription lives on one node: a classic ``PUBLISH`` on any node is
        forwarded to every node over the cluster bus, so one node's ``PSUBSCRIBE`` hears all
        agents; if that node dies the error ends the iteration and the resubscription picks a live one.
        """
        prefix = keys.WAKE_PATTERN[:-1]
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(keys.WAKE_PATTERN)
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None or message.get("type") != "pmessage":
                    continue
                channel = str(message.get("channel", ""))
                if channel.startswith(prefix):
                    yield channel[len(prefix) :]
        except (redis_errors.RedisError, OSError) as exc:
            raise StoreUnavailable("the wake subscription failed") from exc
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    # -- controller bookkeeping -------------------------------------------------------------------

    @unavailable_on_redis_error
    async def record_controller_seen(self, holder_id: str, record: str) -> None:
        """When this controller last finished a pass (for ``flyswarm status``)."""
        await self._redis.hset(keys.CONTROLLER_SEEN, holder_id, record)

    # -- launch records ---------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def record_launch(
        self, session_id: str, launch_id: str, fields: dict[str, str] | None = None
    ) -> None:
        """Record a launch id *before* calling Fly create, so an ambiguous create can be found later."""
        mapping = {"launchId": launch_id, "requestedAt": utcnow().isoformat(), **(fields or {})}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.launch(session_id))
            pipe.hset(keys.launch(session_id), mapping=mapping)
            await pipe.execute()

    @unavailable_on_redis_error
    async def get_launch(self, session_id: str) -> dict[str, str]:
        return dict(await self._redis.hgetall(keys.launch(session_id)))

    @unavailable_on_redis_error
    async def get_launches(self, session_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.hgetall(keys.launch(sid))
            raws = await pipe.execute()
        return {sid: dict(raw) for sid, raw in zip(session_ids, raws, strict=True) if raw}

    @unavailable_on_redis_error
    async def update_launch(self, session_id: str, fields: dict[str, str]) -> None:
        await self._redis.hset(keys.launch(session_id), mapping=fields)

    @unavailable_on_redis_error
    async def record_create_failure(self, session_id: str, reason: str, message: str) -> None:
        """Withdraw the launch (nothing was created) and remember why Fly refused it.

        The record then has no launch id, so it is no expectation; the next ``record_launch``
        replaces it whole, so a success leaves no stale failure behind.
        """
        mapping = {
            "failedAt": utcnow().isoformat(),
            "failureReason": reason,
            "failureMessage": message[:1000],
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.launch(session_id))
            pipe.hset(keys.launch(session_id), mapping=mapping)
            await pipe.execute()

    @unavailable_on_redis_error
    async def clear_launch(self, session_id: str) -> None:
        await self._redis.delete(keys.launch(session_id))
