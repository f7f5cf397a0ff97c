"""The work queue: session ids waiting to be reconciled, as client-go's workqueue has it.

Guarantees, each one a reason the controller can stay simple:

* **Deduplicated.** A key is queued at most once. Ten change-feed entries for one session while it
  waits mean one reconcile, which reads the latest state anyway (level-triggered).
* **Never in two workers at once.** A key handed out by :meth:`WorkQueue.get` is *processing*
  until :meth:`WorkQueue.done`. Adding it meanwhile only marks it *dirty*; ``done`` queues it
  again, so the change is seen by a fresh pass after the running one, never by a parallel one.
* **Delayed adds.** :meth:`WorkQueue.add_after` puts a key in a heap and queues it when due; a
  key already waiting keeps the earlier of its two times (``RequeueAfter`` of a heartbeat
  deadline and a backoff retry never delay each other).
* **Triggers first.** A key added ``urgent`` (a trigger said the session changed: a POST, an agent's
  report) is handed out before the keys a resync queued, so the reaction to a change does not
  wait behind a whole fleet's pass (100 000 keys at a resync).
* **Per-key backoff.** :meth:`WorkQueue.add_rate_limited` delays a failing key exponentially
  (:mod:`controller.backoff`); :meth:`WorkQueue.forget` resets it after a success.

Concurrency is bounded by the number of workers calling :meth:`get`; the queue itself never
spawns tasks. Everything runs on one event loop; there is no lock because nothing here awaits
between reading and changing the sets.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable

from controller.backoff import Backoff

Clock = Callable[[], float]


class WorkQueue:
    """Deduplicating, delay-capable queue of string keys for a fixed pool of async workers."""

    def __init__(self, *, backoff: Backoff | None = None, clock: Clock = time.monotonic) -> None:
        self.backoff = backoff if backoff is not None else Backoff()
        self._clock = clock
        self._ready: deque[str] = deque()
        self._urgent: deque[str] = deque()
        self._queued: set[str] = set()  # keys in a lane (a key may sit in both; the first pop wins)
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        # (due, sequence, key); stale entries (key re-scheduled earlier, or already added) are
        # skipped when popped, so rescheduling is O(log n) without searching the heap.
        self._delayed: list[tuple[float, int, str]] = []
        self._delayed_due: dict[str, float] = {}
        self._sequence = itertools.count()
        self._wakeup = asyncio.Event()
        self._shutting_down = False

    # -- adding -----------------------------------------------------------------------------------

    def add(self, key: str, *, urgent: bool = False) -> None:
        """Queue ``key`` now (no-op when it is already queued; deferred while it is processing).

        ``urgent`` puts it ahead of the keys queued without it (a key already waiting moves up).
        """
        if self._shutting_down:
            return
        if key in self._dirty:
            if urgent and key in self._queued:
                self._urgent.append(key)
            return
        self._dirty.add(key)
        if key in self._processing:
            return
        self._queued.add(key)
        (self._urgent if urgent else self._ready).append(key)
        self._wakeup.set()

    def add_after(self, key: str, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds (at once when ``delay <= 0``)."""
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        due = self._clock() + delay
        current = self._delayed_due.get(key)
        if current is not None and current <= due:
            return
        self._delayed_due[key] = due
        heapq.heappush(self._delayed, (due, next(self._sequence), key))
        self._wakeup.set()

    def add_rate_limited(self, key: str) -> float:
        """Queue ``key`` after its next backoff delay (it failed); returns the delay."""
        delay = self.backoff.next_delay(key)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """``key`` succeeded: reset its backoff."""
        self.backoff.forget(key)

    def failures(self, key: str) -> int:
        return self.backoff.failures(key)

    # -- taking -----------------------------------------------------------------------------------

    async def get(self) -> str | None:
        """The next key to process, waiting for one; None once the queue is shut down."""
        while True:
            if self._shutting_down:
                return None
            self._promote_due()
            key = self._pop()
            if key is not None:
                self._dirty.discard(key)
                self._processing.add(key)
                return key
            # No await between the checks above and clear(): a wake-up cannot be lost.
            self._wakeup.clear()
            timeout = self._delayed[0][0] - self._clock() if self._delayed else None
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    def _pop(self) -> str | None:
        for lane in (self._urgent, self._ready):
            while lane:
                key = lane.popleft()
                if key in self._queued:  # else handed out already from the other lane
                    self._queued.discard(key)
                    return key
        return None

    def done(self, key: str) -> None:
        """Processing of ``key`` finished; if it was added meanwhile it is queued again now."""
        self._processing.discard(key)
        if key in self._dirty and not self._shutting_down:
            self._queued.add(key)
            self._ready.append(key)
            self._wakeup.set()

    def shut_down(self) -> None:
        """Stop handing out keys: every waiting and future :meth:`get` returns None."""
        self._shutting_down = True
        self._wakeup.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # -- introspection ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Keys ready to be handed out now (the queue depth metric)."""
        self._promote_due()
        return len(self._queued)

    @property
    def delayed(self) -> int:
        """Keys waiting for a delayed add."""
        return len(self._delayed_due)

    @property
    def processing(self) -> frozenset[str]:
        return frozenset(self._processing)

    def is_processing(self, key: str) -> bool:
        return key in self._processing

    def _promote_due(self) -> None:
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._delayed_due.get(key) != due:
                continue  # superseded by an earlier schedule of the same key
            del self._delayed_due[key]
            self.add(key)
