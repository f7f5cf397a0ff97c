"""Fan-out: every follower of every session in one API process, over a few Redis connections.

A follower (one SSE response or one WebSocket) never reads Redis for live events itself. The
:class:`Hub` runs at most ``readers`` reader tasks; each one holds one connection of the store's
blocking pool and issues a single ``XREAD BLOCK`` over every session stream assigned to it (a stream
is assigned to the reader with the fewest streams when its first follower arrives, and dropped when
its last follower leaves; a reader with no streams ends and holds no connection). What a reader
reads is rendered once (:class:`Delivery`) and offered to each follower's bounded buffer.

Exactly once, in order, across history and live events. A follower first replays history from its
cursor with ``XRANGE`` (ordinary pool), then joins the stream's live feed. Joining is synchronous,
so it learns the reader's cursor ``C`` at that instant: every event after ``C`` will be offered to
it. If its history ended before ``C`` it reads the gap with ``XRANGE`` again; then it takes the
live buffer, skipping any event whose id is not after the last one it delivered.

Back-pressure. Offering never waits: a follower whose buffer would pass ``buffer`` events is cut
(reason ``slow``), its buffer is dropped, and the transport is interrupted even when it is blocked
writing to a stalled socket (``on_cut``). The client resumes from its cursor (``Last-Event-ID``).
New followers past ``max_followers`` are refused with :class:`HubFull` (the API answers 503).
Fairness: one event for thousands of followers is thousands of socket writes, so followers are woken
``FANOUT_SLICE`` at a time with a turn of the event loop in between; a POST or a probe waiting on
Redis is served between slices rather than after the whole burst.

Keep-alives and the end of a stream are the hub's too: a ticker offers a :class:`Tick` to every
follower idle for ``keepalive_seconds`` and, for each stream quiet that long, reads its session once
(not once per follower) to end the feed when the session was removed or has finished.

While Redis is down a reader retries from its cursor; followers stay connected and keep getting
keep-alives, then receive what was appended meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from api.follower import Delivery, FeedItem, Follower, FollowerCut, Transport, after, parse_key
from api.logs import get_logger
from api.metrics import ApiMetrics
from api.store import ApiStore, StoredEvent
from api.store_base import StoreUnavailable
from api.streaming import REPLAY_BATCH, End

_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0)
FANOUT_SLICE = 100  # followers woken per turn of the event loop
_log = get_logger("api.fanout")


class HubFull(RuntimeError):
    """The process already serves ``max_followers`` followers."""


class _Stream:
    """One followed session: its followers, and the last id its reader fanned out."""

    __slots__ = ("checked_at", "cursor", "followers", "quiet_since", "reader", "session_id")

    def __init__(self, session_id: str, cursor: str, reader: _Reader) -> None:
        self.session_id = session_id
        self.cursor = cursor
        self.reader = reader
        self.followers: set[Follower] = set()
        self.quiet_since = self.checked_at = time.monotonic()


class _Reader:
    """One multiplexing reader: a loop of ``XREAD BLOCK`` over the streams assigned to it."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.streams: dict[str, _Stream] = {}
        self.task: asyncio.Task[None] | None = None
        self._read: asyncio.Task[dict[str, list[StoredEvent]]] | None = None
        self._reading: set[str] = set()

    def add(self, stream: _Stream) -> None:
        self.streams[stream.session_id] = stream
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="fanout-reader")
            self.hub.metrics.stream_readers.inc()
        elif self._read is not None and stream.session_id not in self._reading:
            # Its read does not include the new stream: interrupt it rather than wait a slice out.
            self._read.cancel()

    async def _run(self) -> None:
        failures = 0
        try:
            while self.streams:
                cursors = {sid: s.cursor for sid, s in self.streams.items()}
                self._reading = set(cursors)
                read = self._read = asyncio.ensure_future(
                    self.hub.store.read_events_many(
                        cursors, count=self.hub.read_count, block_ms=self.hub.block_ms
                    )
                )
                try:
                    await asyncio.wait({read})
                finally:
                    self._read = None
                    read.cancel()  # only matters when this reader itself is being cancelled
                    read.add_done_callback(_retrieve)
                if read.cancelled():
                    continue  # a stream was added: read again with it
                try:
                    found = read.result()
                except Exception as exc:
                    # Down or busy (or a bug): keep every follower, retry from the cursors.
                    if not isinstance(exc, StoreUnavailable):
                        _log.error("fanout_read_failed", error=type(exc).__name__)
                    await asyncio.sleep(_RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)])
                    failures += 1
                    continue
                failures = 0
                await self.hub.fan_out(found)
        finally:
            self.hub.metrics.stream_readers.dec()


def _retrieve(task: asyncio.Future[dict[str, list[StoredEvent]]]) -> None:
    """Mark a read's failure as seen (a cancelled reader never looks at it)."""
    if not task.cancelled():
        task.exception()


class Hub:
    """The process's followers, their streams and the readers feeding them (``app.state``'s one)."""

    def __init__(
        self,
        store: ApiStore,
        metrics: ApiMetrics,
        *,
        readers: int,
        max_followers: int,
        buffer: int,
        keepalive_seconds: float,
        block_slice_seconds: float,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_followers = max_followers
        self.buffer = buffer
        self.keepalive_seconds = keepalive_seconds
        self.block_ms = max(1, int(block_slice_seconds * 1000))
        # One read never brings more than a follower may buffer, so a burst alone cuts nobody.
        self.read_count = min(REPLAY_BATCH, buffer)
        self.followers = 0
        self._readers = [_Reader(self) for _ in range(readers)]
        self._streams: dict[str, _Stream] = {}
        self._ticker: asyncio.Task[None] | None = None

    # -- followers --------------------------------------------------------------------------------

    async def events(
        self,
        session_id: str,
        cursor: str | None,
        transport: Transport,
        on_cut: Callable[[], None] | None = None,
    ) -> AsyncGenerator[FeedItem, None]:
        """Events after ``cursor`` (history, then live), keep-alive ticks, and the end.

        Raises :class:`HubFull` before yielding anything when the process is at its follower limit,
        :class:`FollowerCut` when the follower fell behind, :class:`StoreUnavailable` when history
        cannot be read.
        """
        if self.followers >= self.max_followers:
            raise HubFull(f"this API process already serves {self.max_followers} followers")
        follower = Follower(transport, self.buffer, on_cut)
        self.followers += 1
        self.metrics.followers.labels(transport).inc()
        last = cursor
        try:
            async for item in self._history(session_id, last, None):
                last = item.id
                yield item
            joined = self._join(session_id, follower, last)
            async for item in self._history(session_id, last, joined):
                last = item.id
                yield item
            last_key = parse_key(last) if last is not None else (-1, -1)
            while True:
                try:
                    got = await follower.get()
                except FollowerCut as cut:
                    raise FollowerCut(cut.reason, last) from None
                if isinstance(got, Delivery):
                    if got.key <= last_key:
                        continue  # already sent from history
                    last, last_key = got.id, got.key
                yield got
                if isinstance(got, End):
                    return
        finally:
            self._leave(session_id, follower)
            self.followers -= 1
            self.metrics.followers.labels(transport).dec()
            if follower.cut_reason is not None:
                self.metrics.slow_disconnects.labels(transport).inc()

    async def _history(self, session_id: str, last: str | None, upto: str | None) -> AsyncIterator[Delivery]:
        """Stored events after ``last``: all of them (``upto`` None), or until ``upto`` is passed."""
        if upto is not None and not after(upto, last):
            return
        while True:
            batch = await self.store.read_events(session_id, last, count=REPLAY_BATCH)
            for stored in batch:
                last = stored.id
                yield Delivery(stored)
            if len(batch) < REPLAY_BATCH or (upto is not None and last is not None and not after(upto, last)):
                return

    def _join(self, session_id: str, follower: Follower, last: str | None) -> str:
        """Attach ``follower`` to the live feed; returns the cursor after which it gets every event."""
        stream = self._streams.get(session_id)
        if stream is None:
            reader = min(self._readers, key=lambda r: len(r.streams))
            stream = self._streams[session_id] = _Stream(session_id, last or "0-0", reader)
            reader.add(stream)
            self.metrics.followed_streams.set(len(self._streams))
        stream.followers.add(follower)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick_loop(), name="fanout-ticker")
        return stream.cursor

    def _leave(self, session_id: str, follower: Follower) -> None:
        stream = self._streams.get(session_id)
        if stream is None or follower not in stream.followers:
            return
        stream.followers.discard(follower)
        if not stream.followers:
            self._drop(stream)

    def _drop(self, stream: _Stream) -> None:
        self._streams.pop(stream.session_id, None)
        stream.reader.streams.pop(stream.session_id, None)
        self.metrics.followed_streams.set(len(self._streams))

    # -- readers and ticker -----------------------------------------------------------------------

    async def fan_out(self, found: dict[str, list[StoredEvent]]) -> None:
        """Offer what a reader read to every follower of each stream.

        Offering never waits on a follower. Followers are woken a slice at a time, letting the
        event loop run in between, so that requests (a POST waiting on Redis, a probe) are served
        between slices instead of after thousands of sends.
        """
        now = time.monotonic()
        for session_id, batch in found.items():
            stream = self._streams.get(session_id)
            if stream is None or not batch:
                continue
            fresh = [Delivery(s) for s in batch if after(s.id, stream.cursor)]
            if not fresh:
                continue
            stream.cursor = fresh[-1].id
            stream.quiet_since = now
            # The cursor moved first: a follower joining while we slice reads the gap from history.
            followers = list(stream.followers)
            for start in range(0, len(followers), FANOUT_SLICE):
                if start:
                    await asyncio.sleep(0)
                for follower in followers[start : start + FANOUT_SLICE]:
                    follower.offer(fresh)
            self.metrics.fanned_out.inc(len(fresh) * len(followers))

    async def _tick_loop(self) -> None:
        period = max(0.05, self.keepalive_seconds / 2)
        while self._streams:
            await asyncio.sleep(period)
            now = time.monotonic()
            quiet: list[_Stream] = []
            for stream in list(self._streams.values()):
                for follower in stream.followers:
                    if now - follower.idle_since >= self.keepalive_seconds:
                        follower.tick()
                if (
                    now - stream.quiet_since >= self.keepalive_seconds
                    and now - stream.checked_at >= self.keepalive_seconds
                ):
                    quiet.append(stream)
            if quiet:
                await self._check_liveness(quiet)

    async def _check_liveness(self, quiet: list[_Stream]) -> None:
        """End the feeds of removed sessions, and of finished ones that stayed quiet an interval."""
        try:
            sessions = {s.id: s for s in await self.store.get_many([q.session_id for q in quiet])}
        except StoreUnavailable:
            return  # unknown is not gone: keep following
        now = time.monotonic()
        for stream in quiet:
            stream.checked_at = now
            session = sessions.get(stream.session_id)
            if session is not None and not session.effective_phase().finished:
                continue
            if self._streams.get(stream.session_id) is not stream:
                continue  # left or was replaced while we read
            end = End("deleted" if session is None else "finished")
            for follower in list(stream.followers):
                follower.end(end)
            self._drop(stream)

    async def aclose(self) -> None:
        tasks = [t for t in (self._ticker, *(r.task for r in self._readers)) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
