"""Live files: the API asks a running agent for a listing or a file, through Redis and the gateway.

The API cannot reach a machine (and should not: the agent holds no inbound port), and agents never
reach Redis. So a request travels like a chat message:

1. the API appends ``{id, path, maxBytes}`` to the session's request stream
   (:func:`api.keys.file_requests`, capped at :data:`REQUESTS_MAXLEN`; a fixed key of the session,
   removed with it);
2. the agent long-polls ``GET /agent/v1/files/next`` on the gateway (served by one multiplexing
   ``XREAD`` for every waiting agent, as the inbox is), reads the file from its work dir and answers
   ``POST /agent/v1/files/reply``; the gateway writes the answer to :func:`api.keys.file_reply`
   (a string with a :data:`REPLY_TTL_SECONDS` TTL) and deletes the request from the stream;
3. the API polls that reply key until its timeout and deletes it as it reads it (``GETDEL``).

A request nobody answers (no agent, or one that died) stays in the stream until the stream's cap
pushes it out or the session is removed; an agent that starts later answers it, and the reply
expires unread. Stale, harmless, bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from api import keys
from api.store_base import StoreBase, unavailable_on_redis_error

REQUESTS_MAXLEN = 100
REPLY_TTL_SECONDS = 60
POLL_SECONDS = 0.05


class FileRequests(StoreBase):
    """The API's half: put a request, wait for its answer."""

    @unavailable_on_redis_error
    async def agent_alive(self, session_id: str) -> bool:
        """Whether the session's agent beats (its heartbeat key exists)."""
        return bool(await self._redis.exists(keys.heartbeat(session_id)))

    @unavailable_on_redis_error
    async def request_file(self, session_id: str, request: dict[str, Any]) -> None:
        await self._redis.xadd(
            keys.file_requests(session_id),
            {"r": json.dumps(request)},
            maxlen=REQUESTS_MAXLEN,
            approximate=False,
        )

    async def await_reply(self, session_id: str, request_id: str, timeout: float) -> dict[str, Any] | None:
        """The agent's answer to ``request_id``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            raw = await self._take_reply(session_id, request_id)
            if raw is not None:
                answer: dict[str, Any] = json.loads(raw)
                return answer
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(POLL_SECONDS)

    @unavailable_on_redis_error
    async def _take_reply(self, session_id: str, request_id: str) -> str | None:
        raw = await self._redis.getdel(keys.file_reply(session_id, request_id))
        return None if raw is None else str(raw)


class FileAnswers(StoreBase):
    """The gateway's half: hand requests to the agent, store its answers."""

    @unavailable_on_redis_error
    async def file_requests_after(
        self, session_id: str, after_id: str, count: int = 10
    ) -> list[tuple[str, dict[str, Any]]]:
        """Requests after stream id ``after_id`` (exclusive), oldest first: ``[(stream id, request)]``."""
        entries = await self._redis.xrange(keys.file_requests(session_id), min=f"({after_id}", count=count)
        return [(str(entry_id), json.loads(fields["r"])) for entry_id, fields in entries]

    @unavailable_on_redis_error
    async def file_requests_read_many(self, cursors: dict[str, str], *, block_ms: int) -> dict[str, str]:
        """One blocking read over many sessions' request streams (the gateway's hub, as for inboxes)."""
        by_key = {keys.file_requests(sid): sid for sid in cursors}
        found = await self._read_streams(
            {keys.file_requests(sid): last for sid, last in cursors.items()}, count=100, block_ms=block_ms
        )
        return {by_key[stream]: str(entries[-1][0]) for stream, entries in found}

    @unavailable_on_redis_error
    async def answer_file_request(
        self, session_id: str, stream_id: str, request_id: str, answer: dict[str, Any]
    ) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.file_reply(session_id, request_id), json.dumps(answer), ex=REPLY_TTL_SECONDS)
            pipe.xdel(keys.file_requests(session_id), stream_id)
            await pipe.execute()
