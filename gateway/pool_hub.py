"""Waiting pool agents: every ``/agent/v1/pool/assignment`` long-poll of this process, on one subscription.

A parked pool machine's agent waits for its assignment for minutes or days. A wait costs a future
here, not a connection: :class:`AssignmentHub` runs one reader holding one pattern subscription
(:meth:`api.store_pool_slots.PoolSlots.pool_assignment_wakes`) while anyone waits, and wakes the
waiters of a slot when the controller announces its assignment. Several gateway replicas each hold
their own subscription: the controller's ``PUBLISH`` reaches them all.

A wake is a hint, never a delivery: the waiter answers its agent "look again" and the agent's next
request takes the assignment. Pub/sub is fire-and-forget, so whenever the subscription is
(re)made every waiter is woken too: an announcement may have gone by while there was none, and a
waiter that looks again loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from api.logs import get_logger
from api.store_channel import ChannelStore
from api.store_errors import StoreUnavailable

log = get_logger("gateway.pool_hub")
_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0)

Slot = tuple[str, str]


class AssignmentHub:
    """One process's pool-assignment waits, served by one subscription."""

    def __init__(self, store: ChannelStore) -> None:
        self.store = store
        self._waiting: dict[Slot, set[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @property
    def waiting(self) -> int:
        """Slots being waited on right now."""
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def watch(
        self, pool: str, slot: str, *, ready_timeout: float
    ) -> AsyncIterator[asyncio.Future[None]]:
        """A future resolved when the slot is announced (or the subscription is remade).

        On entry the subscription is in place (or ``ready_timeout`` passed): an assignment written
        after entry wakes the future, so look at the assignment *after* entering, then wait.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        key = (pool, slot)
        self._waiting.setdefault(key, set()).add(future)
        if self._task is None or self._task.done():
            self._subscribed.clear()
            self._task = asyncio.create_task(self._run(), name="pool-assignment-reader")
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), ready_timeout)
            yield future
        finally:
            futures = self._waiting.get(key)
            if futures is not None:
                futures.discard(future)
                if not futures:
                    del self._waiting[key]

    async def _run(self) -> None:
        failures = 0
        while self._waiting:
            wakes = self.store.pool_assignment_wakes()
            try:
                async for key in wakes:
                    if key is not None:
                        self._wake(key)
                    elif not self._subscribed.is_set():
                        failures = 0
                        self._subscribed.set()
                        self._wake_all()  # anything announced while unsubscribed is looked at again
                    if not self._waiting:
                        break
            except StoreUnavailable:
                self._subscribed.clear()
                await asyncio.sleep(_RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)])
                failures += 1
            except Exception as exc:  # a bug or an unexpected reply: keep serving
                self._subscribed.clear()
                log.error("pool_assignment_read_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)
            finally:
                await wakes.aclose()
            self._subscribed.clear()

    def _wake(self, key: Slot) -> None:
        for future in self._waiting.get(key, ()):
            if not future.done():
                future.set_result(None)

    def _wake_all(self) -> None:
        for key in list(self._waiting):
            self._wake(key)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
