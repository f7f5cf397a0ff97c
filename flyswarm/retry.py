"""When a failed call is tried again: 503s and lost connections, for idempotent calls only.

A call is idempotent when repeating it cannot do anything twice: every GET, PUT and DELETE, and a
``POST /sessions`` whose body names the session (the API answers 200 for the same id with the same
spec, 409 for another). A ``POST /sessions`` without an id, and a chat message, are never repeated:
the first try may have been applied before the connection broke.

The wait before try *n* is "full jitter" exponential backoff, ``uniform(0, min(max_backoff,
backoff * 2**n))`` (many clients retrying after one outage do not come back in step), and never less
than the server's ``Retry-After``, capped at ``max_retry_after``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from flyswarm.errors import FlyswarmError, ServerUnreachable, Unavailable


@dataclass(frozen=True)
class Retry:
    """The retry policy of a client. ``Retry(retries=0)`` never retries."""

    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 30.0
    #: Called before each wait with the try that failed (1-based) and its error (for logs, tests).
    on_retry: Callable[[int, FlyswarmError], None] | None = None

    def delay(self, attempt: int, error: FlyswarmError, *, idempotent: bool) -> float | None:
        """Seconds to wait before trying again after failed try ``attempt`` (0-based), or None: give up."""
        if not idempotent or attempt >= self.retries or not retryable(error):
            return None
        wait = random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))
        server_says = getattr(error, "retry_after", None)
        if server_says is not None:
            wait = max(wait, min(float(server_says), self.max_retry_after))
        if self.on_retry is not None:
            self.on_retry(attempt + 1, error)
        return wait

    def reconnect_delay(self, failures: int) -> float:
        """The wait before an event stream's reconnect number ``failures`` (1-based), jittered."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** min(failures - 1, 10))
        return random.uniform(ceiling / 2, ceiling)


def retryable(error: FlyswarmError) -> bool:
    """A 503 or a connection that could not be made or was lost (not a timeout, not a 4xx)."""
    return isinstance(error, Unavailable | ServerUnreachable)
