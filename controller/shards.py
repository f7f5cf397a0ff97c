"""Sharded controllers: N replicas split the sessions, each shard under its own fenced lease.

A session belongs to shard ``crc32(session id) mod FLYSWARM_SHARDS`` (:func:`shard_of`: stable
across processes and Python versions, unlike ``hash()``). Each shard is a lease exactly like the
leader lease of :mod:`controller.leader` - a key with a TTL and a fence counter, taken in one
script (:class:`api.store_shards.ShardLeases`) - so every term of every shard has a token larger
than any earlier one, and a replica's status writes for a session carry the fence of that
session's shard (:meth:`ShardManager.fence_for`).

Balancing. Every ``retry_period`` a replica (one :class:`ShardManager` loop):

1. announces itself in the membership record (TTL ``lease_seconds``) and reads who else is alive;
2. renews the shards it holds (one script per shard, sent together);
3. computes its fair share: the live replicas sorted by id, replica ``i`` of ``n`` gets
   ``count // n`` shards, plus one if ``i < count % n`` - the shares add up to ``count`` exactly;
4. above its share, it *drains* the extra shards (highest numbers first): it stops starting
   actions on their sessions at once, waits for the actions already under way to finish, then
   releases the lease so another replica can take it at its next look - never two acting at once;
5. below its share, it tries the free shards, starting at an offset of its own so replicas do
   not all race for shard 0.

A dead replica stops renewing: its shards' keys expire after ``lease_seconds``, its membership
record with them, the survivors' shares grow and they take the shards. A replica that cannot
renew a shard stops acting on it when ``renew_deadline`` has passed since it *sent* the last
successful renew (before the key can expire: ``renew_deadline < lease_seconds``, the leader
lease's rule), and :meth:`ShardManager.is_leader_for` reads the clock on every call.

App-wide duties (orphan machines, the credential finalizer) are not sharded: the leader lease
(:class:`controller.leader.LeaderElector`) still elects one replica for them; ``session_id=None``
in the authority's methods means "app-wide".
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from api import keys
from api.logs import get_logger
from api.store_base import StorePermissionDenied, StoreUnavailable
from api.store_controller import ControllerStore
from controller.leader import LeaderTiming

Clock = Callable[[], float]
ShardsCallback = Callable[[frozenset[int]], Awaitable[None]]

_log = get_logger("controller.shards")

_REDIS_ERRORS = (StoreUnavailable, StorePermissionDenied, OSError, TimeoutError)


def shard_of(session_id: str, count: int) -> int:
    """The shard of ``session_id`` among ``count``: CRC-32 of its UTF-8 bytes, mod ``count``."""
    return zlib.crc32(session_id.encode()) % count


def fair_share(count: int, members: list[str], me: str) -> int:
    """How many of ``count`` shards replica ``me`` should hold among ``members`` (sorted ids)."""
    if me not in members:
        members = sorted([*members, me])
    index, n = members.index(me), len(members)
    return count // n + (1 if index < count % n else 0)


class AppWide(Protocol):
    """The leader lease, as far as the app-wide duties need it."""

    def is_leader(self) -> bool: ...

    def remaining(self) -> float: ...


@dataclass
class _Held:
    token: int
    value: str
    act_until: float
    draining: bool = False


class ShardManager:
    """Holds this replica's share of the shards and answers "may I act on this session?".

    It is the executor's :class:`~controller.executor.Authority`. Callbacks, run inside
    :meth:`run` one at a time: ``on_gained(shards)`` after new shards were taken (the controller
    resyncs at once), ``on_lost(shards)`` after shards were lost or released (the controller
    cancels work on their sessions), ``on_members(n)`` when the number of live replicas changes
    (the controller re-divides Fly's per-app budget). ``busy(shard)`` tells whether an action on
    one of the shard's sessions is under way (a draining shard is released only when it is not).
    """

    def __init__(
        self,
        store: ControllerStore,
        *,
        holder_id: str,
        count: int,
        timing: LeaderTiming | None = None,
        app_wide: AppWide | None = None,
        on_gained: ShardsCallback | None = None,
        on_lost: ShardsCallback | None = None,
        on_members: Callable[[int], None] | None = None,
        busy: Callable[[int], bool] | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("the shard count must be at least 1")
        self._store = store
        self.holder_id = holder_id
        self.count = count
        self.timing = timing or LeaderTiming()
        self._app_wide = app_wide
        self._on_gained = on_gained
        self._on_lost = on_lost
        self._on_members = on_members
        self._busy = busy or (lambda _shard: False)
        self._clock = clock
        self._rng = rng or random.Random()
        self._held: dict[int, _Held] = {}
        self._stopping = False
        #: False only to simulate a crash in tests: nothing is released on the way out.
        self.release_on_exit = True
        self.members: list[str] = [holder_id]
        self.redis_ok = False

    # -- the authority ----------------------------------------------------------------------------

    def shard(self, session_id: str) -> int:
        return shard_of(session_id, self.count)

    def _acting(self, session_id: str) -> _Held | None:
        held = self._held.get(shard_of(session_id, self.count))
        if held is None or held.draining or self._clock() >= held.act_until:
            return None
        return held

    def is_leader(self) -> bool:
        """True while this replica may act on anything (some shard, or the app-wide duties)."""
        return bool(self.held) or self._app_wide_leader()

    def is_leader_for(self, session_id: str | None) -> bool:
        """May this replica start an action on ``session_id`` (None: an app-wide duty) now?"""
        if session_id is None:
            return self._app_wide_leader()
        return self._acting(session_id) is not None

    def remaining_for(self, session_id: str | None) -> float:
        """Seconds an action on ``session_id`` may still run (0 once the shard is not ours)."""
        if session_id is None:
            return self._app_wide.remaining() if self._app_wide is not None else float("inf")
        held = self._held.get(shard_of(session_id, self.count))
        return max(0.0, held.act_until - self._clock()) if held is not None else 0.0

    def fence_for(self, session_id: str | None) -> tuple[str, int] | None:
        """``(fence key, token)`` of the session's shard for fenced status writes; None if not ours."""
        if session_id is None:
            return None
        shard = shard_of(session_id, self.count)
        held = self._held.get(shard)
        return (keys.shard_fence(shard), held.token) if held is not None else None

    def _app_wide_leader(self) -> bool:
        return self._app_wide.is_leader() if self._app_wide is not None else True

    @property
    def held(self) -> list[int]:
        """The shards this replica acts on now (draining ones excluded), sorted."""
        now = self._clock()
        return sorted(s for s, h in self._held.items() if not h.draining and now < h.act_until)

    @property
    def replicas(self) -> int:
        return max(1, len(self.members))

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Announce, renew, balance until cancelled or :meth:`stop`; releases every shard on the way out."""
        try:
            while not self._stopping:
                await self.tick()
                await asyncio.sleep(self._pause())
        finally:
            await asyncio.shield(self._finish())

    def stop(self) -> None:
        self._stopping = True

    async def tick(self) -> None:
        """One round of announce, renew, release and acquire."""
        ttl_ms = int(self.timing.lease_seconds * 1000)
        budget = self.timing.retry_period_seconds
        try:
            members = await asyncio.wait_for(self._store.announce_member(self.holder_id, ttl_ms), budget)
        except _REDIS_ERRORS as err:
            self.redis_ok = False
            _log.warning("shard_announce_failed", holder=self.holder_id, error=type(err).__name__)
            await self._expire_overdue()
            return
        self.redis_ok = True
        if members != self.members:
            before = len(self.members)
            self.members = members
            if len(members) != before and self._on_members is not None:
                self._on_members(len(members))
            _log.info("shard_members_changed", holder=self.holder_id, replicas=len(members))
        await self._renew()
        target = fair_share(self.count, self.members, self.holder_id)
        await self._drain_extra(target)
        await self._acquire(target)

    def _pause(self) -> float:
        period = self.timing.retry_period_seconds * self._rng.uniform(0.8, 1.0)
        if self._held:
            # Wake in time to step down exactly at the deadline if renews keep failing.
            soonest = min(h.act_until for h in self._held.values())
            period = min(period, max(0.01, soonest - self._clock()))
        return period

    async def _renew(self) -> None:
        if not self._held:
            return
        ttl_ms = int(self.timing.lease_seconds * 1000)
        values = {s: h.value for s, h in self._held.items()}
        sent = self._clock()
        soonest = min(h.act_until for h in self._held.values())
        budget = max(0.01, min(self.timing.retry_period_seconds, soonest - sent))
        try:
            renewed = await asyncio.wait_for(self._store.renew_shards(values, ttl_ms), budget)
        except _REDIS_ERRORS as err:
            self.redis_ok = False
            _log.warning("shard_renew_failed", holder=self.holder_id, error=type(err).__name__)
            await self._expire_overdue()
            return
        taken = set()
        for shard, ok in renewed.items():
            held = self._held.get(shard)
            if held is None:
                continue
            if ok:
                held.act_until = sent + self.timing.renew_deadline_seconds
            else:
                taken.add(shard)
        if taken:
            await self._lose(taken, "lease_taken")
        await self._expire_overdue()

    async def _expire_overdue(self) -> None:
        now = self._clock()
        overdue = {s for s, h in self._held.items() if now >= h.act_until}
        if overdue:
            await self._lose(overdue, "renew_deadline_passed")

    async def _drain_extra(self, target: int) -> None:
        acting = [s for s, h in self._held.items() if not h.draining]
        extra = len(acting) - target
        if extra > 0:
            for shard in sorted(acting, reverse=True)[:extra]:
                self._held[shard].draining = True
            _log.info("shards_draining", holder=self.holder_id, shards=sorted(acting, reverse=True)[:extra])
        done = {s for s, h in self._held.items() if h.draining and not self._busy(s)}
        if done:
            await self._release(done)
            await self._lose(done, "released")

    async def _acquire(self, target: int) -> None:
        want = target - len(self._held)
        if want <= 0:
            return
        ttl_ms = int(self.timing.lease_seconds * 1000)
        start = self.members.index(self.holder_id) * self.count // self.replicas if self.members else 0
        order = [(start + i) % self.count for i in range(self.count)]
        gained: set[int] = set()
        for shard in order:
            if want <= 0:
                break
            if shard in self._held:
                continue
            sent = self._clock()
            try:
                token, _current = await asyncio.wait_for(
                    self._store.acquire_shard(shard, self.holder_id, ttl_ms), self.timing.retry_period_seconds
                )
            except _REDIS_ERRORS as err:
                self.redis_ok = False
                _log.warning("shard_acquire_failed", holder=self.holder_id, error=type(err).__name__)
                break
            if token <= 0:
                continue
            self._held[shard] = _Held(
                token=token,
                value=f"{self.holder_id}/{token}",
                act_until=sent + self.timing.renew_deadline_seconds,
            )
            gained.add(shard)
            want -= 1
        if gained:
            _log.info("shards_acquired", holder=self.holder_id, shards=sorted(gained), held=len(self._held))
            if self._on_gained is not None:
                await self._on_gained(frozenset(gained))

    async def _release(self, shards: Iterable[int]) -> None:
        for shard in sorted(shards):
            held = self._held.get(shard)
            if held is None:
                continue
            try:
                await asyncio.wait_for(self._store.release_shard(shard, held.value), 2.0)
            except _REDIS_ERRORS as err:
                # The lease expires by itself within lease_seconds.
                _log.warning(
                    "shard_release_failed", holder=self.holder_id, shard=shard, error=type(err).__name__
                )

    async def _lose(self, shards: set[int], reason: str) -> None:
        for shard in shards:
            self._held.pop(shard, None)
        if reason == "released":
            _log.info("shards_released", holder=self.holder_id, shards=sorted(shards))
        else:
            _log.warning("shards_lost", holder=self.holder_id, shards=sorted(shards), reason=reason)
        if self._on_lost is not None:
            await self._on_lost(frozenset(shards))

    async def _finish(self) -> None:
        if not self.release_on_exit:
            return
        shards = set(self._held)
        for held in self._held.values():
            held.draining = True  # stop acting before the keys go
        if shards:
            await self._release(shards)
            await self._lose(shards, "released")
        try:
            await asyncio.wait_for(self._store.leave_members(self.holder_id), 2.0)
        except _REDIS_ERRORS:
            pass  # the record expires by itself
