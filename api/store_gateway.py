"""The model gateway's store: verify a session's token, meter its usage, count label budgets.

A role of the store (see :mod:`api.store_base`), used by :mod:`gateway` only. Per request the
gateway makes one pipelined round trip (:meth:`GatewayStore.view`: the token's digest, the session
record and the spend of every configured label budget), and per response one more
(:meth:`GatewayStore.record_usage`: totals, the ``usage`` event, label budgets).

Usage totals live in the session hash's own ``usage`` field (beside ``status`` and ``agent``),
written by the gateway alone through a Lua script that adds the response's tokens and cost to the
stored totals, so concurrent responses of one session never lose an increment and GET
``/sessions/{id}`` shows the totals with no extra read. A session removed meanwhile is not
re-created (the script writes only into an existing hash).

Label budgets are global counters (:func:`api.keys.budget_spend`, one per budget and period
start), incremented with ``INCRBYFLOAT`` and expiring a while after their period ends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from api import keys
from api.models import Session, SessionEvent, SessionUsage, utcnow
from api.store_base import OUTBOX_MAXLEN, EventWrites, session_from_hash, unavailable_on_redis_error

# KEYS: session hash, events stream, webhook outbox, notices hash. ARGV: input, output, cache write,
# cache read tokens, cost USD, now (ISO), the usage event's JSON ('' for none), events maxlen, the
# spend (USD) that sends the budget warning ('' for none), outbox maxlen. The event gets the
# session's new total as data.totalCostUsd and goes on the stream in the same step; the warning goes
# on the outbox once per session (api/store_webhook_queue.py) in the same step too.
# Returns the new usage JSON, or false when the session is gone.
_RECORD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local raw = redis.call('HGET', KEYS[1], 'usage')
local u = {}
if raw then u = cjson.decode(raw) end
local function add(name, value)
  local cur = u[name]
  if type(cur) ~= 'number' then cur = 0 end
  u[name] = cur + value
end
add('requests', 1)
add('inputTokens', tonumber(ARGV[1]))
add('outputTokens', tonumber(ARGV[2]))
add('cacheCreationInputTokens', tonumber(ARGV[3]))
add('cacheReadInputTokens', tonumber(ARGV[4]))
add('costUsd', tonumber(ARGV[5]))
u['updatedAt'] = ARGV[6]
local out = cjson.encode(u)
redis.call('HSET', KEYS[1], 'usage', out)
if ARGV[7] ~= '' then
  local event = cjson.decode(ARGV[7])
  event['data']['totalCostUsd'] = u['costUsd']
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'e', cjson.encode(event))
end
if ARGV[9] ~= '' and u['costUsd'] >= tonumber(ARGV[9]) then
  local kind = 'session.budget_warning'
  if redis.call('HSETNX', KEYS[4], kind, ARGV[6]) == 1 then
    local data = cjson.encode({costUsd = u['costUsd'], warnAtUsd = tonumber(ARGV[9])})
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*', 'kind', 'notice', 'type', kind,
      'at', ARGV[6], 'data', data)
  end
end
return out
"""

# KEYS: session hash. ARGV: budget name, now (ISO). Sets usage.budgetExceeded once.
_EXCEEDED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local raw = redis.call('HGET', KEYS[1], 'usage')
local u = {}
if raw then u = cjson.decode(raw) end
if type(u['budgetExceeded']) == 'string' then return 0 end
u['budgetExceeded'] = ARGV[1]
u['updatedAt'] = ARGV[2]
redis.call('HSET', KEYS[1], 'usage', cjson.encode(u))
return 1
"""


@dataclass(frozen=True)
class GatewayView:
    """What one request's admission needs: the stored token digest, the session, budget spends."""

    token_digest: str | None
    session: Session | None
    budget_spend: dict[str, float]


@dataclass(frozen=True)
class MeteredUsage:
    """The tokens of one response and their price."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0


class GatewayStore(EventWrites):
    """Async access for the model gateway. One instance per process."""

    def __init__(self, redis: aioredis.Redis, **kwargs: Any) -> None:
        super().__init__(redis, **kwargs)
        self._record = redis.register_script(_RECORD_LUA)
        self._exceeded = redis.register_script(_EXCEEDED_LUA)

    @unavailable_on_redis_error
    async def view(self, session_id: str, budget_keys: Sequence[str] = ()) -> GatewayView:
        """The token digest, the session and the spend under each budget key, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.session_token(session_id))
            pipe.hgetall(keys.session(session_id))
            for key in budget_keys:
                pipe.get(key)
            replies = await pipe.execute()
        spend = {key: float(raw or 0) for key, raw in zip(budget_keys, replies[2:], strict=True)}
        digest = replies[0]
        return GatewayView(
            token_digest=str(digest) if digest else None,
            session=session_from_hash(replies[1]),
            budget_spend=spend,
        )

    @unavailable_on_redis_error
    async def record_usage(
        self,
        session_id: str,
        usage: MeteredUsage,
        budget_keys: Sequence[tuple[str, int]] = (),
        event: SessionEvent | None = None,
        warn_at_usd: float | None = None,
    ) -> SessionUsage | None:
        """Add one response's usage to the session's totals and to each ``(budget key, ttl)``.

        ``event`` (a ``usage`` event) is appended to the session's stream in the same step, with
        the session's new total cost as ``data.totalCostUsd``. Returns the session's new totals,
        or None when the session no longer exists (its budget counters are still charged: the
        money is spent either way). A total reaching ``warn_at_usd`` enqueues the session's one
        ``session.budget_warning`` webhook event, atomically with the totals.
        """
        reply = await self._record(
            keys=[
                keys.session(session_id),
                keys.events(session_id),
                keys.outbox(session_id),
                keys.session_notices(session_id),
            ],
            args=[
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_creation_input_tokens,
                usage.cache_read_input_tokens,
                repr(usage.cost_usd),
                utcnow().isoformat(),
                event.model_dump_json() if event is not None else "",
                self.events_maxlen,
                "" if warn_at_usd is None or warn_at_usd <= 0 else repr(warn_at_usd),
                OUTBOX_MAXLEN,
            ],
        )
        if budget_keys and usage.cost_usd > 0:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, ttl in budget_keys:
                    pipe.incrbyfloat(key, usage.cost_usd)
                    pipe.expire(key, ttl)
                await pipe.execute()
        return SessionUsage.model_validate(json.loads(reply)) if reply else None

    @unavailable_on_redis_error
    async def mark_budget_exceeded(self, session_id: str, budget: str) -> bool:
        """Record on the session that ``budget`` refused it (once); the controller then finishes it."""
        return bool(
            await self._exceeded(keys=[keys.session(session_id)], args=[budget, utcnow().isoformat()])
        )
