"""Async token buckets, keyed by (action, scope), so we stay under a remote API's rate limits.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second. Taking a token
is a *reservation*: the bucket may go negative, and the caller is told how long to wait before
its turn. That makes concurrent callers queue fairly (first come, first served) without a lock
or a polling loop, and lets tests check the schedule with an injected clock and no sleeping.

A reservation that would have to wait longer than the caller's ``max_wait`` is refused without
consuming anything, so a call with a deadline fails fast instead of sleeping past it.

Buckets are created on first use; idle ones (full again) are dropped when there are many, so
per-machine keys do not accumulate forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_DEFAULT_MAX_BUCKETS = 10_000


@dataclass(frozen=True)
class Limit:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a limit needs rate > 0 and burst >= 1")

    def scaled(self, factor: float) -> Limit:
        """A safety margin below the real limit: the rate multiplied by ``factor``, and one token
        less of burst (when there is more than one). Requests a loaded process sends at the right
        pace can still *arrive* bunched after scheduling or network delays; the spare token absorbs
        that, where a full burst would earn a 429."""
        return Limit(rate=self.rate * factor, burst=max(1, self.burst - 1))


class TokenBucket:
    """One token bucket. Not thread-safe; meant for one event loop."""

    def __init__(self, limit: Limit, now: float) -> None:
        self.limit = limit
        self._tokens = float(limit.burst)
        self._updated = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.limit.burst), self._tokens + elapsed * self.limit.rate)
        self._updated = max(self._updated, now)

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (negative while reservations are queued)."""
        self._refill(now)
        return self._tokens

    def reserve(self, now: float, max_wait: float | None = None) -> float | None:
        """Take one token; return the seconds to wait before using it, or None if over ``max_wait``."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        wait = (1.0 - self._tokens) / self.limit.rate
        if max_wait is not None and wait > max_wait:
            return None
        self._tokens -= 1.0
        return wait

    def drain(self, now: float) -> None:
        """Forget saved-up tokens (the server told us we went too fast)."""
        self._refill(now)
        self._tokens = min(self._tokens, 0.0)

    def idle(self, now: float) -> bool:
        """Full again: forgetting this bucket changes nothing."""
        return self.tokens(now) >= self.limit.burst


class KeyedRateLimiter:
    """Token buckets keyed by ``(action, scope)``; the limit is chosen per action."""

    def __init__(
        self,
        limits: dict[str, Limit],
        default: Limit,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_buckets: int = _DEFAULT_MAX_BUCKETS,
    ) -> None:
        self._limits = dict(limits)
        self._default = default
        self._clock = clock
        self._sleep = sleep
        self._max_buckets = max_buckets
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def limit_for(self, action: str) -> Limit:
        return self._limits.get(action, self._default)

    def bucket(self, action: str, scope: str) -> TokenBucket:
        key = (action, scope)
        bucket = self._buckets.get(key)
        if bucket is None:
            now = self._clock()
            if len(self._buckets) >= self._max_buckets:
                self._prune(now)
            bucket = TokenBucket(self.limit_for(action), now)
            self._buckets[key] = bucket
        return bucket

    def reserve(self, action: str, scope: str, max_wait: float | None = None) -> float | None:
        """Reserve a token; the wait in seconds, or None if it would exceed ``max_wait``."""
        bucket = self.bucket(action, scope)
        return bucket.reserve(self._clock(), max_wait)

    async def acquire(self, action: str, scope: str, max_wait: float | None = None) -> float | None:
        """Wait for a token; the seconds waited, or None (nothing consumed) if over ``max_wait``."""
        wait = self.reserve(action, scope, max_wait)
        if wait:
            await self._sleep(wait)
        return wait

    def penalize(self, action: str, scope: str) -> None:
        """The server rate-limited us on this key: empty its bucket so the next call waits."""
        self.bucket(action, scope).drain(self._clock())

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.idle(now)]:
            del self._buckets[key]
