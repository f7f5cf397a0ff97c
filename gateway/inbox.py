"""The inbox long-poll: every agent of this gateway process waiting on its inbox, over one Redis read.

A chat agent spends most of its life waiting for the next message. If each wait were a blocking
``XREAD`` it would hold a Redis connection per agent: thousands of idle agents, thousands of
connections. Here a wait costs a future: :class:`InboxHub` runs one reader task issuing a single
``XREAD BLOCK`` (a slice of ``block_ms``) over the inbox stream of every waiting session, from the
id each one has acknowledged, and wakes the waiters of the streams that moved. A new session joining
interrupts the read in flight so it is read at once rather than a slice later. The reader ends when
nobody waits, holding no connection.

:class:`InboxWaits` is the interface the channel depends on. It is the same shape as the API's
event fan-out (``api.fanout.Hub``: a few multiplexing readers over per-follower buffers, joining
from a cursor): once that hub can follow inbox streams, an adapter with this one method swaps in.

A wake is a hint, not a delivery: the channel reads the message itself (``XRANGE`` after the
acknowledged id), so a message is never lost to a race between the look and the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Protocol

from api.logs import get_logger
from api.store_channel import ChannelStore
from api.store_errors import StoreUnavailable

log = get_logger("gateway.inbox")
_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0)


class ReadMany(Protocol):
    def __call__(self, cursors: dict[str, str], *, block_ms: int) -> Awaitable[dict[str, str]]: ...


class InboxWaits(Protocol):
    async def wait(self, session_id: str, after_id: str, timeout: float) -> bool:
        """Return when the inbox has an entry after ``after_id`` (True) or at ``timeout`` (False)."""
        ...


class _Waiting:
    __slots__ = ("cursor", "futures")

    def __init__(self, cursor: str) -> None:
        self.cursor = cursor
        self.futures: set[asyncio.Future[None]] = set()


def _older(a: str, b: str) -> bool:
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) < (int(bms), int(bseq or 0))


class InboxHub:
    """One process's inbox waits, served by one multiplexing reader."""

    def __init__(
        self, store: ChannelStore, *, block_ms: int = 1000, read_many: ReadMany | None = None
    ) -> None:
        self.store = store
        self.block_ms = block_ms
        # What the one reader reads: the inbox streams, unless another per-session stream is given
        # (the live-file requests, :mod:`gateway.files`, wait the same way).
        self._read_many: ReadMany = read_many or store.inbox_read_many
        self._waiting: dict[str, _Waiting] = {}
        self._task: asyncio.Task[None] | None = None
        self._read: asyncio.Future[dict[str, str]] | None = None
        self._reading: set[str] = set()

    @property
    def waiting(self) -> int:
        """Sessions being waited on right now (what the one reader reads)."""
        return len(self._waiting)

    async def wait(self, session_id: str, after_id: str, timeout: float) -> bool:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.get(session_id)
        if waiting is None:
            waiting = self._waiting[session_id] = _Waiting(after_id)
        elif _older(after_id, waiting.cursor):
            waiting.cursor = after_id
        waiting.futures.add(future)
        self._ensure_reading(session_id)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiting.futures.discard(future)
            if not waiting.futures and self._waiting.get(session_id) is waiting:
                del self._waiting[session_id]

    def _ensure_reading(self, session_id: str) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="inbox-reader")
        elif self._read is not None and session_id not in self._reading:
            self._read.cancel()  # restart the read with the new stream in it

    async def _run(self) -> None:
        failures = 0
        while self._waiting:
            cursors = {sid: w.cursor for sid, w in self._waiting.items()}
            self._reading = set(cursors)
            read = self._read = asyncio.ensure_future(self._read_many(cursors, block_ms=self.block_ms))
            try:
                await asyncio.wait({read})
            finally:
                self._read = None
                read.cancel()
                read.add_done_callback(_retrieve)
            if read.cancelled():
                continue
            try:
                moved = read.result()
            except StoreUnavailable:
                # The waiters time out and the agent asks again; meanwhile retry from the cursors.
                await asyncio.sleep(_RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)])
                failures += 1
                continue
            except Exception as exc:  # a bug or an unexpected reply: keep serving
                log.error("inbox_read_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            failures = 0
            for session_id, last in moved.items():
                waiting = self._waiting.get(session_id)
                if waiting is None:
                    continue
                waiting.cursor = last
                for future in waiting.futures:
                    if not future.done():
                        future.set_result(None)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _retrieve(task: asyncio.Future[dict[str, str]]) -> None:
    if not task.cancelled():
        task.exception()
