"""Webhooks, the API's half: create, apply, get, list, delete, and delivery reads (mixed into ApiStore).

A webhook's record is one hash (:func:`api.keys.webhook`): ``meta`` (name, uid, createdAt),
``labels``, ``gen``, ``spec`` (canonical JSON *without* the secret) and ``secret`` (the ``whsec_``
key, never returned by any read here but :meth:`api.store_webhook_queue.WebhookQueue.webhooks_with_secrets`,
the worker's). The apply script touches that hash only (one slot); the name goes into the index
(:data:`api.keys.WEBHOOKS`) before the script and again after a creation, as for pools.

Deleting a webhook removes its record at once (there is nothing for the controller to drain): its
pending deliveries are dropped by the worker, which only sends to webhooks that still exist.
"""

from __future__ import annotations

import builtins
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from api import keys
from api.cursor import decode_cursor, encode_cursor
from api.models import Metadata, utcnow
from api.store_base import StoreBase, canonical_labels, flat_to_dict, unavailable_on_redis_error
from api.webhook_models import DeliveryView, Webhook, WebhookSpec, WebhookStatus

WebhookApplyResult = Literal["created", "configured", "unchanged", "exists"]

# KEYS: webhook hash. ARGV: meta, labels, spec (no secret), secret ('' keeps the stored one), mode
# ('create': create-or-get; 'apply': create-or-update), the secret a creation without one gets.
# Returns {result, hash fields}.
_WEBHOOK_APPLY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'labels', ARGV[2], 'spec', ARGV[3], 'gen', 1)
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'secret', ARGV[4])
  else redis.call('HSET', KEYS[1], 'secret', ARGV[6]) end
  return {'created', redis.call('HGETALL', KEYS[1])}
end
if ARGV[5] == 'create' then return {'exists', redis.call('HGETALL', KEYS[1])} end
local result = 'unchanged'
if redis.call('HGET', KEYS[1], 'spec') ~= ARGV[3] then
  redis.call('HSET', KEYS[1], 'spec', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
  result = 'configured'
end
if redis.call('HGET', KEYS[1], 'labels') ~= ARGV[2] then
  redis.call('HSET', KEYS[1], 'labels', ARGV[2])
  result = 'configured'
end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'secret') ~= ARGV[4] then
  redis.call('HSET', KEYS[1], 'secret', ARGV[4])
  result = 'configured'
end
return {result, redis.call('HGETALL', KEYS[1])}
"""


def canonical_webhook_spec(spec: WebhookSpec) -> str:
    """The stored spec: canonical JSON, without the secret (that has a field of its own)."""
    dumped = spec.model_dump(mode="json", exclude={"secret"})
    return json.dumps(dumped, sort_keys=True, separators=(",", ":"))


def webhook_record(raw: dict[str, str]) -> Webhook | None:
    """The webhook stored in one hash, its secret left out (``status.secretSet`` says if there is one)."""
    if not raw or "meta" not in raw or "spec" not in raw:
        return None
    meta = json.loads(raw["meta"])
    meta["labels"] = json.loads(raw.get("labels") or "{}")
    meta["generation"] = int(raw.get("gen") or 1)
    return Webhook(
        metadata=Metadata.model_validate(meta),
        spec=WebhookSpec.model_validate_json(raw["spec"]),
        status=WebhookStatus(secretSet=bool(raw.get("secret"))),
    )


def _ms_time(raw: str | None) -> datetime | None:
    return datetime.fromtimestamp(int(raw) / 1000, UTC) if raw else None


def delivery_view(delivery_id: str, raw: dict[str, str]) -> DeliveryView:
    state = raw.get("state") or "pending"
    return DeliveryView(
        id=delivery_id,
        event=raw.get("event", ""),
        session=raw.get("session", ""),
        url=raw.get("url", ""),
        state=state if state in ("pending", "delivered", "failed") else "pending",
        attempts=int(raw.get("attempts") or 0),
        lastStatus=int(raw["lastStatus"]) if raw.get("lastStatus") else None,
        lastError=raw.get("lastError") or None,
        createdAt=_ms_time(raw.get("createdMs")),
        lastAttemptAt=datetime.fromisoformat(raw["lastAttemptAt"]) if raw.get("lastAttemptAt") else None,
        nextAttemptAt=_ms_time(raw.get("nextAttemptMs")) if state == "pending" else None,
    )


@dataclass(frozen=True)
class WebhookApplyOutcome:
    result: WebhookApplyResult
    webhook: Webhook


@dataclass(frozen=True)
class WebhookPage:
    webhooks: list[Webhook]
    cursor: str | None


class WebhookRecords(StoreBase):
    """What the API does with webhooks (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._webhook_apply = self._redis.register_script(_WEBHOOK_APPLY_LUA)

    @unavailable_on_redis_error
    async def put_webhook(
        self,
        name: str,
        spec: WebhookSpec,
        labels: dict[str, str],
        *,
        mode: Literal["create", "apply"],
        secret_if_new: str,
    ) -> WebhookApplyOutcome:
        """Create (``mode='create'``: or get the stored one) or create-or-update (``'apply'``).

        ``spec.secret`` is stored apart from the spec; None keeps the stored secret, and a creation
        without one stores ``secret_if_new`` (the route shows it once).
        """
        meta = {"name": name, "uid": str(uuid.uuid4()), "createdAt": utcnow().isoformat()}
        await self._redis.zadd(keys.WEBHOOKS, {name: 0})
        reply = await self._webhook_apply(
            keys=[keys.webhook(name)],
            args=[
                json.dumps(meta),
                canonical_labels(labels),
                canonical_webhook_spec(spec),
                spec.secret or "",
                mode,
                secret_if_new,
            ],
        )
        result: WebhookApplyResult = reply[0]
        if result == "created":
            await self._redis.zadd(keys.WEBHOOKS, {name: 0})
        stored = webhook_record(flat_to_dict(reply[1]))
        if stored is None:  # pragma: no cover - the script returns the hash it just wrote or read
            raise ValueError(f"webhook {name} has an unreadable record")
        return WebhookApplyOutcome(result, stored)

    @unavailable_on_redis_error
    async def get_webhook(self, name: str) -> Webhook | None:
        return webhook_record(await self._redis.hgetall(keys.webhook(name)))

    @unavailable_on_redis_error
    async def list_webhooks(self, *, limit: int = 100, cursor: str | None = None) -> WebhookPage:
        """A page of webhooks in name order; ``cursor`` continues a listing."""
        start = f"({decode_cursor(cursor)}" if cursor else "-"
        names = [str(n) for n in await self._redis.zrangebylex(keys.WEBHOOKS, start, "+", start=0, num=limit)]
        if not names:
            return WebhookPage([], None)
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(keys.webhook(name))
            raws = await pipe.execute()
        found = [hook for raw in raws if (hook := webhook_record(raw)) is not None]
        more = await self._redis.zrangebylex(keys.WEBHOOKS, f"({names[-1]}", "+", start=0, num=1)
        return WebhookPage(found, encode_cursor(names[-1]) if more else None)

    @unavailable_on_redis_error
    async def delete_webhook(self, name: str) -> Webhook | None:
        """Remove the webhook (record, then index entry, then its delivery log); None when missing."""
        raw = await self._redis.hgetall(keys.webhook(name))
        hook = webhook_record(raw)
        if hook is None:
            return None
        await self._redis.delete(keys.webhook(name))
        await self._redis.zrem(keys.WEBHOOKS, name)
        return hook

    @unavailable_on_redis_error
    async def deliveries(self, target: str, *, limit: int = 50) -> builtins.list[DeliveryView]:
        """The newest deliveries of one target, newest first (expired records are skipped)."""
        ids = [str(i) for i in await self._redis.lrange(keys.delivery_log(target), 0, limit - 1)]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for delivery_id in ids:
                pipe.hgetall(keys.delivery(delivery_id))
            raws = await pipe.execute()
        return [delivery_view(i, raw) for i, raw in zip(ids, raws, strict=True) if raw]
