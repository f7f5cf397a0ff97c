"""Claude transcripts in Redis: the SDK's ``SessionStore`` protocol, scoped to one flyswarm session.

The Agent SDK mirrors every transcript line the CLI writes to a ``SessionStore`` and, on resume,
materializes the transcript from the store into a temporary config dir. With this store behind it
a chat session resumes its conversation on a brand-new machine whose disk is empty.

The protocol is implemented *structurally*: this module never imports ``claude_agent_sdk`` (the
API and the controller install without it). The TypedDicts below mirror the SDK's shapes, which
mypy matches structurally. The one piece of SDK logic a store needs, the incremental summary fold
(``claude_agent_sdk.fold_session_summary``), is passed in by the agent; without it no summaries are
kept and the SDK falls back to loading transcripts when it lists sessions.

Layout (names in :mod:`api.keys`, all under ``fs:{<session>}:tr:`` so the per-session ACL covers
them), each key recorded in the session's key registry (:func:`api.keys.session_registry`) in the
transaction that creates it, so :meth:`api.store_teardown.SessionTeardown.remove` deletes them
with the session, atomically and without scanning the keyspace:

* ``e:<key>``  list of JSON entries, in append order (``<key>`` = url-quoted
  ``project/session[/subpath]``, unambiguous whatever the parts contain)
* ``u:<key>``  set of entry uuids already stored: a retried batch is not stored twice
* ``s:<project>`` hash session id -> mtime (ms) of main transcripts, for ``list_sessions``
* ``m:<project>`` hash session id -> summary sidecar JSON, for ``list_session_summaries``
* ``k:<project/session>`` set of subpaths, for ``list_subkeys`` and the delete cascade
* ``projects`` set of project keys, so a transcript is found again after the cwd changed

An append is one optimistic transaction (WATCH the uuid set and the summaries hash, read, fold,
MULTI/EXEC, retry on conflict), so concurrent writers (an old and a new machine overlapping for a
moment) neither duplicate entries nor lose a summary update. Every mtime comes from the Redis
server clock, so machines with skewed clocks still agree on which write is newer.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from api import keys
from api.transcript_types import SummaryFold as SummaryFold
from api.transcript_types import TranscriptEntry as TranscriptEntry
from api.transcript_types import TranscriptKey as TranscriptKey
from api.transcript_types import TranscriptListEntry as TranscriptListEntry
from api.transcript_types import TranscriptListKey as TranscriptListKey
from api.transcript_types import TranscriptSummary as TranscriptSummary
from api.transcript_types import copy_transcript

_MAX_CONFLICT_RETRIES = 20


def _part(value: str) -> str:
    return quote(value, safe="")


def _transcript_id(project_key: str, session_id: str, subpath: str | None = None) -> str:
    parts = [_part(project_key), _part(session_id)]
    if subpath:
        parts.append(_part(subpath))
    return "/".join(parts)


class RedisTranscriptStore:
    """A ``SessionStore`` over Redis for the transcripts of one flyswarm session."""

    def __init__(self, redis: aioredis.Redis, session_id: str, *, fold: SummaryFold | None = None) -> None:
        # decode_responses=True is assumed (the store's client); replies are str. Private: built by
        # api.store_agent.AgentStore.transcripts() on the agent's own connection.
        self._redis: Any = redis
        self.session_id = session_id
        self._fold = fold

    # -- key helpers ------------------------------------------------------------------------------

    def _entries(self, transcript: str) -> str:
        return keys.transcript_entries(self.session_id, transcript)

    def _uuids(self, transcript: str) -> str:
        return keys.transcript_uuids(self.session_id, transcript)

    def _sessions(self, project_key: str) -> str:
        return keys.transcript_sessions(self.session_id, _part(project_key))

    def _summaries(self, project_key: str) -> str:
        return keys.transcript_summaries(self.session_id, _part(project_key))

    def _subkeys(self, project_key: str, claude_session_id: str) -> str:
        return keys.transcript_subkeys(self.session_id, _transcript_id(project_key, claude_session_id))

    async def _server_ms(self, pipe: Any, key: str) -> int:
        """The Redis clock in ms (one clock for every writer): the watched pipeline's server, or on a
        cluster (whose transaction pipelines refuse keyless commands) the node that holds ``key``."""
        if isinstance(self._redis, aioredis.RedisCluster):
            cluster: Any = self._redis
            node = cluster.get_node_from_key(key)
            seconds, micros = await cluster.execute_command("TIME", target_nodes=node)
        else:
            seconds, micros = await pipe.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # -- the protocol -----------------------------------------------------------------------------

    async def append(self, key: TranscriptKey, entries: list[TranscriptEntry]) -> None:
        """Store a batch in order; entries whose uuid is already stored are skipped."""
        if not entries:
            return
        project_key, claude_sid = key["project_key"], key["session_id"]
        subpath = key.get("subpath")
        transcript = _transcript_id(project_key, claude_sid, subpath)
        entries_key, uuids_key = self._entries(transcript), self._uuids(transcript)
        summaries_key = self._summaries(project_key)
        is_main = not subpath
        for _attempt in range(_MAX_CONFLICT_RETRIES):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    watched = [uuids_key, summaries_key] if is_main else [uuids_key]
                    await pipe.watch(*watched)
                    fresh = await self._new_entries(pipe, uuids_key, entries)
                    if not fresh:
                        await pipe.reset()
                        return
                    prev_summary = None
                    if is_main and self._fold is not None:
                        raw = await pipe.hget(summaries_key, claude_sid)
                        prev_summary = json.loads(raw) if raw else None
                    now_ms = await self._server_ms(pipe, uuids_key)
                    pipe.multi()
                    created = [entries_key, uuids_key]
                    created += (
                        [
                            self._sessions(project_key),
                            keys.transcript_projects(self.session_id),
                            summaries_key,
                        ]
                        if is_main
                        else [self._subkeys(project_key, claude_sid)]
                    )
                    pipe.sadd(keys.session_registry(self.session_id), *created)
                    pipe.rpush(entries_key, *(json.dumps(e, separators=(",", ":")) for e in fresh))
                    new_uuids = [e["uuid"] for e in fresh if isinstance(e.get("uuid"), str)]
                    if new_uuids:
                        pipe.sadd(uuids_key, *new_uuids)
                    if is_main:
                        pipe.hset(self._sessions(project_key), claude_sid, now_ms)
                        pipe.sadd(keys.transcript_projects(self.session_id), project_key)
                        if self._fold is not None:
                            # The fold is pure SDK logic; the sidecar's mtime is our storage time,
                            # the same clock list_sessions() reports.
                            summary = dict(self._fold(prev_summary, dict(key), list(fresh)))
                            summary["mtime"] = now_ms
                            pipe.hset(summaries_key, claude_sid, json.dumps(summary, separators=(",", ":")))
                    else:
                        pipe.sadd(self._subkeys(project_key, claude_sid), subpath)
                    await pipe.execute()
                    return
            except redis_errors.WatchError:
                continue
        raise RuntimeError(f"transcript append kept conflicting after {_MAX_CONFLICT_RETRIES} attempts")

    @staticmethod
    async def _new_entries(
        pipe: Any, uuids_key: str, entries: list[TranscriptEntry]
    ) -> list[TranscriptEntry]:
        """The entries of a batch not stored yet (by uuid); entries without a uuid always count."""
        uuids = [e.get("uuid") for e in entries]
        known: set[str] = set()
        candidates = sorted({u for u in uuids if isinstance(u, str)})
        if candidates:
            flags = await pipe.smismember(uuids_key, candidates)
            known = {u for u, flag in zip(candidates, flags, strict=True) if flag}
        fresh: list[TranscriptEntry] = []
        for entry, uid in zip(entries, uuids, strict=True):
            if isinstance(uid, str):
                if uid in known:
                    continue
                known.add(uid)
            fresh.append(entry)
        return fresh

    async def load(self, key: TranscriptKey) -> list[TranscriptEntry] | None:
        """Every entry of a transcript in append order; None when nothing was ever stored."""
        transcript = _transcript_id(key["project_key"], key["session_id"], key.get("subpath"))
        raw = await self._redis.lrange(self._entries(transcript), 0, -1)
        if not raw:
            return None
        return [json.loads(item) for item in raw]

    async def list_sessions(self, project_key: str) -> list[TranscriptListEntry]:
        raw = await self._redis.hgetall(self._sessions(project_key))
        return [{"session_id": str(sid), "mtime": int(mtime)} for sid, mtime in raw.items()]

    async def list_session_summaries(self, project_key: str) -> list[TranscriptSummary]:
        raw = await self._redis.hgetall(self._summaries(project_key))
        return [json.loads(value) for value in raw.values()]

    async def delete(self, key: TranscriptKey) -> None:
        """Delete one transcript; deleting a main transcript cascades to its subagent transcripts."""
        project_key, claude_sid = key["project_key"], key["session_id"]
        subpath = key.get("subpath")
        if subpath:
            transcript = _transcript_id(project_key, claude_sid, subpath)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._entries(transcript), self._uuids(transcript))
                pipe.srem(
                    keys.session_registry(self.session_id), self._entries(transcript), self._uuids(transcript)
                )
                pipe.srem(self._subkeys(project_key, claude_sid), subpath)
                await pipe.execute()
            return
        subkeys_key = self._subkeys(project_key, claude_sid)
        subpaths = [str(s) for s in await self._redis.smembers(subkeys_key)]
        doomed = [subkeys_key]
        for sub in [None, *subpaths]:
            transcript = _transcript_id(project_key, claude_sid, sub)
            doomed += [self._entries(transcript), self._uuids(transcript)]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(*doomed)
            pipe.srem(keys.session_registry(self.session_id), *doomed)
            pipe.hdel(self._sessions(project_key), claude_sid)
            pipe.hdel(self._summaries(project_key), claude_sid)
            await pipe.execute()

    async def list_subkeys(self, key: TranscriptListKey) -> list[str]:
        members = await self._redis.smembers(self._subkeys(key["project_key"], key["session_id"]))
        return sorted(str(m) for m in members)

    # -- beyond the protocol ----------------------------------------------------------------------

    async def project_keys(self) -> list[str]:
        """Every project key that has held a main transcript of this flyswarm session."""
        return sorted(str(p) for p in await self._redis.smembers(keys.transcript_projects(self.session_id)))

    async def find_project_key(self, claude_session_id: str) -> str | None:
        """The project key under which a Claude session's main transcript is stored, if any."""
        for project_key in await self.project_keys():
            if await self._redis.hexists(self._sessions(project_key), claude_session_id):
                return project_key
        return None

    async def copy_transcript(self, claude_session_id: str, from_project: str, to_project: str) -> int:
        """Copy a main transcript (and its subagent transcripts) to another project key (a cwd change)."""
        return await copy_transcript(self, claude_session_id, from_project, to_project)
