"""Leader election: a Redis lease with a fencing token, as client-go's leaderelection has it.

Several controllers may run; only the holder of the lease acts. The lease is one key
(:data:`api.keys.LEADER`) set with ``NX PX``; taking it also ``INCR``s the fence counter
(:data:`api.keys.LEADER_FENCE`) in the same Lua script (the controller's store runs it:
:meth:`api.store_lease.LeaderLease.acquire_lease`), so every term of leadership has a
token larger than every earlier one. Status writes carry the token
(``ControllerStore.write_status(fence=...)``) and Redis refuses them once a newer leader exists.

Timing (all measured on the holder's own monotonic clock):

* ``retry_period``: how often the holder renews, and how often a standby tries to take the lease;
* ``renew_deadline``: the holder stops acting when it has not renewed successfully for this long,
  counted from the moment it *sent* its last successful renew; because that moment precedes the
  moment Redis restarted the key's TTL, and ``renew_deadline < lease_seconds``, the holder is
  always out before the key can expire and another controller can take it;
* ``lease_seconds``: the key's TTL; a crashed holder blocks others for at most this long.

:meth:`LeaderElector.is_leader` reads the clock on every call rather than trusting a flag, so
code that checks it right before acting is safe even if the renew loop is stuck.
:meth:`LeaderElector.remaining` bounds the deadline of any call made while leading.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from api import keys
from api.logs import get_logger
from api.store_base import StorePermissionDenied, StoreUnavailable
from api.store_controller import ControllerStore

Clock = Callable[[], float]
Callback = Callable[[], Awaitable[None]]

_log = get_logger("controller.leader")

_REDIS_ERRORS = (StoreUnavailable, StorePermissionDenied, OSError, TimeoutError)


@dataclass(frozen=True)
class LeaderTiming:
    """Lease timing; defaults are client-go's (15 s lease, 10 s renew deadline, 2 s retry)."""

    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_period_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period_seconds < self.renew_deadline_seconds < self.lease_seconds:
            raise ValueError("leader timing needs 0 < retry_period < renew_deadline < lease_seconds")


def default_holder_id() -> str:
    """``host-pid-random``: unique per process, readable in ``GET fs:{leader}``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class LeaderElector:
    """Takes, keeps and gives back the leader lease; tells the controller when it leads.

    ``on_started`` runs after the lease is taken (the controller starts its workers there);
    ``on_stopped`` runs after it is lost or released (the controller stops its workers). Both run
    inside :meth:`run`, one at a time, never concurrently with each other.
    """

    def __init__(
        self,
        store: ControllerStore,
        *,
        holder_id: str | None = None,
        timing: LeaderTiming | None = None,
        on_started: Callback | None = None,
        on_stopped: Callback | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self.holder_id = holder_id or default_holder_id()
        self.timing = timing or LeaderTiming()
        self._on_started = on_started
        self._on_stopped = on_stopped
        self._clock = clock
        self._rng = rng or random.Random()
        self._token: int | None = None
        self._value: str | None = None
        self._act_until = 0.0
        self._changed = asyncio.Event()
        self._stopping = False
        self.redis_ok = False
        self.current_holder: str | None = None

    # -- what the controller asks -----------------------------------------------------------------

    @property
    def token(self) -> int | None:
        """The fencing token of the current term, or None when not leading."""
        return self._token if self.is_leader() else None

    @property
    def fence(self) -> tuple[str, int] | None:
        """``(fence key, token)`` for fenced store writes, or None when not leading."""
        token = self.token
        return (keys.LEADER_FENCE, token) if token is not None else None

    def is_leader(self) -> bool:
        return self._token is not None and self._clock() < self._act_until

    def remaining(self) -> float:
        """Seconds this term may still act without another successful renew (0 when not leading)."""
        if self._token is None:
            return 0.0
        return max(0.0, self._act_until - self._clock())

    # The per-session authority of an unsharded controller: the one lease covers every session.
    def is_leader_for(self, session_id: str | None) -> bool:
        return self.is_leader()

    def remaining_for(self, session_id: str | None) -> float:
        return self.remaining()

    def fence_for(self, session_id: str | None) -> tuple[str, int] | None:
        return self.fence

    async def wait_changed(self, timeout: float | None = None) -> None:
        """Wait until leadership is gained or lost (or ``timeout``)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Campaign and renew until cancelled or :meth:`stop`; releases the lease on the way out."""
        try:
            while not self._stopping:
                if self._token is None:
                    await self._try_acquire()
                else:
                    await self._try_renew()
                await asyncio.sleep(self._pause())
        finally:
            await asyncio.shield(self._finish())

    def stop(self) -> None:
        """Ask :meth:`run` to release the lease and return."""
        self._stopping = True

    async def _finish(self) -> None:
        if self._token is not None:
            await self._release_lease()
            await self._lose("released")

    def _pause(self) -> float:
        period = self.timing.retry_period_seconds * self._rng.uniform(0.8, 1.0)
        if self._token is not None:
            # Wake in time to step down exactly at the deadline if the renews keep failing.
            period = min(period, max(0.01, self._act_until - self._clock()))
        return period

    async def _try_acquire(self) -> None:
        ttl_ms = int(self.timing.lease_seconds * 1000)
        sent = self._clock()
        try:
            reply = await asyncio.wait_for(
                self._store.acquire_lease(self.holder_id, ttl_ms),
                self.timing.retry_period_seconds,
            )
        except _REDIS_ERRORS as err:
            self.redis_ok = False
            _log.warning("leader_acquire_failed", holder=self.holder_id, error=type(err).__name__)
            return
        self.redis_ok = True
        token, current = reply
        if token <= 0:
            self.current_holder = current.rsplit("/", 1)[0] or None
            return
        self._token = token
        self._value = f"{self.holder_id}/{token}"
        self._act_until = sent + self.timing.renew_deadline_seconds
        self.current_holder = self.holder_id
        _log.info("leader_elected", holder=self.holder_id, token=token)
        self._changed.set()
        if self._on_started is not None:
            await self._on_started()

    async def _try_renew(self) -> None:
        value = self._value
        if value is None:  # not leading: nothing to renew
            return
        ttl_ms = int(self.timing.lease_seconds * 1000)
        sent = self._clock()
        budget = max(0.01, min(self.timing.retry_period_seconds, self._act_until - sent))
        try:
            renewed: bool | None = await asyncio.wait_for(self._store.renew_lease(value, ttl_ms), budget)
        except _REDIS_ERRORS as err:
            self.redis_ok = False
            _log.warning("leader_renew_failed", holder=self.holder_id, error=type(err).__name__)
            renewed = None
        else:
            self.redis_ok = True
        if renewed is True:
            self._act_until = sent + self.timing.renew_deadline_seconds
            return
        if renewed is False:
            await self._lose("lease_taken")
        elif self._clock() >= self._act_until:
            await self._lose("renew_deadline_passed")

    async def _release_lease(self) -> None:
        try:
            if self._value is not None:
                await asyncio.wait_for(self._store.release_lease(self._value), 2.0)
        except _REDIS_ERRORS as err:
            # The lease expires by itself within lease_seconds.
            _log.warning("leader_release_failed", holder=self.holder_id, error=type(err).__name__)

    async def _lose(self, reason: str) -> None:
        token = self._token
        self._token = None
        self._value = None
        self._act_until = 0.0
        self.current_holder = None
        if reason == "released":
            _log.info("leader_released", holder=self.holder_id, token=token)
        else:
            _log.warning("leader_lost", holder=self.holder_id, token=token, reason=reason)
        self._changed.set()
        if self._on_stopped is not None:
            await self._on_stopped()
