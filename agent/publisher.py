"""The event publisher: SDK loop -> queue -> one writer task -> the session's event stream.

Emitting never blocks the SDK loop (a slow or briefly unreachable control plane must not stall a
turn); one writer keeps the stream in order, sends what queued up meanwhile as one batch (one
request), and retries while the control plane is away. The queue is bounded: if it stays away long
enough to fill it, the oldest events are dropped (and counted) rather than memory growing without
end. :meth:`flush` waits for the queue to drain, with a deadline, which is how the agent makes sure
the last events are stored before it reports and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from agent.channel import AgentChannel
from api.logs import get_logger
from api.models import SessionEvent
from api.store_errors import StoreUnavailable

log = get_logger("agent.publisher")


class EventPublisher:
    def __init__(self, store: AgentChannel, session_id: str, *, maxsize: int = 10_000) -> None:
        self._store = store
        self._session_id = session_id
        self._queue: asyncio.Queue[SessionEvent] = asyncio.Queue(maxsize=maxsize)
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.dropped = 0
        self.batch_size = 100

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    def emit(self, event: SessionEvent) -> None:
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
                self._queue.task_done()
                self.dropped += 1
        self._queue.put_nowait(event)

    def emit_lifecycle(self, type_: str, message: str | None = None, **data: Any) -> None:
        """A lifecycle event of the agent itself (``agent_started``, ``turn_finished``, ...)."""
        clean = {k: v for k, v in data.items() if v is not None}
        self.emit(SessionEvent(type=type_, source="agent", message=message, data=clean))

    async def _run(self) -> None:
        while True:
            # Whatever queued up while the last batch was written goes in one request.
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            delay = 0.1
            while True:
                try:
                    await self._store.append_events(self._session_id, batch)
                    self.published += len(batch)
                    break
                except StoreUnavailable:
                    log.warning("event_write_failed", event_type=batch[0].type, retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            for _ in batch:
                self._queue.task_done()

    async def flush(self, timeout: float) -> bool:
        """Wait until every emitted event is written; False when the deadline passed first."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("event_flush_timed_out", pending=self._queue.qsize())
            return False
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
