"""The heartbeat: a key with a TTL, rewritten by a task of its own.

The task is independent of the SDK loop, so a long tool call or a slow model does not look dead:
the heartbeat goes on as long as the agent's event loop runs. It shares that event loop on
purpose: an agent whose loop is wedged (or a stopped, hung process) stops heartbeating, and the key
expires after its TTL, which is how the controller tells a hung agent from a busy one.
:meth:`poke` beats at once (on state changes), so the heartbeat's state is never stale for long.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from agent.channel import AgentChannel
from api.logs import get_logger
from api.store_errors import StoreUnavailable

log = get_logger("agent.heartbeat")


class Heartbeat:
    def __init__(
        self,
        store: AgentChannel,
        session_id: str,
        machine_id: str | None,
        *,
        interval: float,
        ttl: int,
        state: Callable[[], str],
    ) -> None:
        self._store = store
        self._session_id = session_id
        self._machine_id = machine_id
        self._interval = interval
        self._ttl = ttl
        self._state = state
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.beats = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    def poke(self) -> None:
        self._wake.set()

    async def beat(self) -> bool:
        try:
            await self._store.heartbeat(self._session_id, self._machine_id, self._ttl, self._state())
        except StoreUnavailable:
            log.warning("heartbeat_failed")
            return False
        self.beats += 1
        return True

    async def _run(self) -> None:
        while True:
            await self.beat()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
