"""Per-key exponential backoff with jitter, reset on success (client-go's item exponential limiter).

A key that fails ``n`` times in a row waits about ``base * 2**(n-1)`` seconds (capped at ``cap``)
before its next try. The delay is drawn from ``[ceiling * (1 - jitter), ceiling]`` so that many
keys failing together (Fly answering 503 for a minute) do not come back in lock step.
:meth:`Backoff.forget` resets a key after a success, so one bad minute does not slow the key down
for the rest of its life.

The failure counts live in memory only: a restarted controller starts every key afresh, which is
the conservative direction (it retries sooner, never later than it would have).
"""

from __future__ import annotations

import random

DEFAULT_BASE_SECONDS = 0.05
DEFAULT_CAP_SECONDS = 60.0
DEFAULT_JITTER = 0.5
# 2**60 seconds is beyond any cap; stop doubling there so the exponent cannot overflow a float.
_MAX_EXPONENT = 60


def exponential_delay(
    attempt: int,
    *,
    base: float = DEFAULT_BASE_SECONDS,
    cap: float = DEFAULT_CAP_SECONDS,
    jitter: float = DEFAULT_JITTER,
    rng: random.Random | None = None,
) -> float:
    """The delay before retry number ``attempt`` (1-based): capped doubling, minus random jitter."""
    if attempt < 1:
        return 0.0
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    if jitter <= 0.0:
        return ceiling
    draw = (rng or random).uniform(1.0 - jitter, 1.0)
    return ceiling * draw


class Backoff:
    """Failure counts per key and the delays they earn."""

    def __init__(
        self,
        *,
        base: float = DEFAULT_BASE_SECONDS,
        cap: float = DEFAULT_CAP_SECONDS,
        jitter: float = DEFAULT_JITTER,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._failures: dict[str, int] = {}

    def next_delay(self, key: str) -> float:
        """Count one more failure of ``key`` and return how long it should wait."""
        attempt = self._failures.get(key, 0) + 1
        self._failures[key] = attempt
        return exponential_delay(attempt, base=self.base, cap=self.cap, jitter=self.jitter, rng=self._rng)

    def failures(self, key: str) -> int:
        """Failures of ``key`` since its last success."""
        return self._failures.get(key, 0)

    def forget(self, key: str) -> None:
        """``key`` succeeded: its next failure starts from ``base`` again."""
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._failures)
