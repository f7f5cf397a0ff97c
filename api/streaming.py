"""Following a session's event stream, for Server-Sent Events and WebSockets alike.

:func:`follow_events` replays a session's events after a given stream id, then (when following)
blocks on the stream for new ones. Between events it yields a :class:`Tick` every keep-alive
interval, and at each tick it looks at the session: a removed session ends the feed (``deleted``),
and so does a finished one once a whole interval passed without events (``finished``), so that a
``logs -f`` returns after the end instead of hanging until the record's TTL.

Blocking reads are cut into slices shorter than the Redis socket timeout (a block longer than the
socket timeout would look like a dead server). A client that disconnects cancels the feed; the
blocked read is abandoned with its connection, which redis-py then discards.

:func:`sse_frame` renders one event as ``id:``/``event:``/``data:`` lines; ``data`` is the event's JSON
on one line, so it never contains a raw newline.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from api.store import ApiStore, StoredEvent

REPLAY_BATCH = 200
_STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")
_EVENT_NAME_UNSAFE = re.compile(r"[\r\n:]+")


@dataclass(frozen=True)
class Tick:
    """Nothing happened for one keep-alive interval (SSE sends a comment, WebSocket nothing)."""


@dataclass(frozen=True)
class End:
    """The feed is over: the session was removed, or it finished and went quiet."""

    reason: Literal["deleted", "finished"]


FeedItem = StoredEvent | Tick | End


def parse_stream_id(value: str | None) -> str | None:
    """A Redis stream id (``<ms>-<seq>``) to resume after; ``0``/``0-0``/empty mean from the start.

    Raises ValueError with a reason when the value is not a stream id.
    """
    if value is None:
        return None
    value = value.strip()
    if value in ("", "0", "0-0"):
        return None
    if not _STREAM_ID_RE.match(value):
        raise ValueError("must be an event id as sent in `id:` (<milliseconds>-<sequence>), or 0")
    return value


async def follow_events(
    store: ApiStore,
    session_id: str,
    after: str | None,
    *,
    follow: bool,
    keepalive_seconds: float,
    block_slice_seconds: float,
) -> AsyncIterator[FeedItem]:
    """Events after ``after`` (exclusive), then, when following, new ones as they come."""
    last = after
    while True:
        batch = await store.read_events(session_id, last, count=REPLAY_BATCH)
        for item in batch:
            last = item.id
            yield item
        if len(batch) < REPLAY_BATCH:
            break
    if not follow:
        return
    quiet_since = time.monotonic()
    while True:
        remaining = keepalive_seconds - (time.monotonic() - quiet_since)
        if remaining <= 0:
            session = await store.get(session_id)
            if session is None:
                yield End("deleted")
                return
            if session.effective_phase().finished:
                yield End("finished")
                return
            yield Tick()
            quiet_since = time.monotonic()
            continue
        block_ms = max(1, int(min(remaining, block_slice_seconds) * 1000))
        batch = await store.read_events(session_id, last, count=REPLAY_BATCH, block_ms=block_ms)
        for item in batch:
            last = item.id
            yield item
        if batch:
            quiet_since = time.monotonic()


def sse_frame(item: StoredEvent) -> bytes:
    name = _EVENT_NAME_UNSAFE.sub("_", item.event.type) or "message"
    return f"id: {item.id}\nevent: {name}\ndata: {item.event.model_dump_json()}\n\n".encode()


def sse_end_frame(reason: str) -> bytes:
    return f"event: end\ndata: {json.dumps({'reason': reason})}\n\n".encode()


SSE_KEEPALIVE = b": keep-alive\n\n"
