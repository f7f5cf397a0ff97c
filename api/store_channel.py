"""The agent channel's store: what the control plane does for an agent, scoped by its token.

A role of the store (see :mod:`api.store_base`), used by :mod:`gateway.channel` only. Agents hold
no Redis credential: their heartbeats, reports, events, inbox and transcripts reach Redis through
the gateway, which serves them with these methods for the one session its token names. It is
:class:`api.store_agent.AgentStore` (the very operations the agent used to run itself) plus:

* :meth:`ChannelStore.admission` - one pipelined round trip per request: the token's stored digest
  and the session's ``deleted`` and ``status`` fields (not the whole hash: a heartbeat stays cheap);
* :meth:`ChannelStore.append_events` - a batch of events in one round trip;
* :class:`api.store_pool_slots.PoolSlots` - a parked pool agent's booted mark and assignment, by
  its pool slot token (the pool routes, :mod:`gateway.pool_routes`);
* :meth:`ChannelStore.inbox_peek` and :meth:`ChannelStore.inbox_read_many` - the inbox long-poll:
  one non-blocking look, then a wait that one multiplexing ``XREAD`` serves for every waiting
  agent of the process (:mod:`gateway.inbox`), never a blocking read (and a connection) per agent;
* the agent's artifact uploads (:mod:`api.store_artifacts`) and its answers to live-file requests
  (:mod:`api.store_files`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Self, TypeVar

from api import keys
from api.models import TERMINAL_PHASES, InboxMessage, SessionEvent
from api.store_agent import AgentStore
from api.store_artifacts import ArtifactWrites
from api.store_base import unavailable_on_redis_error
from api.store_files import FileAnswers
from api.store_pool_slots import PoolSlots

T = TypeVar("T")


@dataclass(frozen=True)
class Admission:
    """What deciding on one channel request needs: the stored token digest and the session's state."""

    token_digest: str | None
    exists: bool
    deleted: bool
    phase: str | None

    @property
    def finished(self) -> bool:
        """Finished as the controller decided it (its status), not as the agent's own report says:
        the agent still flushes its last events and beat after reporting its outcome."""
        return self.phase in TERMINAL_PHASES


#: Command connections of the channel's store, and its blocking-read connections (the inbox hub).
CHANNEL_POOL_SIZE = 64
CHANNEL_BLOCKING_POOL_SIZE = 2


class ChannelStore(AgentStore, ArtifactWrites, FileAnswers, PoolSlots):
    """Async access for the agent channel of the gateway. One instance per process."""

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        socket_timeout: float = 5.0,
        max_connections: int = CHANNEL_POOL_SIZE,
        retries: int = 2,
    ) -> Self:
        """A store on *bounded* pools: a burst of thousands of agents' requests queues for at most
        ``max_connections`` command connections (waiting up to ``socket_timeout``) instead of
        opening one each; the inbox hub's multiplexed blocking read has its own small pool."""
        return cls.from_url(
            url,
            socket_timeout=socket_timeout,
            retries=retries,
            pool_size=max_connections,
            pool_timeout=socket_timeout,
            blocking_pool_size=CHANNEL_BLOCKING_POOL_SIZE,
        )

    @unavailable_on_redis_error
    async def admission(self, session_id: str) -> Admission:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.session_token(session_id))
            pipe.hmget(keys.session(session_id), ["spec", "deleted", "status"])
            digest, (spec, deleted, status) = await pipe.execute()
        phase = None
        if status:
            try:
                phase = json.loads(status).get("phase")
            except ValueError:
                phase = None
        return Admission(
            token_digest=str(digest) if digest else None,
            exists=spec is not None,
            deleted=bool(deleted),
            phase=phase,
        )

    @unavailable_on_redis_error
    async def append_events(self, session_id: str, events: Sequence[SessionEvent]) -> list[str]:
        """Append a batch in order, in one round trip; returns the entry ids."""
        if not events:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(
                    keys.events(session_id),
                    {"e": event.model_dump_json()},
                    maxlen=self.events_maxlen,
                    approximate=True,
                )
            return [str(entry_id) for entry_id in await pipe.execute()]

    @unavailable_on_redis_error
    async def inbox_peek(self, session_id: str) -> tuple[str, InboxMessage | None]:
        """The acknowledged id and the oldest message after it (None: nothing to do yet)."""
        return await self._inbox_after(session_id)

    @unavailable_on_redis_error
    async def inbox_read_many(self, cursors: dict[str, str], *, block_ms: int) -> dict[str, str]:
        """One blocking ``XREAD`` over many sessions' inboxes: ``{session id: last id seen}`` in,
        ``{session id: newest id after it}`` out, for the sessions that got messages (on a cluster,
        a pipelined poll instead: :meth:`api.store_base.StoreBase._read_streams`)."""
        by_key = {keys.inbox(sid): sid for sid in cursors}
        found = await self._read_streams(
            {keys.inbox(sid): last for sid, last in cursors.items()}, count=100, block_ms=block_ms
        )
        return {by_key[stream]: str(entries[-1][0]) for stream, entries in found}


@unavailable_on_redis_error
async def guarded(operation: Awaitable[T]) -> T:
    """Await a transcript-store operation (:class:`api.transcripts.RedisTranscriptStore`), with
    Redis errors mapped like every store method's (:class:`api.store_errors.StoreUnavailable`)."""
    return await operation
