"""The API's Prometheus metrics, on a registry of its own (one per app, so tests can build many apps).

* ``flyswarm_api_requests_total{method,route,status}``: every HTTP request, by route *template*
  (``/sessions/{id}``, never the raw path, so the label set stays bounded; ``unmatched`` for 404s).
* ``flyswarm_api_request_duration_seconds{method,route}``: latency histogram (streams excluded:
  an event stream lasts as long as its client, which says nothing about the API's speed).
* ``flyswarm_api_event_streams``: open SSE and WebSocket streams.
* Fan-out (:mod:`api.fanout`): ``flyswarm_api_followers{transport}`` (``sse``/``ws``),
  ``flyswarm_api_followed_streams`` (sessions with at least one follower; each is read by exactly
  one reader), ``flyswarm_api_stream_readers`` (multiplexing readers running, one blocking Redis
  connection each), ``flyswarm_api_events_fanned_out_total`` (event deliveries offered to
  followers), ``flyswarm_api_slow_follower_disconnects_total{transport}``.
* Redis pools, by ``pool`` (``commands``, ``blocking``): ``flyswarm_api_redis_pool_connections``
  (size), ``..._in_use``, ``..._waiting`` (callers waiting for a connection right now),
  ``flyswarm_api_redis_pool_wait_seconds_total`` and ``flyswarm_api_redis_pool_exhausted_total``
  (waits that ended in a 503).
* ``flyswarm_api_store_unavailable_total``: requests answered 503 because Redis was unreachable.
* ``flyswarm_api_sessions{phase}``: sessions by effective phase. Counting reads every session, so the
  value is cached for ``FLYSWARM_METRICS_SESSIONS_REFRESH_SECONDS`` and refreshed on scrape; when Redis
  is down the last value stays (and ``flyswarm_api_sessions_refreshed_timestamp_seconds`` shows its age).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as CountOf
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from api.models import Phase
from api.store import ApiStore
from api.store_base import StoreUnavailable
from api.store_pools import PoolStats

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ApiMetrics:
    """The collectors of one app and the cached session count."""

    def __init__(self, sessions_refresh_seconds: float = 30.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "flyswarm_api_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flyswarm_api_request_duration_seconds",
            "Time to answer a request (streams excluded).",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.streams = Gauge(
            "flyswarm_api_event_streams", "Open SSE and WebSocket event streams.", registry=self.registry
        )
        self.store_unavailable = Counter(
            "flyswarm_api_store_unavailable",
            "Requests answered 503 because Redis was unreachable.",
            registry=self.registry,
        )
        self.sessions = Gauge(
            "flyswarm_api_sessions",
            "Sessions by effective phase (cached, see FLYSWARM_METRICS_SESSIONS_REFRESH_SECONDS).",
            ["phase"],
            registry=self.registry,
        )
        self.sessions_refreshed = Gauge(
            "flyswarm_api_sessions_refreshed_timestamp_seconds",
            "Unix time of the last successful sessions-by-phase count.",
            registry=self.registry,
        )
        self.followers = Gauge(
            "flyswarm_api_followers",
            "Followers of session events by transport.",
            ["transport"],
            registry=self.registry,
        )
        self.followed_streams = Gauge(
            "flyswarm_api_followed_streams",
            "Session event streams with at least one follower.",
            registry=self.registry,
        )
        self.stream_readers = Gauge(
            "flyswarm_api_stream_readers",
            "Fan-out readers running (one blocking Redis connection each).",
            registry=self.registry,
        )
        self.fanned_out = Counter(
            "flyswarm_api_events_fanned_out",
            "Events offered to followers (one per event per follower).",
            registry=self.registry,
        )
        self.slow_disconnects = Counter(
            "flyswarm_api_slow_follower_disconnects",
            "Followers cut because they fell more than FLYSWARM_STREAM_FOLLOWER_BUFFER events behind.",
            ["transport"],
            registry=self.registry,
        )
        for transport in ("sse", "ws"):
            self.followers.labels(transport).set(0)
            self.slow_disconnects.labels(transport)
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._latency_children: dict[tuple[str, str], Histogram] = {}
        self._refresh_seconds = sessions_refresh_seconds
        self._refreshed_at: float | None = None
        self._lock = asyncio.Lock()
        for phase in Phase:
            self.sessions.labels(phase=phase.value).set(0)

    def watch_pools(self, source: Callable[[], list[PoolStats]]) -> None:
        """Report the store's connection pools (read at each scrape)."""
        self.registry.register(_PoolCollector(source))

    def observe(self, method: str, route: str, status: int, seconds: float | None) -> None:
        # labels() costs a lock and a dict build on every call; the label sets are few, so the
        # children are cached (this runs on every request).
        key = (method, route, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(method, route, str(status))
        counter.inc()
        if seconds is not None:
            histogram = self._latency_children.get((method, route))
            if histogram is None:
                histogram = self._latency_children[(method, route)] = self.latency.labels(method, route)
            histogram.observe(seconds)

    async def refresh_sessions(self, store: ApiStore) -> None:
        """Recount sessions by phase when the cached count is older than the refresh interval."""
        now = time.monotonic()
        if self._refreshed_at is not None and now - self._refreshed_at < self._refresh_seconds:
            return
        async with self._lock:
            if (
                self._refreshed_at is not None
                and time.monotonic() - self._refreshed_at < self._refresh_seconds
            ):
                return
            try:
                sessions = await store.all_sessions()
            except StoreUnavailable:
                return  # keep the last count; the timestamp gauge shows its age
            counts = CountOf(s.effective_phase() for s in sessions)
            for phase in Phase:
                self.sessions.labels(phase=phase.value).set(counts.get(phase, 0))
            self._refreshed_at = time.monotonic()
            self.sessions_refreshed.set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    def __init__(self, source: Callable[[], list[PoolStats]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.source()
        prefix = "flyswarm_api_redis_pool"
        gauges = [
            ("connections", "Size of the Redis connection pool.", [p.size for p in stats]),
            ("in_use", "Redis connections in use.", [p.in_use for p in stats]),
            ("waiting", "Callers waiting for a Redis connection.", [p.waiting for p in stats]),
        ]
        for name, doc, values in gauges:
            gauge = GaugeMetricFamily(f"{prefix}_{name}", doc, labels=["pool"])
            for p, value in zip(stats, values, strict=True):
                gauge.add_metric([p.name], value)
            yield gauge
        wait = CounterMetricFamily(
            f"{prefix}_wait_seconds", "Time spent waiting for a connection.", labels=["pool"]
        )
        exhausted = CounterMetricFamily(
            f"{prefix}_exhausted", "Waits for a connection that timed out (answered 503).", labels=["pool"]
        )
        for p in stats:
            wait.add_metric([p.name], p.wait_seconds_total)
            exhausted.add_metric([p.name], p.exhausted_total)
        yield wait
        yield exhausted
