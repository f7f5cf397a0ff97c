"""Fidelity knobs of the Fly Machines emulator: rate limits, latency, errors, lag; and request stats.

Real Fly misbehaves in a few well-documented ways (shared/reference/fly-machines-api.md §5-§7):
per-action token-bucket rate limits answered with 429, ambiguous 408s on create, 5xx, regions
out of capacity, and a list endpoint backed by an eventually consistent store. Each is a knob
here, settable at start (``EmulatorSettings.faults``) and at run time (``PUT /_admin/faults``),
so tests can flip them mid-run. Random faults draw from one seeded RNG, so a run is reproducible.

``RequestStats`` counts every request by (method, operation, status) and keeps a bounded log of
recent requests with their rate-limit scope; client tests use it to prove they never exceeded
Fly's rates (zero 429s with the limiter on) without timing anything themselves.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from controller.ratelimit import Limit, TokenBucket

# Fly's published limits: every action 1 req/s with bursts of 3, per action and per machine or app;
# Get Machine 5 req/s with bursts of 10. Stated here, not taken from the client: the emulator plays Fly.
ACTION_LIMIT = Limit(rate=1.0, burst=3)
GET_LIMIT = Limit(rate=5.0, burst=10)
GET_OPERATION = "Machines_show"
RECENT_LIMIT = 10_000


class FaultSettings(BaseModel):
    """Switchable misbehaviour. All off by default: the emulator then answers like a healthy Fly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rate_limits: bool = False
    """Enforce Fly's token buckets (actions 1/s burst 3 per (action, machine|app); get 5/s burst 10)."""
    latency_ms: float = Field(default=0.0, ge=0.0)
    """Extra latency added before every /v1 request is handled."""
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Probability that a /v1 request fails with a 5xx (500/502/503) before it has any effect."""
    create_timeout_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Probability that a create answers 408 *after* the machine was created (ambiguous failure)."""
    capacity_regions: list[str] = Field(default_factory=list)
    """Regions out of capacity: create there answers 422 insufficient_capacity, start answers 409."""
    full_volumes: list[str] = Field(default_factory=list)
    """Volumes whose host is full: a machine create or update mounting one answers 412."""
    list_lag_seconds: float = Field(default=0.0, ge=0.0)
    """Eventual consistency of list: machines younger than this are missing, destroyed ones linger."""
    seed: int = 0
    """Seed of the RNG behind error_rate and create_timeout_rate (re-seeded when faults are set)."""


@dataclass
class RateLimiter:
    """Token buckets keyed by (operation, scope), where scope is the machine id or the app name."""

    buckets: dict[tuple[str, str], TokenBucket] = field(default_factory=dict)

    def allow(self, operation: str, scope: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get((operation, scope))
        if bucket is None:
            limit = GET_LIMIT if operation == GET_OPERATION else ACTION_LIMIT
            bucket = TokenBucket(limit, now)
            self.buckets[(operation, scope)] = bucket
        # A token now or never: Fly answers 429 rather than queueing the request.
        return bucket.reserve(now, max_wait=0.0) == 0.0

    def reset(self) -> None:
        self.buckets.clear()


@dataclass
class RequestStats:
    """Counts of requests by (method, operation, status), and a bounded log of recent requests."""

    counts: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_LIMIT))

    def record(
        self,
        method: str,
        operation: str,
        scope: str,
        status: int,
        *,
        started: float | None = None,
        caller: str = "",
    ) -> None:
        """One answered request; ``started`` (unix time it arrived) and ``caller`` (its User-Agent)
        let tests find two clients' mutations of one machine that overlapped in time."""
        self.counts[(method, operation, status)] += 1
        now = time.time()
        self.recent.append(
            {
                "t": now,
                "start": started if started is not None else now,
                "method": method,
                "op": operation,
                "scope": scope,
                "status": status,
                "caller": caller,
            }
        )

    def snapshot(self) -> dict[str, Any]:
        rows = [
            {"method": method, "op": op, "status": status, "count": count}
            for (method, op, status), count in sorted(self.counts.items())
        ]
        return {
            "total": sum(self.counts.values()),
            "rate_limited": sum(count for (_m, _o, status), count in self.counts.items() if status == 429),
            "server_errors": sum(count for (_m, _o, status), count in self.counts.items() if status >= 500),
            "requests": rows,
            "recent": list(self.recent),
        }

    def reset(self) -> None:
        self.counts.clear()
        self.recent.clear()


class FaultInjector:
    """The live fault configuration plus its seeded RNG and the rate limiter."""

    def __init__(self, settings: FaultSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.limiter = RateLimiter()

    def replace(self, settings: FaultSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.limiter.reset()

    def allow(self, operation: str, scope: str) -> bool:
        if not self.settings.rate_limits:
            return True
        return self.limiter.allow(operation, scope)

    def server_error(self) -> int | None:
        """A 5xx status to answer with, or None."""
        if self.settings.error_rate <= 0.0:
            return None
        if self.rng.random() < self.settings.error_rate:
            return self.rng.choice((500, 502, 503))
        return None

    def create_times_out(self) -> bool:
        rate = self.settings.create_timeout_rate
        return rate > 0.0 and self.rng.random() < rate

    def region_full(self, region: str) -> bool:
        return region in self.settings.capacity_regions

    def volume_host_full(self, volume_id: str) -> bool:
        return volume_id in self.settings.full_volumes
