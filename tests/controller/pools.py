"""Writing pool records in tests, until the pool API (ApiStore CRUD) is there to do it.

The same record format the API writes: a hash with ``meta``/``spec``/``status`` JSON (``gen`` and
``deleted`` beside them, as for sessions) and the name in the ``keys.POOLS`` index.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from api import keys
from api.models import utcnow


async def put_pool(redis: aioredis.Redis, name: str, generation: int = 1, **spec: Any) -> None:
    """Create or replace pool ``name`` with ``spec`` (a PoolSpec's fields)."""
    meta = {"name": name, "createdAt": utcnow().isoformat()}
    await redis.hset(
        keys.pool(name), mapping={"meta": json.dumps(meta), "spec": json.dumps(spec), "gen": str(generation)}
    )
    await redis.zadd(keys.POOLS, {name: 0})


async def delete_pool(redis: aioredis.Redis, name: str) -> None:
    """Mark pool ``name`` deleted (the controller drains it, then removes it)."""
    await redis.hset(keys.pool(name), "deleted", utcnow().isoformat())
