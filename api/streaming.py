"""Pieces of a session's event stream shared by Server-Sent Events and WebSockets.

Stream ids (:func:`parse_stream_id`), the feed items besides events (:class:`Tick`, :class:`End`),
the replay of stored events (:func:`replay_events`, for ``follow=false``) and the SSE frames.
Following live events is :mod:`api.fanout`'s: one process's followers share a few Redis readers.

:func:`sse_frame` renders one event as ``id:``/``event:``/``data:`` lines; ``data`` is the event's JSON
on one line, so it never contains a raw newline.
"""

from __future__ import annotations

import json
import re
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


async def replay_events(store: ApiStore, session_id: str, after: str | None) -> AsyncIterator[StoredEvent]:
    """The stored events after ``after`` (exclusive), in order, read a batch at a time."""
    last = after
    while True:
        batch = await store.read_events(session_id, last, count=REPLAY_BATCH)
        for item in batch:
            last = item.id
            yield item
        if len(batch) < REPLAY_BATCH:
            return


def sse_frame(item: StoredEvent) -> bytes:
    name = _EVENT_NAME_UNSAFE.sub("_", item.event.type) or "message"
    return f"id: {item.id}\nevent: {name}\ndata: {item.event.model_dump_json()}\n\n".encode()


def sse_end_frame(reason: str) -> bytes:
    return f"event: end\ndata: {json.dumps({'reason': reason})}\n\n".encode()


SSE_KEEPALIVE = b": keep-alive\n\n"
