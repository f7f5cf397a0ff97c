"""The API's Prometheus metrics, on a registry of its own (one per app, so tests can build many apps).

* ``flyswarm_api_requests_total{method,route,status}``: every HTTP request, by route *template*
  (``/sessions/{id}``, never the raw path, so the label set stays bounded; ``unmatched`` for 404s).
* ``flyswarm_api_request_duration_seconds{method,route}``: latency histogram (streams excluded:
  an event stream lasts as long as its client, which says nothing about the API's speed).
* ``flyswarm_api_event_streams``: open SSE and WebSocket streams.
* ``flyswarm_api_store_unavailable_total``: requests answered 503 because Redis was unreachable.
* ``flyswarm_api_sessions{phase}``: sessions by effective phase. Counting reads every session, so the
  value is cached for ``FLYSWARM_METRICS_SESSIONS_REFRESH_SECONDS`` and refreshed on scrape; when Redis
  is down the last value stays (and ``flyswarm_api_sessions_refreshed_timestamp_seconds`` shows its age).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as CountOf

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from api.models import Phase
from api.store import ApiStore
from api.store_base import StoreUnavailable

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
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._latency_children: dict[tuple[str, str], Histogram] = {}
        self._refresh_seconds = sessions_refresh_seconds
        self._refreshed_at: float | None = None
        self._lock = asyncio.Lock()
        for phase in Phase:
            self.sessions.labels(phase=phase.value).set(0)

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
