"""One follower of a session's events: its bounded buffer, what it is fed, and how it is cut.

The hub (:mod:`api.fanout`) offers to a :class:`Follower` without ever waiting; the transport (SSE in
:mod:`api.sse`, WebSocket in :mod:`api.websocket`) takes with :meth:`Follower.get`. A follower whose
buffer would pass its limit is cut: its buffer is dropped and ``on_cut`` interrupts the transport's
:func:`cuttable` scope, even when a write to a stalled socket is what it is waiting on.
Each event is rendered once for all followers (:class:`Delivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Literal

from api.store import StoredEvent
from api.streaming import End, Tick, sse_frame

Transport = Literal["sse", "ws"]


def parse_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def after(a: str, b: str | None) -> bool:
    """Whether stream id ``a`` comes after ``b`` (``None`` = before everything)."""
    return b is None or parse_key(a) > parse_key(b)


class Delivery:
    """One event as fanned out: rendered once for SSE and once for WebSocket, whatever the followers."""

    __slots__ = ("_sse", "_ws", "id", "key", "stored")

    def __init__(self, stored: StoredEvent) -> None:
        self.stored = stored
        self.id = stored.id
        self.key = parse_key(stored.id)  # parsed once, compared by every follower
        self._sse: bytes | None = None
        self._ws: str | None = None

    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = sse_frame(self.stored)
        return self._sse

    def ws(self) -> str:
        if self._ws is None:
            event = self.stored.event.model_dump(mode="json")
            self._ws = json.dumps({"type": "event", "id": self.id, "event": event})
        return self._ws


FeedItem = Delivery | Tick | End


class FollowerCut(RuntimeError):
    """The follower fell too far behind and was disconnected; it resumes from its cursor."""

    def __init__(self, reason: str, last_id: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.last_id = last_id


@contextlib.asynccontextmanager
async def cuttable() -> AsyncIterator[Callable[[], None]]:
    """A scope the hub can cut from outside: yields ``interrupt``, which makes whatever the scope
    awaits right now (a send blocked on a stalled client included) stop, and the scope raise
    ``TimeoutError``. Calling it after the scope ended does nothing.
    """
    loop = asyncio.get_running_loop()
    active = True
    async with asyncio.timeout(None) as deadline:

        def interrupt() -> None:
            if active:
                deadline.reschedule(loop.time())

        try:
            yield interrupt
        finally:
            active = False


class Follower:
    """One follower's bounded buffer. The hub offers; the transport takes with :meth:`get`."""

    __slots__ = ("_pending", "_waiter", "cut_reason", "idle_since", "limit", "on_cut", "transport")

    def __init__(self, transport: Transport, limit: int, on_cut: Callable[[], None] | None) -> None:
        self.transport = transport
        self.limit = limit
        self.on_cut = on_cut
        self.cut_reason: str | None = None
        self.idle_since = time.monotonic()
        self._pending: deque[FeedItem] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def offer(self, items: list[Delivery]) -> bool:
        """Buffer live events; False (and the follower is cut) when that would pass its limit."""
        if self.cut_reason is not None:
            return True
        if len(self._pending) + len(items) > self.limit:
            self.cut("slow")
            return False
        self._pending.extend(items)
        self._wake()
        return True

    def tick(self) -> None:
        if not self._pending and self.cut_reason is None:
            self._pending.append(Tick())
            self._wake()

    def end(self, item: End) -> None:
        self._pending.append(item)
        self._wake()

    def cut(self, reason: str) -> None:
        self.cut_reason = reason
        self._pending.clear()
        self._wake()
        if self.on_cut is not None:
            self.on_cut()

    async def get(self) -> FeedItem:
        while not self._pending:
            if self.cut_reason is not None:
                raise FollowerCut(self.cut_reason, None)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.idle_since = time.monotonic()
        return self._pending.popleft()
