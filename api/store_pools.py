"""Sized, metered Redis connection pools: one for commands, one for blocking reads.

A store runs on two pools (:meth:`api.store_base.StoreBase.from_url`): ordinary commands on one,
blocking reads (``XREAD BLOCK``: event followers, the agent's inbox, the change feed) on the other,
so a process full of stream followers never starves its writes, reads and probes. Both are
redis-py ``BlockingConnectionPool`` s: a caller that finds every connection in use waits up to the
pool's timeout and then fails with :class:`PoolExhausted` - which the store turns into
``StoreBusy`` (a 503 for that one request, never for all at once). Each pool counts what /metrics
shows: connections in use, callers waiting, time spent waiting, waits that failed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

DEFAULT_POOL_SIZE = 64
DEFAULT_POOL_TIMEOUT_SECONDS = 1.0
DEFAULT_BLOCKING_POOL_SIZE = 8


class PoolExhausted(redis_errors.ConnectionError):
    """No connection of a :class:`MeteredPool` came free within its wait."""

    def __init__(self, pool_name: str) -> None:
        super().__init__(f"no {pool_name} connection available")
        self.pool_name = pool_name


@dataclass(frozen=True)
class PoolStats:
    name: str
    in_use: int
    size: int
    waiting: int
    wait_seconds_total: float
    exhausted_total: int


class MeteredPool(aioredis.BlockingConnectionPool):
    """A sized pool whose callers wait (up to ``timeout``) for a free connection, and which counts
    connections in use, callers waiting, time spent waiting and waits that failed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_name = "redis"
        self.waiting = 0
        self.wait_seconds_total = 0.0
        self.exhausted_total = 0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        self.waiting += 1
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis_errors.ConnectionError as exc:
            if str(exc) != "No connection available.":
                raise
            self.exhausted_total += 1
            raise PoolExhausted(self.pool_name) from exc
        finally:
            self.waiting -= 1
            self.wait_seconds_total += time.monotonic() - started

    def stats(self) -> PoolStats:
        return PoolStats(
            name=self.pool_name,
            in_use=len(self._in_use_connections),
            size=self.max_connections,
            waiting=self.waiting,
            wait_seconds_total=self.wait_seconds_total,
            exhausted_total=self.exhausted_total,
        )
