"""The agent's store: the narrow access of one agent to its own session.

A role of the store (see :mod:`api.store_base`). The agent in a machine connects as its session's
ACL user, which reaches only ``fs:{<id>}:*`` and its own wake channel, so every method here touches
one session's keys: its record (read), its report (the ``agent`` field, then a wake publish), its
heartbeat, its event stream, its inbox, and its Claude transcripts
(:class:`api.transcripts.RedisTranscriptStore`, built here on the same connection).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from api import keys
from api.models import AgentReport, Heartbeat, InboxMessage, utcnow
from api.store_base import EventWrites, unavailable_on_redis_error
from api.transcripts import RedisTranscriptStore, SummaryFold

# KEYS: session hash. ARGV: field, json. Writes only if the session exists.
_FIELD_IF_EXISTS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class AgentStore(EventWrites):
    """Async access for the agent (and the local heartbeat agent that stands in for it)."""

    def __init__(self, redis: aioredis.Redis, **kwargs: Any) -> None:
        super().__init__(redis, **kwargs)
        self._field_if_exists = redis.register_script(_FIELD_IF_EXISTS_LUA)

    def transcripts(self, session_id: str, *, fold: SummaryFold | None = None) -> RedisTranscriptStore:
        """The SDK ``SessionStore`` for this session's transcripts, on this store's connection."""
        return RedisTranscriptStore(self._redis, session_id, fold=fold)

    @unavailable_on_redis_error
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
            await self._redis.publish(keys.wake_channel(session_id), report.state)
        return bool(written)

    # -- heartbeats -------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def heartbeat(self, session_id: str, machine_id: str | None, ttl_seconds: int, state: str) -> None:
        beat = Heartbeat(machineId=machine_id, state=state, at=utcnow(), ttlSeconds=ttl_seconds)
        await self._redis.set(keys.heartbeat(session_id), beat.model_dump_json(), ex=ttl_seconds)

    async def _inbox_after(self, session_id: str) -> tuple[str, InboxMessage | None]:
        """The acknowledged id and the oldest message after it."""
        acked = await self._redis.get(keys.inbox_acked(session_id)) or "0-0"
        entries = await self._redis.xrange(keys.inbox(session_id), min=f"({acked}", max="+", count=1)
        return str(acked), _message(entries[0]) if entries else None

    @unavailable_on_redis_error
    async def inbox_next(self, session_id: str, *, block_ms: int | None = None) -> InboxMessage | None:
        """The oldest message whose turn has not been acknowledged; the same one until acked."""
        acked, message = await self._inbox_after(session_id)
        if message is None and block_ms is not None:
            reply = await self._blocking.xread({keys.inbox(session_id): acked}, count=1, block=block_ms)
            if reply and reply[0][1]:
                message = _message(reply[0][1][0])
        return message

    @unavailable_on_redis_error
    async def inbox_ack(self, session_id: str, message_id: str) -> None:
        await self._redis.set(keys.inbox_acked(session_id), message_id)


def _message(entry: tuple[str, dict[str, str]]) -> InboxMessage:
    entry_id, fields = entry
    return InboxMessage(
        id=str(entry_id), text=fields["text"], createdAt=datetime.fromisoformat(fields["createdAt"])
    )
