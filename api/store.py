"""The store: the only code that talks to Redis about sessions.

Layout (names in :mod:`api.keys`): one hash per session with separate fields for each writer —
``meta`` (name, uid, createdAt), ``labels``, ``gen`` (generation), ``deleted`` (deletionTimestamp),
``spec`` (user), ``status`` (controller), ``agent`` (agent). Separate fields mean a status write can
never clobber a spec and an agent report can never clobber a status.

Atomicity comes from Lua scripts that touch one session's hash plus the two global keys the API
maintains (the listing index and the change feed):

* ``apply``: create-or-get (POST) and create-or-update (PUT) in one step; ``generation`` is bumped
  only when the canonical spec JSON really changes; a change-feed entry is appended in the same step.
* ``status``: writes only if the session still exists (a removed session is never resurrected) and
  refuses to move a finished session (Succeeded/Failed) back to a live phase.

On Redis Cluster the index and the change feed live in other slots than a session's keys; the
scripts would then have to be split (feed entry after the write). Single Redis (with AOF) is the
supported deployment today; the per-session hash tags are there so the split stays small.

Every Redis connection error surfaces as :class:`StoreUnavailable` so callers can answer 503 and
never treat missing data as "gone".
"""

from __future__ import annotations

import base64
import binascii
import builtins
import functools
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, ParamSpec, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from api import keys
from api.models import (
    AgentReport,
    Heartbeat,
    InboxMessage,
    Metadata,
    Phase,
    Session,
    SessionCredentials,
    SessionEvent,
    SessionSpec,
    SessionStatus,
    utcnow,
)
from api.selector import Selector

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_CHANGES_MAXLEN = 100_000
DEFAULT_EVENTS_MAXLEN = 2_000
DEFAULT_INBOX_MAXLEN = 10_000
DEFAULT_POOL_SIZE = 64
DEFAULT_POOL_TIMEOUT_SECONDS = 1.0
DEFAULT_BLOCKING_POOL_SIZE = 8

ApplyResult = Literal[
    "created", "configured", "unchanged", "exists", "deleting", "missing", "mode_conflict", "finished"
]


class StoreUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error we cannot act on."""


class StoreAuthFailed(StoreUnavailable):
    """Redis refused the credentials (wrong password or a disabled per-session user)."""


class StorePermissionDenied(RuntimeError):
    """The credentials are valid but may not touch these keys (another session's, for an agent)."""


class StoreBusy(StoreUnavailable):
    """Every connection of a pool stayed in use for the pool's whole wait: a real limit, per call."""


class InvalidCursor(ValueError):
    """A pagination cursor that this store did not hand out."""


def _unavailable_on_redis_error(func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
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

    return wrapper


def redis_url_with_credentials(url: str, username: str | None, password: str | None) -> str:
    """``url`` (scheme, host, port, db) with its user info replaced by ``username``/``password``.

    Both None: no user info at all. The result carries a secret: never log it.
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if username is not None or password is not None:
        netloc = f"{quote(username or '', safe='')}:{quote(password or '', safe='')}@{netloc}"
    return urlunsplit((parts.scheme or "redis", netloc, parts.path, parts.query, ""))


def canonical_spec(spec: SessionSpec) -> str:
    """Equal specs give equal strings, whatever the order of map keys."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def canonical_labels(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        raw = base64.urlsafe_b64decode(padded.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("cursor is not one this server handed out") from None
    if not raw.startswith("v1:") or len(raw) > 80:
        raise InvalidCursor("cursor is not one this server handed out")
    return raw[3:]


# KEYS: session hash, index, changes. ARGV: id, meta, labels, spec, status, maxlen, mode.
# mode: "create" (create-or-get), "apply" (create-or-update), "update" (update only).
_APPLY_LUA = """
local exists = redis.call('EXISTS', KEYS[1])
if exists == 0 then
  if ARGV[7] == 'update' then return {'missing'} end
  redis.call('HSET', KEYS[1], 'meta', ARGV[2], 'labels', ARGV[3], 'spec', ARGV[4])
  redis.call('HSET', KEYS[1], 'status', ARGV[5], 'gen', 1)
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'id', ARGV[1], 'kind', 'created')
  return {'created'}
end
if ARGV[7] == 'create' then
  return {'exists', redis.call('HGETALL', KEYS[1])}
end
if redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return {'deleting', redis.call('HGETALL', KEYS[1])}
end
local result = 'unchanged'
local current = redis.call('HGET', KEYS[1], 'spec')
if current ~= ARGV[4] then
  -- Checked here, inside the atomic step, so two racing applies cannot slip past them:
  -- spec.mode is immutable, and a finished session's spec is frozen.
  local new_mode = cjson.decode(ARGV[4])['mode']
  if cjson.decode(current)['mode'] ~= new_mode then
    return {'mode_conflict', redis.call('HGETALL', KEYS[1])}
  end
  local status = redis.call('HGET', KEYS[1], 'status')
  if status then
    local phase = cjson.decode(status)['phase']
    if phase == 'Succeeded' or phase == 'Failed' then
      return {'finished', redis.call('HGETALL', KEYS[1])}
    end
  end
  local agent = redis.call('HGET', KEYS[1], 'agent')
  if agent and new_mode == 'task' then
    local state = cjson.decode(agent)['state']
    if state == 'done' or state == 'error' then
      return {'finished', redis.call('HGETALL', KEYS[1])}
    end
  end
  redis.call('HSET', KEYS[1], 'spec', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
  result = 'configured'
end
if redis.call('HGET', KEYS[1], 'labels') ~= ARGV[3] then
  redis.call('HSET', KEYS[1], 'labels', ARGV[3])
  result = 'configured'
end
if result == 'configured' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'id', ARGV[1], 'kind', 'updated')
end
return {result, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: session hash, changes. ARGV: id, timestamp, maxlen.
_DELETE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if redis.call('HEXISTS', KEYS[1], 'deleted') == 0 then
  redis.call('HSET', KEYS[1], 'deleted', ARGV[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[1], 'kind', 'deleted')
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: session hash [, fence key]. ARGV: status json, new phase [, fence token].
# Returns 1 written, 0 missing, -1 refused (finished session), -2 fenced out (stale leader).
_STATUS_LUA = """
if #KEYS > 1 then
  if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -2 end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], 'status')
if cur then
  local phase = cjson.decode(cur)['phase']
  if (phase == 'Succeeded' or phase == 'Failed') and ARGV[2] ~= phase and ARGV[2] ~= 'Terminating' then
    return -1
  end
end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
"""

# KEYS: session hash. ARGV: field, json. Writes only if the session exists.
_FIELD_IF_EXISTS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class ApplyOutcome:
    result: ApplyResult
    session: Session | None


@dataclass(frozen=True)
class Change:
    """One entry of the change feed."""

    entry_id: str
    session_id: str
    kind: str


@dataclass(frozen=True)
class StoredEvent:
    id: str
    event: SessionEvent


@dataclass(frozen=True)
class ListPage:
    sessions: list[Session]
    cursor: str | None


def _session_from_hash(raw: dict[str, str]) -> Session | None:
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
    }
    return Session.model_validate(data)


def _flat_to_dict(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


class PoolExhausted(redis_errors.ConnectionError):
    """No connection of a :class:`MeteredPool` came free within its wait (see :class:`StoreBusy`)."""

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
    what /metrics shows: connections in use, callers waiting, time spent waiting, waits that failed.
    """

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


class Store:
    """Async access to sessions in Redis. One instance per process, shared by all tasks."""

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
        # the store's own signatures carry the types.
        self.redis: Any = redis
        # Blocking reads (XREAD BLOCK) run on their own client, so they never hold the connections
        # that ordinary commands need (see the "blocking reads" block below).
        self.blocking: Any = blocking if blocking is not None else redis
        self.changes_maxlen = changes_maxlen
        self.events_maxlen = events_maxlen
        self.inbox_maxlen = inbox_maxlen
        self._apply = redis.register_script(_APPLY_LUA)
        self._delete = redis.register_script(_DELETE_LUA)
        self._status = redis.register_script(_STATUS_LUA)
        self._field_if_exists = redis.register_script(_FIELD_IF_EXISTS_LUA)

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
    ) -> Store:
        """A store on two sized connection pools: ``pool_size`` for commands, ``blocking_pool_size``
        for blocking reads. A call that finds its pool busy waits up to ``pool_timeout`` for a
        connection, then fails with :class:`StoreBusy` (that call only; the API answers it 503).

        ``retries`` > 0 retries a command on connection errors with a short jittered backoff
        (capped at 0.2 s) so a blip is absorbed while an outage still fails fast (503, not a hang).
        """
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

    async def close(self) -> None:
        await self.redis.aclose()
        if self.blocking is not self.redis:
            await self.blocking.aclose()

    @_unavailable_on_redis_error
    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # -- sessions ---------------------------------------------------------------------------------

    def new_session(
        self, session_id: str, spec: SessionSpec, labels: dict[str, str] | None = None
    ) -> Session:
        """A fresh resource with server-set metadata (not yet stored)."""
        return Session(
            metadata=Metadata(
                name=session_id,
                labels=labels or {},
                uid=str(uuid.uuid4()),
                generation=1,
                createdAt=utcnow(),
            ),
            spec=spec,
        )

    async def _run_apply(self, session: Session, mode: str) -> ApplyOutcome:
        uid = session.metadata.uid or str(uuid.uuid4())
        created_at = session.metadata.createdAt or utcnow()
        meta = {"name": session.metadata.name, "uid": uid, "createdAt": created_at.isoformat()}
        reply = await self._apply(
            keys=[keys.session(session.id), keys.INDEX, keys.CHANGES],
            args=[
                session.id,
                json.dumps(meta),
                canonical_labels(session.metadata.labels),
                canonical_spec(session.spec),
                SessionStatus().model_dump_json(),
                self.changes_maxlen,
                mode,
            ],
        )
        result: ApplyResult = reply[0]
        if result == "created":
            # What was just written, without reading it back (the hottest path of POST /sessions).
            metadata = session.metadata.model_copy(
                update={"uid": uid, "createdAt": created_at, "generation": 1, "deletionTimestamp": None}
            )
            created = Session(metadata=metadata, spec=session.spec, status=SessionStatus())
            return ApplyOutcome(result=result, session=created)
        stored = _session_from_hash(_flat_to_dict(reply[1])) if len(reply) > 1 else None
        return ApplyOutcome(result=result, session=stored)

    @_unavailable_on_redis_error
    async def create_or_get(self, session: Session) -> ApplyOutcome:
        """Create the session, or return the one already stored under its id (result ``exists``)."""
        return await self._run_apply(session, "create")

    @_unavailable_on_redis_error
    async def apply(self, session: Session) -> ApplyOutcome:
        """Create or update (labels and spec); ``generation`` moves only on a real spec change."""
        return await self._run_apply(session, "apply")

    @_unavailable_on_redis_error
    async def get(self, session_id: str) -> Session | None:
        raw = await self.redis.hgetall(keys.session(session_id))
        return _session_from_hash(raw)

    @_unavailable_on_redis_error
    async def get_many(self, session_ids: Sequence[str], *, batch: int = 500) -> list[Session]:
        """Batched read (pipelined, one round trip per ``batch`` ids)."""
        found: list[Session] = []
        for start in range(0, len(session_ids), batch):
            chunk = session_ids[start : start + batch]
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in chunk:
                    pipe.hgetall(keys.session(sid))
                raws = await pipe.execute()
            for raw in raws:
                session = _session_from_hash(raw)
                if session is not None:
                    found.append(session)
        return found

    @_unavailable_on_redis_error
    async def all_ids(self) -> list[str]:
        return [str(x) for x in await self.redis.zrange(keys.INDEX, 0, -1)]

    async def all_sessions(self) -> list[Session]:
        """Every session, in id order: one index read plus pipelined hash reads."""
        return await self.get_many(await self.all_ids())

    @_unavailable_on_redis_error
    async def list(
        self,
        *,
        selector: Selector | None = None,
        phase: Phase | None = None,
        limit: int = 100,
        cursor: str | None = None,
        max_scan: int = 5_000,
    ) -> ListPage:
        """A page of sessions in id order, filtered by labels and phase.

        Filtering happens after the index read, so one call scans at most ``max_scan`` ids; when it
        stops early it still returns a cursor, and the caller pages on (as Kubernetes' continue).
        """
        start = f"({decode_cursor(cursor)}" if cursor else "-"
        matched: list[Session] = []
        scanned = 0
        last_id: str | None = None
        exhausted = False
        batch = max(limit, 100)
        while len(matched) < limit and scanned < max_scan:
            ids = [str(x) for x in await self.redis.zrangebylex(keys.INDEX, start, "+", start=0, num=batch)]
            if not ids:
                exhausted = True
                break
            sessions = {s.id: s for s in await self.get_many(ids)}
            for sid in ids:
                scanned += 1
                last_id = sid
                session = sessions.get(sid)
                if session is None:
                    continue
                if selector is not None and not selector.matches(session.metadata.labels):
                    continue
                if phase is not None and session.effective_phase() != phase:
                    continue
                matched.append(session)
                if len(matched) >= limit:
                    break
            start = f"({last_id}"
            if len(ids) < batch and last_id == ids[-1]:
                exhausted = True
                break
        if exhausted and (last_id is None or len(matched) < limit):
            return ListPage(sessions=matched, cursor=None)
        if last_id is not None:
            more = await self.redis.zrangebylex(keys.INDEX, f"({last_id}", "+", start=0, num=1)
            if not more:
                return ListPage(sessions=matched, cursor=None)
            return ListPage(sessions=matched, cursor=encode_cursor(last_id))
        return ListPage(sessions=matched, cursor=None)

    @_unavailable_on_redis_error
    async def mark_deleted(self, session_id: str) -> Session | None:
        """Set ``deletionTimestamp``; the controller finalizes (destroys machines, then removes)."""
        reply = await self._delete(
            keys=[keys.session(session_id), keys.CHANGES],
            args=[session_id, utcnow().isoformat(), self.changes_maxlen],
        )
        if reply[0] == "missing":
            return None
        return _session_from_hash(_flat_to_dict(reply[1]))

    @_unavailable_on_redis_error
    async def remove(self, session_id: str) -> None:
        """Remove the record and every key of the session (finalization, or TTL after finish)."""
        fixed = [
            keys.session(session_id),
            keys.heartbeat(session_id),
            keys.events(session_id),
            keys.inbox(session_id),
            keys.inbox_acked(session_id),
            keys.launch(session_id),
        ]
        extra = [
            str(k) async for k in self.redis.scan_iter(match=keys.session_key_pattern(session_id), count=1000)
        ]
        await self.redis.delete(*set(fixed + extra))
        await self.redis.zrem(keys.INDEX, session_id)
        await self.redis.xadd(
            keys.CHANGES, {"id": session_id, "kind": "removed"}, maxlen=self.changes_maxlen, approximate=True
        )
        await self.delete_session_credentials(session_id)

    @_unavailable_on_redis_error
    async def write_status(
        self,
        session_id: str,
        status: SessionStatus,
        *,
        fence: tuple[str, int] | None = None,
    ) -> Literal["written", "missing", "refused", "fenced"]:
        """Write the controller-owned status (only the controller calls this).

        ``fence`` is ``(fence_key, token)``: the write happens only while that key still holds the
        token, so a controller that lost leadership cannot write after a new leader took over.
        """
        key_list = [keys.session(session_id)]
        args: list[Any] = [status.model_dump_json(), status.phase.value]
        if fence is not None:
            key_list.append(fence[0])
            args.append(str(fence[1]))
        code = int(await self._status(keys=key_list, args=args))
        outcomes: dict[int, Literal["written", "missing", "refused", "fenced"]] = {
            1: "written",
            0: "missing",
            -1: "refused",
            -2: "fenced",
        }
        return outcomes[code]

    @_unavailable_on_redis_error
    async def write_agent_report(self, session_id: str, report: AgentReport) -> bool:
        """Write the agent-owned report and wake the controller; False when the session is gone."""
        if report.updatedAt is None:
            report = report.model_copy(update={"updatedAt": utcnow()})
        written = int(
            await self._field_if_exists(
                keys=[keys.session(session_id)], args=["agent", report.model_dump_json()]
            )
        )
        if written:
            await self.redis.publish(keys.wake_channel(session_id), report.state)
        return bool(written)

    # -- heartbeats -------------------------------------------------------------------------------

    @_unavailable_on_redis_error
    async def heartbeat(self, session_id: str, machine_id: str | None, ttl_seconds: int, state: str) -> None:
        beat = Heartbeat(machineId=machine_id, state=state, at=utcnow(), ttlSeconds=ttl_seconds)
        await self.redis.set(keys.heartbeat(session_id), beat.model_dump_json(), ex=ttl_seconds)

    @_unavailable_on_redis_error
    async def get_heartbeat(self, session_id: str) -> Heartbeat | None:
        raw = await self.redis.get(keys.heartbeat(session_id))
        return Heartbeat.model_validate_json(raw) if raw else None

    @_unavailable_on_redis_error
    async def heartbeats(self, session_ids: Sequence[str], *, batch: int = 1000) -> dict[str, Heartbeat]:
        """Batched heartbeat read (pipelined GETs: no cross-slot MGET)."""
        found: dict[str, Heartbeat] = {}
        for start in range(0, len(session_ids), batch):
            chunk = session_ids[start : start + batch]
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in chunk:
                    pipe.get(keys.heartbeat(sid))
                raws = await pipe.execute()
            for sid, raw in zip(chunk, raws, strict=True):
                if raw:
                    found[sid] = Heartbeat.model_validate_json(raw)
        return found

    # -- events -----------------------------------------------------------------------------------

    @_unavailable_on_redis_error
    async def append_event(self, session_id: str, event: SessionEvent) -> str:
        entry_id = await self.redis.xadd(
            keys.events(session_id),
            {"e": event.model_dump_json()},
            maxlen=self.events_maxlen,
            approximate=True,
        )
        return str(entry_id)

    @_unavailable_on_redis_error
    async def read_events(
        self,
        session_id: str,
        after_id: str | None = None,
        *,
        count: int = 100,
        block_ms: int | None = None,
    ) -> builtins.list[StoredEvent]:
        """Events after ``after_id`` (exclusive; ``None`` = from the start), optionally blocking."""
        stream = keys.events(session_id)
        if block_ms is None:
            start = f"({after_id}" if after_id else "-"
            entries = await self.redis.xrange(stream, min=start, max="+", count=count)
        else:
            reply = await self.blocking.xread({stream: after_id or "0-0"}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [
            StoredEvent(id=str(eid), event=SessionEvent.model_validate_json(fields["e"]))
            for eid, fields in entries
        ]

    # -- blocking reads and fan-out (api.fanout) ---------------------------------------------------

    @_unavailable_on_redis_error
    async def read_events_many(
        self, cursors: dict[str, str], *, count: int = 100, block_ms: int
    ) -> dict[str, builtins.list[StoredEvent]]:
        """One blocking XREAD over many sessions' event streams: ``{session id: last id seen}`` in,
        ``{session id: events after it}`` out (sessions without new events are left out).

        Runs on the blocking pool: this is how one API reader serves every follower of many sessions.
        """
        by_key = {keys.events(sid): sid for sid in cursors}
        reply = await self.blocking.xread(
            {keys.events(sid): last for sid, last in cursors.items()}, count=count, block=block_ms
        )
        found: dict[str, builtins.list[StoredEvent]] = {}
        for stream, entries in reply or []:
            found[by_key[str(stream)]] = [
                StoredEvent(id=str(eid), event=SessionEvent.model_validate_json(fields["e"]))
                for eid, fields in entries
            ]
        return found

    def pool_stats(self) -> builtins.list[PoolStats]:
        """In use, size, waiters and total wait of each connection pool (for /metrics)."""
        pools = {id(c.connection_pool): c.connection_pool for c in (self.redis, self.blocking)}
        return [p.stats() for p in pools.values() if isinstance(p, MeteredPool)]

    # -- inbox ------------------------------------------------------------------------------------

    @_unavailable_on_redis_error
    async def send_message(self, session_id: str, text: str) -> InboxMessage:
        created = utcnow()
        entry_id = await self.redis.xadd(
            keys.inbox(session_id),
            {"text": text, "createdAt": created.isoformat()},
            maxlen=self.inbox_maxlen,
            approximate=True,
        )
        await self.redis.xadd(
            keys.CHANGES, {"id": session_id, "kind": "message"}, maxlen=self.changes_maxlen, approximate=True
        )
        return InboxMessage(id=str(entry_id), text=text, createdAt=created)

    @_unavailable_on_redis_error
    async def inbox_next(self, session_id: str, *, block_ms: int | None = None) -> InboxMessage | None:
        """The oldest message whose turn has not been acknowledged; the same one until acked."""
        acked = await self.redis.get(keys.inbox_acked(session_id)) or "0-0"
        entries = await self.redis.xrange(keys.inbox(session_id), min=f"({acked}", max="+", count=1)
        if not entries and block_ms is not None:
            reply = await self.blocking.xread({keys.inbox(session_id): acked}, count=1, block=block_ms)
            entries = reply[0][1] if reply else []
        if not entries:
            return None
        entry_id, fields = entries[0]
        return InboxMessage(
            id=str(entry_id), text=fields["text"], createdAt=datetime.fromisoformat(fields["createdAt"])
        )

    @_unavailable_on_redis_error
    async def inbox_ack(self, session_id: str, message_id: str) -> None:
        await self.redis.set(keys.inbox_acked(session_id), message_id)

    @_unavailable_on_redis_error
    async def inbox_pending(self, session_id: str, *, cap: int = 1000) -> int:
        acked = await self.redis.get(keys.inbox_acked(session_id)) or "0-0"
        entries = await self.redis.xrange(keys.inbox(session_id), min=f"({acked}", max="+", count=cap)
        return len(entries)

    @_unavailable_on_redis_error
    async def inbox_pending_many(self, session_ids: Sequence[str]) -> dict[str, int]:
        """Pending counts (0 or 1+, capped at 1) for many sessions in two pipelined round trips."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.get(keys.inbox_acked(sid))
            acked = await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid, ack in zip(session_ids, acked, strict=True):
                pipe.xrange(keys.inbox(sid), min=f"({ack or '0-0'}", max="+", count=1)
            found = await pipe.execute()
        return {sid: len(entries) for sid, entries in zip(session_ids, found, strict=True)}

    # -- change feed ------------------------------------------------------------------------------

    @_unavailable_on_redis_error
    async def last_change_id(self) -> str:
        """The id of the newest change-feed entry (``0-0`` when empty): where a new reader starts."""
        entries = await self.redis.xrevrange(keys.CHANGES, max="+", min="-", count=1)
        return str(entries[0][0]) if entries else "0-0"

    @_unavailable_on_redis_error
    async def read_changes(
        self, after_id: str, *, count: int = 1000, block_ms: int | None = None
    ) -> builtins.list[Change]:
        """Entries after ``after_id``; a reader resumes from the last id it saw."""
        if block_ms is None:
            entries = await self.redis.xrange(keys.CHANGES, min=f"({after_id}", max="+", count=count)
        else:
            reply = await self.blocking.xread({keys.CHANGES: after_id}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [Change(entry_id=str(eid), session_id=f["id"], kind=f["kind"]) for eid, f in entries]

    # -- launch records (controller) --------------------------------------------------------------

    @_unavailable_on_redis_error
    async def record_launch(
        self, session_id: str, launch_id: str, fields: dict[str, str] | None = None
    ) -> None:
        """Record a launch id *before* calling Fly create, so an ambiguous create can be found later."""
        mapping = {"launchId": launch_id, "requestedAt": utcnow().isoformat(), **(fields or {})}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.launch(session_id))
            pipe.hset(keys.launch(session_id), mapping=mapping)
            await pipe.execute()

    @_unavailable_on_redis_error
    async def get_launch(self, session_id: str) -> dict[str, str]:
        return dict(await self.redis.hgetall(keys.launch(session_id)))

    @_unavailable_on_redis_error
    async def get_launches(self, session_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.hgetall(keys.launch(sid))
            raws = await pipe.execute()
        return {sid: dict(raw) for sid, raw in zip(session_ids, raws, strict=True) if raw}

    @_unavailable_on_redis_error
    async def update_launch(self, session_id: str, fields: dict[str, str]) -> None:
        await self.redis.hset(keys.launch(session_id), mapping=fields)

    @_unavailable_on_redis_error
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
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.launch(session_id))
            pipe.hset(keys.launch(session_id), mapping=mapping)
            await pipe.execute()

    @_unavailable_on_redis_error
    async def clear_launch(self, session_id: str) -> None:
        await self.redis.delete(keys.launch(session_id))

    # -- per-session credentials ------------------------------------------------------------------

    @_unavailable_on_redis_error
    async def acl_supported(self) -> bool:
        try:
            await self.redis.execute_command("ACL", "WHOAMI")
        except redis_errors.ResponseError:
            return False
        return True

    @_unavailable_on_redis_error
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
        try:
            await self.redis.execute_command(
                "ACL",
                "SETUSER",
                username,
                "reset",
                "resetchannels",
                "on",
                f">{password}",
                f"~{keys.session_key_pattern(session_id)}",
                f"&{keys.wake_channel(session_id)}",
                "+@all",
                "-@dangerous",
                "-@admin",
            )
        except redis_errors.ResponseError:
            return None
        return SessionCredentials(username=username, password=password)

    @_unavailable_on_redis_error
    async def delete_session_credentials(self, session_id: str) -> None:
        try:
            await self.redis.execute_command("ACL", "DELUSER", keys.acl_user(session_id))
        except redis_errors.ResponseError:
            pass

    # -- bookkeeping ------------------------------------------------------------------------------

    @_unavailable_on_redis_error
    async def count(self) -> int:
        return int(await self.redis.zcard(keys.INDEX))


def session_ids(sessions: Iterable[Session]) -> list[str]:
    return [s.id for s in sessions]
