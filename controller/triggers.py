"""Triggers: what wakes a single session's reconcile within milliseconds instead of at the resync.

* **The change feed** (``fs:changes``, appended by the API with every create, apply, delete and
  message): one blocking read on one connection, whatever the number of sessions.
* **The wake channel** (agents publish on ``fs:{<id>}:wake`` after a report): one pattern
  subscription on one connection.

Both only *wake* a key (the worker then reads it whole); they are never the source of truth, so a
missed trigger costs latency until the next resync, never correctness. On a Redis error each loop
reports it and reconnects after a pause, for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from api.logs import get_logger
from api.store_base import StoreUnavailable
from api.store_controller import ControllerStore

_log = get_logger("controller.triggers")

#: Blocking read of the change feed (below the store's 5 s socket timeout).
CHANGE_BLOCK_MS = 1000
#: Reconnect pause of the trigger loops after a Redis error.
RETRY_SECONDS = 1.0


async def follow_change_feed(
    store: ControllerStore,
    wake: Callable[[str], None],
    on_redis_error: Callable[[], None],
    *,
    block_ms: int = CHANGE_BLOCK_MS,
) -> None:
    """Wake every session the API changes, from the newest change on; runs until cancelled."""
    last: str | None = None
    while True:
        try:
            if last is None:
                last = await store.last_change_id()
            changes = await store.read_changes(last, block_ms=block_ms)
        except StoreUnavailable as err:
            on_redis_error()
            _log.warning("change_feed_failed", error=str(err))
            await asyncio.sleep(RETRY_SECONDS)
            continue
        for change in changes:
            last = change.entry_id
            if change.session_id:  # pool entries ({"pool": name}) name no session
                wake(change.session_id)


async def follow_wakes(store: ControllerStore, wake: Callable[[str], None]) -> None:
    """Wake every session whose agent published on its wake channel; runs until cancelled."""
    while True:
        try:
            async with contextlib.aclosing(store.wake_sessions()) as wakes:
                async for session_id in wakes:
                    wake(session_id)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # redis errors of any kind: resubscribe after a pause
            _log.warning("wake_subscription_failed", error=type(err).__name__)
            await asyncio.sleep(RETRY_SECONDS)
