"""The API's store: session writes and reads for the HTTP API (one role of the store; see
:mod:`api.store_base` for the roles and :mod:`api.store_controller`, :mod:`api.store_agent` for the
others).

Layout (names in :mod:`api.keys`): one hash per session with separate fields for each writer —
``meta`` (name, uid, createdAt), ``labels``, ``gen`` (generation), ``deleted`` (deletionTimestamp),
``spec`` (user), ``status`` (controller), ``agent`` (agent), ``fence:*`` (the controller's fencing
tokens). Separate fields mean a status write can never clobber a spec and an agent report can never
clobber a status.

**What is atomic: one session.** Lua scripts touch only one session's hash (one hash slot), so
they run unchanged on a single node and on Redis Cluster:

* ``apply``: create-or-get (POST) and create-or-update (PUT) in one step; ``generation`` is bumped
  only when the canonical spec JSON really changes.
* ``delete``: sets ``deletionTimestamp`` once; the controller finalizes (machines, then the keys).

**The global structures are written around that step, in an order a crash cannot hurt.** The
listing index (:data:`api.keys.INDEX`) and the change feed (:data:`api.keys.CHANGES`) live in other
slots, so they are separate commands:

1. ``ZADD`` the id to the index *before* the script creates the hash. A crash right after leaves
   an index entry without a session: every reader skips ids whose hash is missing, and the
   controller's resync drops them (``ControllerStore.all_sessions``). The reverse order could
   leave a session no index names, invisible to the controller for ever.
2. The script (the session itself).
3. After a creation, ``ZADD`` again, with the change-feed entry. The second ``ZADD`` closes a race
   with a removal of the same id in flight: whoever drops an id from the index (removal, resync)
   checks afterwards whether the hash exists and puts the id back if so, and the creator adds it
   after creating; whichever runs last, a live session stays indexed.
4. The change feed only wakes the controller early (its resync is the truth), so a crash before
   the ``XADD`` costs a wake-up, never a change.
"""

from __future__ import annotations

import builtins
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from api import keys
from api.cursor import InvalidCursor as InvalidCursor
from api.cursor import decode_cursor as decode_cursor
from api.cursor import encode_cursor as encode_cursor
from api.models import (
    InboxMessage,
    Metadata,
    Phase,
    Session,
    SessionEvent,
    SessionSpec,
    SessionStatus,
    utcnow,
)
from api.selector import Selector
from api.store_artifacts import ArtifactReads
from api.store_base import (
    MARK_DELETED_LUA,
    SessionIndexReads,
    canonical_labels,
    canonical_spec,
    flat_to_dict,
    session_from_hash,
    unavailable_on_redis_error,
)
from api.store_files import FileRequests
from api.store_pool_records import PoolRecords
from api.store_webhooks import WebhookRecords

ApplyResult = Literal[
    "created", "configured", "unchanged", "exists", "deleting", "missing", "mode_conflict", "finished"
]


# KEYS: session hash. ARGV: meta, labels, spec, status, mode.
# mode: "create" (create-or-get), "apply" (create-or-update), "update" (update only).
_APPLY_LUA = """
local exists = redis.call('EXISTS', KEYS[1])
if exists == 0 then
  if ARGV[5] == 'update' then return {'missing'} end
  redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'labels', ARGV[2], 'spec', ARGV[3])
  redis.call('HSET', KEYS[1], 'status', ARGV[4], 'gen', 1)
  return {'created'}
end
if ARGV[5] == 'create' then
  return {'exists', redis.call('HGETALL', KEYS[1])}
end
if redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return {'deleting', redis.call('HGETALL', KEYS[1])}
end
local result = 'unchanged'
local current = redis.call('HGET', KEYS[1], 'spec')
if current ~= ARGV[3] then
  -- Checked here, inside the atomic step, so two racing applies cannot slip past them:
  -- spec.mode is immutable, and a finished session's spec is frozen.
  local new_mode = cjson.decode(ARGV[3])['mode']
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


@dataclass(frozen=True)
class ApplyOutcome:
    result: ApplyResult
    session: Session | None


@dataclass(frozen=True)
class StoredEvent:
    id: str
    event: SessionEvent


@dataclass(frozen=True)
class ListPage:
    sessions: list[Session]
    cursor: str | None


class ApiStore(SessionIndexReads, PoolRecords, WebhookRecords, ArtifactReads, FileRequests):
    """What the API does with sessions: create, apply, get, list, delete, message, read events;
    with pools (:class:`api.store_pool_records.PoolRecords`), webhooks
    (:class:`api.store_webhooks.WebhookRecords`); artifacts and live-file requests."""

    def __init__(self, redis: aioredis.Redis, **kwargs: Any) -> None:
        super().__init__(redis, **kwargs)
        self._apply = redis.register_script(_APPLY_LUA)
        self._delete = redis.register_script(MARK_DELETED_LUA)

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
        if mode != "update":
            # Step 1 of the module docstring: the index entry before the session it names.
            await self._redis.zadd(keys.INDEX, {session.id: 0})
        reply = await self._apply(
            keys=[keys.session(session.id)],
            args=[
                json.dumps(meta),
                canonical_labels(session.metadata.labels),
                canonical_spec(session.spec),
                SessionStatus().model_dump_json(),
                mode,
            ],
        )
        result: ApplyResult = reply[0]
        if result in ("created", "configured"):
            # Steps 3 and 4: the index again (a racing removal may have dropped it), the feed entry.
            async with self._redis.pipeline(transaction=False) as pipe:
                if result == "created":
                    pipe.zadd(keys.INDEX, {session.id: 0})
                pipe.xadd(
                    keys.CHANGES,
                    {"id": session.id, "kind": "created" if result == "created" else "updated"},
                    maxlen=self.changes_maxlen,
                    approximate=True,
                )
                await pipe.execute()
        if result == "created":
            # What was just written, without reading it back (the hottest path of POST /sessions).
            metadata = session.metadata.model_copy(
                update={"uid": uid, "createdAt": created_at, "generation": 1, "deletionTimestamp": None}
            )
            created = Session(metadata=metadata, spec=session.spec, status=SessionStatus())
            return ApplyOutcome(result=result, session=created)
        stored = session_from_hash(flat_to_dict(reply[1])) if len(reply) > 1 else None
        return ApplyOutcome(result=result, session=stored)

    @unavailable_on_redis_error
    async def create_or_get(self, session: Session) -> ApplyOutcome:
        """Create the session, or return the one already stored under its id (result ``exists``)."""
        return await self._run_apply(session, "create")

    @unavailable_on_redis_error
    async def apply(self, session: Session) -> ApplyOutcome:
        """Create or update (labels and spec); ``generation`` moves only on a real spec change."""
        return await self._run_apply(session, "apply")

    @unavailable_on_redis_error
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
            ids = [str(x) for x in await self._redis.zrangebylex(keys.INDEX, start, "+", start=0, num=batch)]
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
            more = await self._redis.zrangebylex(keys.INDEX, f"({last_id}", "+", start=0, num=1)
            if not more:
                return ListPage(sessions=matched, cursor=None)
            return ListPage(sessions=matched, cursor=encode_cursor(last_id))
        return ListPage(sessions=matched, cursor=None)

    @unavailable_on_redis_error
    async def mark_deleted(self, session_id: str) -> Session | None:
        """Set ``deletionTimestamp``; the controller finalizes (destroys machines, then removes)."""
        reply = await self._delete(keys=[keys.session(session_id)], args=[utcnow().isoformat()])
        if reply[0] == "missing":
            return None
        if reply[0] == "marked":
            # After the mark, a separate command (another slot): a crash in between costs only the
            # early wake-up; the controller's resync sees the deletionTimestamp anyway.
            await self._redis.xadd(
                keys.CHANGES,
                {"id": session_id, "kind": "deleted"},
                maxlen=self.changes_maxlen,
                approximate=True,
            )
        return session_from_hash(flat_to_dict(reply[1]))

    @unavailable_on_redis_error
    # -- events -----------------------------------------------------------------------------------

    @unavailable_on_redis_error
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
            entries = await self._redis.xrange(stream, min=start, max="+", count=count)
        else:
            reply = await self._blocking.xread({stream: after_id or "0-0"}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [
            StoredEvent(id=str(eid), event=SessionEvent.model_validate_json(fields["e"]))
            for eid, fields in entries
        ]

    # -- inbox ------------------------------------------------------------------------------------

    # -- blocking reads and fan-out (api.fanout) ---------------------------------------------------

    @unavailable_on_redis_error
    async def read_events_many(
        self, cursors: dict[str, str], *, count: int = 100, block_ms: int
    ) -> dict[str, builtins.list[StoredEvent]]:
        """One blocking XREAD over many sessions' event streams: ``{session id: last id seen}`` in,
        ``{session id: events after it}`` out (sessions without new events are left out).

        Runs on the blocking pool: this is how one API reader serves every follower of many sessions
        (on a cluster, a pipelined poll instead: :meth:`StoreBase._read_streams`).
        """
        by_key = {keys.events(sid): sid for sid in cursors}
        found = await self._read_streams(
            {keys.events(sid): last for sid, last in cursors.items()},
            count=count,
            block_ms=block_ms,
            client=self._blocking,
        )
        return {
            by_key[stream]: [
                StoredEvent(id=str(eid), event=SessionEvent.model_validate_json(fields["e"]))
                for eid, fields in entries
            ]
            for stream, entries in found
        }

    @unavailable_on_redis_error
    async def send_message(self, session_id: str, text: str) -> InboxMessage:
        created = utcnow()
        entry_id = await self._redis.xadd(
            keys.inbox(session_id),
            {"text": text, "createdAt": created.isoformat()},
            maxlen=self.inbox_maxlen,
            approximate=True,
        )
        await self._redis.xadd(
            keys.CHANGES, {"id": session_id, "kind": "message"}, maxlen=self.changes_maxlen, approximate=True
        )
        return InboxMessage(id=str(entry_id), text=text, createdAt=created)

    # -- bookkeeping ------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def count(self) -> int:
        return int(await self._redis.zcard(keys.INDEX))
