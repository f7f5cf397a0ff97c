"""Pools, the API's half: create, apply, get, list, mark deleted (mixed into :class:`api.store.ApiStore`).

A pool's record is one hash (:func:`api.keys.pool`) laid out like a session's, one field per writer:
``meta`` (name, uid, createdAt as JSON), ``labels``, ``gen`` (generation), ``deleted``
(deletionTimestamp), ``spec`` (the user's, canonical JSON) and ``status`` (the controller's; the API
never writes it, and a pool without one reads as the empty :class:`~api.pool_models.PoolStatus`).

**What is atomic: one pool.** The scripts touch only the pool's hash, so they run unchanged on one
node and on Redis Cluster. ``apply`` creates-or-gets (POST) or creates-or-updates (PUT) in one step,
bumping ``gen`` only when the canonical spec really changes; ``delete`` sets ``deleted`` once.

**The global structures around it** follow the order of :mod:`api.store` for sessions: the name goes
into :data:`api.keys.POOLS` before the script creates the hash and again after a creation (so a
removal racing a re-creation cannot leave a live pool unindexed), and every write that changed
something appends ``{"pool": name, "kind": created|updated|deleted}`` to the change feed, which only
wakes the controller early (its resync reads the index).

**Deletion is the controller's to finish.** The API only marks the pool; the controller withdraws
and destroys its machines and then removes the record and its keys. The API never removes a pool
itself, not even one that looks empty: a refill create may be in flight (its machine known to Fly,
not yet to Redis), and only the controller knows that.
"""

from __future__ import annotations

import builtins
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from api import keys
from api.cursor import decode_cursor, encode_cursor
from api.models import Metadata, utcnow
from api.pool_models import Pool, PoolSpec, PoolStatus
from api.selector import Selector
from api.store_base import (
    MARK_DELETED_LUA,
    StoreBase,
    canonical_labels,
    flat_to_dict,
    unavailable_on_redis_error,
)

PoolApplyResult = Literal["created", "configured", "unchanged", "exists", "deleting"]

# KEYS: pool hash. ARGV: meta, labels, spec, mode ("create": create-or-get; "apply": create-or-update).
_POOL_APPLY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'labels', ARGV[2], 'spec', ARGV[3], 'gen', 1)
  return {'created'}
end
if ARGV[4] == 'create' then return {'exists', redis.call('HGETALL', KEYS[1])} end
if redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return {'deleting', redis.call('HGETALL', KEYS[1])}
end
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
return {result, redis.call('HGETALL', KEYS[1])}
"""


def canonical_pool_spec(spec: PoolSpec) -> str:
    """Equal specs give equal strings, whatever the order of map keys."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def pool_record(raw: dict[str, str]) -> Pool | None:
    """The pool stored in one hash (None when missing or not a pool record)."""
    if not raw or "meta" not in raw or "spec" not in raw:
        return None
    meta = json.loads(raw["meta"])
    meta["labels"] = json.loads(raw.get("labels") or "{}")
    meta["generation"] = int(raw.get("gen") or 1)
    meta["deletionTimestamp"] = raw.get("deleted")
    return Pool(
        metadata=Metadata.model_validate(meta),
        spec=PoolSpec.model_validate_json(raw["spec"]),
        status=PoolStatus.model_validate_json(raw["status"]) if raw.get("status") else PoolStatus(),
    )


@dataclass(frozen=True)
class PoolApplyOutcome:
    result: PoolApplyResult
    pool: Pool


@dataclass(frozen=True)
class PoolPage:
    pools: list[Pool]
    cursor: str | None


class PoolRecords(StoreBase):
    """What the API does with pools (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool_apply = self._redis.register_script(_POOL_APPLY_LUA)
        self._pool_delete = self._redis.register_script(MARK_DELETED_LUA)

    def new_pool(self, name: str, spec: PoolSpec, labels: dict[str, str] | None = None) -> Pool:
        """A fresh resource with server-set metadata (not yet stored)."""
        metadata = Metadata(
            name=name, labels=labels or {}, uid=str(uuid.uuid4()), generation=1, createdAt=utcnow()
        )
        return Pool(metadata=metadata, spec=spec)

    async def _run_pool_apply(self, pool: Pool, mode: str) -> PoolApplyOutcome:
        name = pool.name
        uid = pool.metadata.uid or str(uuid.uuid4())
        created_at = pool.metadata.createdAt or utcnow()
        meta = {"name": name, "uid": uid, "createdAt": created_at.isoformat()}
        await self._redis.zadd(keys.POOLS, {name: 0})
        reply = await self._pool_apply(
            keys=[keys.pool(name)],
            args=[
                json.dumps(meta),
                canonical_labels(pool.metadata.labels),
                canonical_pool_spec(pool.spec),
                mode,
            ],
        )
        result: PoolApplyResult = reply[0]
        if result in ("created", "configured"):
            async with self._redis.pipeline(transaction=False) as pipe:
                if result == "created":
                    pipe.zadd(keys.POOLS, {name: 0})
                kind = "created" if result == "created" else "updated"
                pipe.xadd(
                    keys.CHANGES, {"pool": name, "kind": kind}, maxlen=self.changes_maxlen, approximate=True
                )
                await pipe.execute()
        if result == "created":
            metadata = pool.metadata.model_copy(
                update={"uid": uid, "createdAt": created_at, "generation": 1, "deletionTimestamp": None}
            )
            return PoolApplyOutcome(result, Pool(metadata=metadata, spec=pool.spec))
        stored = pool_record(flat_to_dict(reply[1]))
        if stored is None:  # pragma: no cover - the script returns the hash it just read
            raise ValueError(f"pool {name} has an unreadable record")
        return PoolApplyOutcome(result, stored)

    @unavailable_on_redis_error
    async def create_pool(self, pool: Pool) -> PoolApplyOutcome:
        """Create the pool, or return the one stored under its name (result ``exists``)."""
        return await self._run_pool_apply(pool, "create")

    @unavailable_on_redis_error
    async def apply_pool(self, pool: Pool) -> PoolApplyOutcome:
        """Create or update (labels and spec); ``generation`` moves only on a real spec change."""
        return await self._run_pool_apply(pool, "apply")

    @unavailable_on_redis_error
    async def get_pool(self, name: str) -> Pool | None:
        return pool_record(await self._redis.hgetall(keys.pool(name)))

    @unavailable_on_redis_error
    async def list_pools(
        self, *, selector: Selector | None = None, limit: int = 100, cursor: str | None = None
    ) -> PoolPage:
        """A page of pools in name order whose labels match ``selector``; ``cursor`` continues a listing.

        Pools are few (each holds up to ``POOL_MAX_SIZE`` machines), so a page reads the index in
        batches until it is full or the index ends; the cursor is the last name looked at.
        """
        start = f"({decode_cursor(cursor)}" if cursor else "-"
        matched: builtins.list[Pool] = []
        last: str | None = None
        batch = max(limit, 100)
        while len(matched) < limit:
            found_names = await self._redis.zrangebylex(keys.POOLS, start, "+", start=0, num=batch)
            names = [str(n) for n in found_names]
            if not names:
                return PoolPage(matched, None)
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(keys.pool(name))
                raws = await pipe.execute()
            for name, raw in zip(names, raws, strict=True):
                last = name
                found = pool_record(raw)
                if found is None or (selector is not None and not selector.matches(found.metadata.labels)):
                    continue
                matched.append(found)
                if len(matched) >= limit:
                    break
            start = f"({last}"
        more = await self._redis.zrangebylex(keys.POOLS, start, "+", start=0, num=1)
        return PoolPage(matched, encode_cursor(last) if more and last is not None else None)

    @unavailable_on_redis_error
    async def mark_pool_deleted(self, name: str) -> Pool | None:
        """Set ``deletionTimestamp``; the controller drains the machines, then removes the record."""
        reply = await self._pool_delete(keys=[keys.pool(name)], args=[utcnow().isoformat()])
        if reply[0] == "missing":
            return None
        if reply[0] == "marked":
            await self._redis.xadd(
                keys.CHANGES, {"pool": name, "kind": "deleted"}, maxlen=self.changes_maxlen, approximate=True
            )
        return pool_record(flat_to_dict(reply[1]))
