"""The webhook delivery queue, the controller's half (mixed into ``ControllerStore``).

**The outbox, per session.** Every fact a webhook may report is appended to the session's outbox
stream (:func:`api.keys.outbox`) *in the same script that decides it*: the status script for phase
changes and the deadline notice (:mod:`api.store_controller`), the gateway's metering script for the
budget warning (:mod:`api.store_gateway`). The outbox lives in the session's hash slot, so each of
those writes stays one atomic step on Redis Cluster; a process dying right after the change cannot
lose its webhook. Once-per-session notices are deduplicated in the session's notices hash.

**Fan-out, at least once.** The controller's webhook worker reads outboxes, turns each entry into
one delivery per interested target (the session's ``spec.notify`` and every matching Webhook), and
only then deletes the entry. The deliveries go into the queue with :meth:`WebhookQueue.enqueue`,
whose script is a no-op for a delivery id it already has: a crash between the enqueue and the
outbox deletion re-enqueues nothing. A delivery id is derived from the session's uid, the outbox
entry, the event and the target, so the same event to the same target always has the same
``webhook-id``, on every retry and after every restart.

**The queue** is one hash slot (tag ``{webhooks}``): a due zset (id -> epoch ms), one hash per
delivery (target, url, secret, body, attempts, last status), a capped list of recent ids per target
for ``GET .../deliveries``, and the lanes hash. Claiming moves a due delivery's score to *now +
visibility*, so a worker that dies mid-request leaves it due again after that time (redelivered with
the same id). Deliveries of one session to one target form a *lane* and go out in order: while a
lane's head waits for a retry, the lane's later deliveries wait behind it (the lanes hash holds
the time the lane is held until), and ids sort by outbox position within a lane.

Finished deliveries keep their record for ``retention`` seconds (then expire); a target's list keeps
the newest :data:`DELIVERY_LOG_MAX` ids.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from api import keys
from api.store_base import StoreBase, flat_to_dict, unavailable_on_redis_error
from api.store_webhooks import webhook_record
from api.webhook_models import Webhook, WebhookSpec

#: Ids of recent deliveries kept per target (for the deliveries listing).
DELIVERY_LOG_MAX = 200

Completion = Literal["delivered", "retry", "failed", "postponed"]

# KEYS: delivery hash, due zset, lanes hash, target's log. ARGV: id, now ms, lane, log max, then the
# record's field/value pairs. 1 enqueued, 0 already known.
_ENQUEUE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
local due = tonumber(ARGV[2])
local hold = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
if hold > due then due = hold end
redis.call('HSET', KEYS[1], 'nextAttemptMs', due, 'state', 'pending', 'attempts', 0)
redis.call('ZADD', KEYS[2], due, ARGV[1])
redis.call('LPUSH', KEYS[4], ARGV[1])
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[4]) - 1)
return 1
"""

# KEYS: due zset, lanes hash. ARGV: now ms, visibility ms, limit, delivery key prefix.
# Returns [id, record fields, ...] of the claimed deliveries; held lanes' deliveries move behind.
_CLAIM_LUA = """
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local rec = ARGV[4] .. id
  local lane = redis.call('HGET', rec, 'lane')
  if not lane then
    redis.call('ZREM', KEYS[1], id)
  else
    local hold = tonumber(redis.call('HGET', KEYS[2], lane) or '0')
    if hold > now then
      redis.call('ZADD', KEYS[1], hold, id)
      redis.call('HSET', rec, 'nextAttemptMs', hold)
    else
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
      table.insert(out, id)
      table.insert(out, redis.call('HGETALL', rec))
    end
  end
end
return out
"""

# KEYS: delivery hash, due zset, lanes hash. ARGV: id, outcome, now ms, next ms, http status ('' none),
# error, now ISO, retention seconds. 1 done, 0 when the record is gone.
_COMPLETE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
local outcome = ARGV[2]
local lane = redis.call('HGET', KEYS[1], 'lane')
if outcome == 'postponed' then
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[1])
  redis.call('HSET', KEYS[1], 'nextAttemptMs', ARGV[4])
  return 1
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'lastStatus', ARGV[5], 'lastError', ARGV[6], 'lastAttemptAt', ARGV[7])
if outcome == 'retry' then
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[1])
  redis.call('HSET', KEYS[1], 'nextAttemptMs', ARGV[4])
  local hold = tonumber(redis.call('HGET', KEYS[3], lane) or '0')
  if tonumber(ARGV[4]) > hold then redis.call('HSET', KEYS[3], lane, ARGV[4]) end
  return 1
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'state', outcome)
redis.call('HDEL', KEYS[1], 'nextAttemptMs', 'secret', 'body')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[8]))
if outcome == 'failed' then
  redis.call('HDEL', KEYS[3], lane)
elseif tonumber(redis.call('HGET', KEYS[3], lane) or '0') <= tonumber(ARGV[3]) then
  redis.call('HDEL', KEYS[3], lane)
end
return 1
"""


@dataclass(frozen=True)
class OutboxEntry:
    """One fact in a session's outbox: a phase change (``kind='phase'``) or a notice."""

    entry_id: str
    session_id: str
    fields: dict[str, str]


@dataclass(frozen=True)
class NewDelivery:
    """One event for one target, ready to send (the body is the exact bytes that are signed)."""

    delivery_id: str
    target: str
    lane: str
    session_id: str
    event: str
    url: str
    secret: str
    body: str
    created_ms: int


@dataclass(frozen=True)
class ClaimedDelivery:
    delivery_id: str
    target: str
    lane: str
    session_id: str
    event: str
    url: str
    secret: str
    body: str
    created_ms: int
    attempts: int


@dataclass(frozen=True)
class StoredWebhook:
    """A Webhook resource with its secret, as only the worker sees it."""

    webhook: Webhook
    secret: str | None

    @property
    def spec(self) -> WebhookSpec:
        return self.webhook.spec


class WebhookQueue(StoreBase):
    """What the controller's webhook worker does with Redis (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wh_enqueue = self._redis.register_script(_ENQUEUE_LUA)
        self._wh_claim = self._redis.register_script(_CLAIM_LUA)
        self._wh_complete = self._redis.register_script(_COMPLETE_LUA)

    @unavailable_on_redis_error
    async def outbox_entries(
        self, session_ids: Sequence[str], *, count: int = 100
    ) -> builtins.list[OutboxEntry]:
        """The oldest ``count`` outbox entries of each session (pipelined: no command spans slots)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.xrange(keys.outbox(sid), min="-", max="+", count=count)
            replies = await pipe.execute()
        return [
            OutboxEntry(entry_id=str(eid), session_id=sid, fields=dict(fields))
            for sid, entries in zip(session_ids, replies, strict=True)
            for eid, fields in entries
        ]

    @unavailable_on_redis_error
    async def ack_outbox(self, session_id: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self._redis.xdel(keys.outbox(session_id), *entry_ids)

    @unavailable_on_redis_error
    async def webhooks_with_secrets(self) -> builtins.list[StoredWebhook]:
        """Every Webhook resource and its signing secret (few: the worker reads them each round)."""
        names = [str(n) for n in await self._redis.zrange(keys.WEBHOOKS, 0, -1)]
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(keys.webhook(name))
            raws = await pipe.execute()
        found = []
        for raw in raws:
            hook = webhook_record(raw)
            if hook is not None:
                found.append(StoredWebhook(hook, raw.get("secret") or None))
        return found

    @unavailable_on_redis_error
    async def enqueue(self, deliveries: Sequence[NewDelivery], *, now_ms: int) -> int:
        """Queue deliveries not queued before (by id); returns how many were new."""
        if not deliveries:
            return 0
        # One script call per delivery, not a pipeline: a cluster pipeline does not reload a script
        # a node has forgotten (NOSCRIPT), and a fan-out makes only a few deliveries.
        replies = []
        for d in deliveries:
            record = {
                "target": d.target,
                "lane": d.lane,
                "session": d.session_id,
                "event": d.event,
                "url": d.url,
                "secret": d.secret,
                "body": d.body,
                "createdMs": str(d.created_ms),
            }
            pairs = [x for kv in record.items() for x in kv]
            reply = await self._wh_enqueue(
                keys=[
                    keys.delivery(d.delivery_id),
                    keys.DELIVERIES_DUE,
                    keys.DELIVERY_LANES,
                    keys.delivery_log(d.target),
                ],
                args=[d.delivery_id, now_ms, d.lane, DELIVERY_LOG_MAX, *pairs],
            )
            replies.append(reply)
        return sum(int(r) for r in replies)

    @unavailable_on_redis_error
    async def claim_deliveries(
        self, *, now_ms: int, visibility_ms: int, limit: int
    ) -> builtins.list[ClaimedDelivery]:
        """Due deliveries, each hidden from other claims for ``visibility_ms``."""
        prefix = keys.delivery("")
        reply = await self._wh_claim(
            keys=[keys.DELIVERIES_DUE, keys.DELIVERY_LANES], args=[now_ms, visibility_ms, limit, prefix]
        )
        claimed = []
        for i in range(0, len(reply), 2):
            rec = flat_to_dict(reply[i + 1])
            if "body" not in rec:
                continue
            claimed.append(
                ClaimedDelivery(
                    delivery_id=str(reply[i]),
                    target=rec["target"],
                    lane=rec["lane"],
                    session_id=rec["session"],
                    event=rec["event"],
                    url=rec["url"],
                    secret=rec.get("secret", ""),
                    body=rec["body"],
                    created_ms=int(rec["createdMs"]),
                    attempts=int(rec.get("attempts") or 0),
                )
            )
        return claimed

    @unavailable_on_redis_error
    async def complete_delivery(
        self,
        delivery_id: str,
        outcome: Completion,
        *,
        now_ms: int,
        next_ms: int = 0,
        http_status: int | None = None,
        error: str = "",
        now_iso: str = "",
        retention_seconds: int = 7 * 86400,
    ) -> None:
        """Record an attempt: delivered, retry at ``next_ms``, failed for good, or postponed (not tried)."""
        await self._wh_complete(
            keys=[keys.delivery(delivery_id), keys.DELIVERIES_DUE, keys.DELIVERY_LANES],
            args=[
                delivery_id,
                outcome,
                now_ms,
                next_ms,
                "" if http_status is None else str(http_status),
                error[:500],
                now_iso,
                retention_seconds,
            ],
        )

    @unavailable_on_redis_error
    async def delivery_queue_depth(self) -> int:
        """Deliveries waiting (due now, later, or claimed and in flight)."""
        return int(await self._redis.zcard(keys.DELIVERIES_DUE))


def outbox_data(fields: dict[str, str], name: str) -> dict[str, Any]:
    """A JSON field of an outbox entry as a dict ({} when empty or not an object)."""
    raw = fields.get(name) or ""
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
