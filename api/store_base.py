"""The store's shared base: one Redis connection, its error mapping and the session codec.

Only the store modules talk to Redis (``tests/test_layering.py`` enforces it). Each role gets its
own store class on top of :class:`StoreBase`, with exactly the operations that role performs:

* :class:`api.store.ApiStore` — the API: create/apply/get/list/delete sessions, send messages,
  read events;
* :class:`api.store_controller.ControllerStore` — the controller: status writes (fenced), launch
  records, heartbeat and inbox reads, the change feed and wake channel; with per-session
  credentials and session removal (:class:`api.store_teardown.SessionTeardown`) and the leader
  lease (:class:`api.store_lease.LeaderLease`) mixed in;
* :class:`api.store_agent.AgentStore` — the agent in a machine, connected as its session's ACL user:
  its own session read, its report, heartbeat, events, inbox and transcripts.

Every store runs on one Redis node or on a Redis Cluster alike (:func:`redis_client` picks the
client from the URL's scheme): no command, transaction or script of any role spans two hash slots;
:mod:`api.store` explains how the writes that must touch global keys are ordered instead.

The Redis client is private (``_redis``): code outside the store asks a store method, so every key
name stays in :mod:`api.keys` and every Redis error surfaces as :class:`StoreUnavailable` (503 for
callers, never "gone").
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, Self, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from api import keys
from api.models import Session, SessionEvent, SessionSpec
from api.notify_models import REVEAL_SECRETS
from api.store_errors import StoreAuthFailed as StoreAuthFailed
from api.store_errors import StoreBusy as StoreBusy
from api.store_errors import StorePermissionDenied as StorePermissionDenied
from api.store_errors import StoreUnavailable as StoreUnavailable
from api.store_pools import (
    DEFAULT_BLOCKING_POOL_SIZE,
    DEFAULT_POOL_SIZE,
    DEFAULT_POOL_TIMEOUT_SECONDS,
    MeteredPool,
    PoolExhausted,
    PoolStats,
)

P = ParamSpec("P")
T = TypeVar("T")

#: URL schemes that name a Redis Cluster, and the plain scheme each stands for.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

#: How often a multi-stream read on a cluster looks again (see ``StoreBase._read_streams``).
CLUSTER_POLL_SECONDS = 0.1

DEFAULT_CHANGES_MAXLEN = 100_000
DEFAULT_EVENTS_MAXLEN = 2_000
DEFAULT_INBOX_MAXLEN = 10_000
#: A session's webhook outbox keeps at most about this many facts not yet fanned out.
OUTBOX_MAXLEN = 1_000


# KEYS: a resource's hash (a session's or a pool's). ARGV: timestamp. 'marked' when this call set
# ``deleted``, 'ok' when it was set before, 'missing' when there is no such resource.
MARK_DELETED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local result = 'ok'
if redis.call('HEXISTS', KEYS[1], 'deleted') == 0 then
  redis.call('HSET', KEYS[1], 'deleted', ARGV[1])
  result = 'marked'
end
return {result, redis.call('HGETALL', KEYS[1])}
"""


def unavailable_on_redis_error(func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await func(*args, **kwargs)
        except redis_errors.AuthenticationError as exc:
            raise StoreAuthFailed("redis refused the credentials") from exc
        except redis_errors.NoPermissionError as exc:
            raise StorePermissionDenied("redis denied access to these keys") from exc
        except PoolExhausted as exc:
            raise StoreBusy(f"all {exc.pool_name} connections to redis are in use") from exc
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise StoreUnavailable("redis is unreachable") from exc
        except redis_errors.BusyLoadingError as exc:
            raise StoreUnavailable("redis is loading its data set") from exc
        except (
            redis_errors.ClusterError,
            redis_errors.TryAgainError,
            redis_errors.ReadOnlyError,
            redis_errors.SlotNotCoveredError,
        ) as exc:
            # A cluster mid-failover: a slot without a master, a node still read-only, a resharding
            # in progress. An outage like any other: 503 now, healed once the cluster settles.
            raise StoreUnavailable(f"redis cluster is not ready: {type(exc).__name__}") from exc

    return wrapper


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster: the scheme is ``redis+cluster`` or ``rediss+cluster``."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def redis_client(
    url: str,
    *,
    socket_timeout: float = 5.0,
    connect_timeout: float = 2.0,
    retries: int = 0,
    max_connections: int | None = None,
) -> aioredis.Redis:
    """A client for ``url``: one node (``redis://``, ``rediss://``) or a cluster (``redis+cluster://``).

    One setting picks the topology: a cluster URL names any one node (a seed); the client learns
    the others from it (``CLUSTER SLOTS``) and follows ``MOVED`` and failovers by itself. Cluster
    nodes only have database 0, so a cluster URL takes no database path. Typed as ``Redis`` because
    both clients offer the same command methods; :attr:`StoreBase.cluster` tells them apart.
    """
    parts = urlsplit(url)
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(connect_timeout, socket_timeout),
        "health_check_interval": 15,
    }
    if max_connections is not None:
        common["max_connections"] = max_connections
    if parts.scheme in CLUSTER_SCHEMES:
        plain = urlunsplit((CLUSTER_SCHEMES[parts.scheme], parts.netloc, "", parts.query, ""))
        backoff = ExponentialWithJitterBackoff(cap=0.5, base=0.05)
        # At least a few attempts even when ``retries`` is 0: the cluster client uses them to
        # re-learn the topology after a MOVED or a failover, not only to absorb blips.
        cluster: Any = aioredis.RedisCluster.from_url(plain, retry=Retry(backoff, max(retries, 3)), **common)
        return cast(aioredis.Redis, cluster)
    retry = Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.02), retries) if retries else None
    return aioredis.Redis.from_url(url, retry=retry, **common)


def canonical_spec(spec: SessionSpec) -> str:
    """Equal specs give equal strings, whatever the order of map keys. The stored form: with the
    ``spec.notify`` secrets, which every other serialization drops (api/notify_models.py)."""
    dumped = spec.model_dump(mode="json", context={REVEAL_SECRETS: True})
    return json.dumps(dumped, sort_keys=True, separators=(",", ":"))


def canonical_labels(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def session_from_hash(raw: dict[str, str]) -> Session | None:
    if not raw or "spec" not in raw or "meta" not in raw:
        return None
    meta = json.loads(raw["meta"])
    meta["labels"] = json.loads(raw.get("labels") or "{}")
    meta["generation"] = int(raw.get("gen") or 1)
    meta["deletionTimestamp"] = raw.get("deleted")
    data: dict[str, Any] = {
        "metadata": meta,
        "spec": json.loads(raw["spec"]),
        "status": json.loads(raw["status"]) if raw.get("status") else {},
        "agent": json.loads(raw["agent"]) if raw.get("agent") else None,
        "usage": json.loads(raw["usage"]) if raw.get("usage") else None,
    }
    return Session.model_validate(data)


def flat_to_dict(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


class StoreBase:
    """One connection pool and the reads every role shares. One instance per process."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        changes_maxlen: int = DEFAULT_CHANGES_MAXLEN,
        events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
        inbox_maxlen: int = DEFAULT_INBOX_MAXLEN,
        blocking: aioredis.Redis | None = None,
    ) -> None:
        # redis-py's stubs type every reply as a union of bytes/str/Awaitable; with
        # decode_responses=True the replies are str, so the client is handled as Any here and
        # the store's own signatures carry the types. Private: only store modules touch it.
        self._redis: Any = redis
        # Blocking reads (XREAD BLOCK) run on their own client, so they never hold the connections
        # that ordinary commands need (api/store_pools.py).
        self._blocking: Any = blocking if blocking is not None else redis
        self.changes_maxlen = changes_maxlen
        self.events_maxlen = events_maxlen
        self.inbox_maxlen = inbox_maxlen

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        retries: int = 0,
        pool_size: int = DEFAULT_POOL_SIZE,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT_SECONDS,
        blocking_pool_size: int = DEFAULT_BLOCKING_POOL_SIZE,
        **kwargs: Any,
    ) -> Self:
        """A store on two sized connection pools: ``pool_size`` for commands, ``blocking_pool_size``
        for blocking reads. A call that finds its pool busy waits up to ``pool_timeout`` for a
        connection, then fails with :class:`StoreBusy` (that call only; the API answers it 503).

        ``retries`` > 0 retries a command on connection errors with a short jittered backoff
        (capped at 0.2 s) so a blip is absorbed while an outage still fails fast (503, not a hang).

        A cluster URL (see :func:`redis_client`) gives two cluster clients instead, sized per node
        (``pool_size`` / ``blocking_pool_size`` connections to each node); redis-py's cluster pools
        do not wait for a free connection, so a full one fails the call at once (503), and they
        are not metered (:meth:`pool_stats` is empty).
        """
        if is_cluster_url(url):
            commands_client = redis_client(
                url,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                retries=retries,
                max_connections=pool_size,
            )
            blocking_client = redis_client(
                url,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                max_connections=blocking_pool_size,
            )
            return cls(commands_client, blocking=blocking_client, **kwargs)
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": min(connect_timeout, socket_timeout),
            "health_check_interval": 15,
            "timeout": pool_timeout,
        }
        commands = MeteredPool.from_url(
            url,
            max_connections=pool_size,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.02), retries) if retries else None,
            **options,
        )
        # Blocking reads are never retried by the client: their callers loop and resume from a cursor.
        blocking = MeteredPool.from_url(url, max_connections=blocking_pool_size, retry=None, **options)
        commands.pool_name, blocking.pool_name = "commands", "blocking"
        return cls(aioredis.Redis.from_pool(commands), blocking=aioredis.Redis.from_pool(blocking), **kwargs)

    @property
    def cluster(self) -> bool:
        """Whether this store talks to a Redis Cluster (commands then never span hash slots)."""
        return isinstance(self._redis, aioredis.RedisCluster)

    async def close(self) -> None:
        await self._redis.aclose()
        if self._blocking is not self._redis:
            await self._blocking.aclose()

    def pool_stats(self) -> list[PoolStats]:
        """In use, size, waiters and total wait of each connection pool (for /metrics)."""
        # A cluster client has one pool per node and none of its own: nothing metered to show.
        found = [getattr(c, "connection_pool", None) for c in (self._redis, self._blocking)]
        pools = {id(p): p for p in found if p is not None}
        return [p.stats() for p in pools.values() if isinstance(p, MeteredPool)]

    async def _read_streams(
        self, cursors: dict[str, str], *, count: int, block_ms: int, client: Any = None
    ) -> list[tuple[str, list[Any]]]:
        """``XREAD`` over many streams (``{key: last id seen}``): ``[(key, entries)]`` of those with news.

        One node: one ``XREAD BLOCK`` on ``client`` (default: the command client). On Redis Cluster
        one ``XREAD`` may only name streams of one hash slot, and every session's stream has a slot
        of its own: there it is a non-blocking ``XREAD`` per stream, pipelined (one round trip per
        node, the nodes in parallel), repeated every ``CLUSTER_POLL_SECONDS`` until something
        arrives or ``block_ms`` has passed - one command per stream per poll, and up to one poll
        interval later than a blocking read (README, "Redis: one node or a cluster").
        """
        if not self.cluster:
            reply = await (client or self._redis).xread(cursors, count=count, block=block_ms)
            return [(str(stream), entries) for stream, entries in reply or [] if entries]
        deadline = time.monotonic() + block_ms / 1000
        order = list(cursors.items())
        while True:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, last in order:
                    pipe.xread({key: last}, count=count)
                replies = await pipe.execute()
            found = [
                (key, reply[0][1])
                for (key, _), reply in zip(order, replies, strict=True)
                if reply and reply[0][1]
            ]
            left = deadline - time.monotonic()
            if found or left <= 0:
                return found
            await asyncio.sleep(min(CLUSTER_POLL_SECONDS, left))

    @unavailable_on_redis_error
    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    @unavailable_on_redis_error
    async def learn_topology(self) -> None:
        """Learn a cluster's topology now, before concurrent use (a no-op beyond a ping on one node).

        redis-py's cluster client learns the topology on its first command; commands issued
        concurrently while it does so can meet a connection it is replacing (seen as an
        ``AttributeError`` deep in the client). One call before fanning out avoids that.
        """
        if self.cluster:
            await cast(Any, self._redis).initialize()
        await self._redis.ping()

    @unavailable_on_redis_error
    async def get(self, session_id: str) -> Session | None:
        raw = await self._redis.hgetall(keys.session(session_id))
        return session_from_hash(raw)


class SessionIndexReads(StoreBase):
    """Reads across many sessions (the listing index): the API's and the controller's, not the agent's."""

    @unavailable_on_redis_error
    async def get_many(self, session_ids: Sequence[str], *, batch: int = 500) -> list[Session]:
        """Batched read (pipelined, one round trip per ``batch`` ids)."""
        found: list[Session] = []
        for start in range(0, len(session_ids), batch):
            chunk = session_ids[start : start + batch]
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in chunk:
                    pipe.hgetall(keys.session(sid))
                raws = await pipe.execute()
            for raw in raws:
                session = session_from_hash(raw)
                if session is not None:
                    found.append(session)
        return found

    @unavailable_on_redis_error
    async def all_ids(self) -> list[str]:
        return [str(x) for x in await self._redis.zrange(keys.INDEX, 0, -1)]

    async def all_sessions(self) -> list[Session]:
        """Every session, in id order: one index read plus pipelined hash reads."""
        return await self.get_many(await self.all_ids())


class EventWrites(StoreBase):
    """Appending to a session's event stream: the controller's lifecycle events, the agent's work."""

    @unavailable_on_redis_error
    async def append_event(self, session_id: str, event: SessionEvent) -> str:
        entry_id = await self._redis.xadd(
            keys.events(session_id),
            {"e": event.model_dump_json()},
            maxlen=self.events_maxlen,
            approximate=True,
        )
        return str(entry_id)
