"""The controller's Prometheus metrics, in a registry of its own.

One :class:`ControllerMetrics` per controller instance (not the global default registry), so two
controllers in one test process do not collide and ``/metrics`` shows exactly this controller.

Counters are the controller's "stats as data" (fly-autoscaler's ``ReconcilerStats``): tests and
benchmarks read them through :meth:`ControllerMetrics.value` instead of parsing log lines.
"""

from __future__ import annotations

from collections import Counter as TallyCounter
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api.models import Phase

CONTENT_TYPE = CONTENT_TYPE_LATEST
_PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ControllerMetrics:
    """Every metric the controller exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pass_duration = Histogram(
            "flyswarm_controller_pass_duration_seconds",
            "Duration of reconcile passes: kind=resync (whole fleet) or key (one session).",
            ["kind"],
            buckets=_PASS_BUCKETS,
            registry=r,
        )
        self.passes = Counter(
            "flyswarm_controller_passes_total",
            "Reconcile passes by kind and result (ok, unknown: inputs unreadable, error).",
            ["kind", "result"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "flyswarm_controller_queue_depth", "Session keys ready to be reconciled.", registry=r
        )
        self.queue_delayed = Gauge(
            "flyswarm_controller_queue_delayed", "Session keys waiting for a delayed requeue.", registry=r
        )
        self.in_flight = Gauge(
            "flyswarm_controller_in_flight", "Session keys being reconciled right now.", registry=r
        )
        self.actions = Counter(
            "flyswarm_controller_actions_total",
            "Actions applied, by action type and outcome (done, requeue, transient, permanent, skipped).",
            ["action", "outcome"],
            registry=r,
        )
        self.fly_calls = Counter(
            "flyswarm_controller_fly_calls_total",
            "Fly Machines API calls by action and HTTP status (or timeout / connection_error).",
            ["action", "status"],
            registry=r,
        )
        self.fly_call_duration = Histogram(
            "flyswarm_controller_fly_call_duration_seconds",
            "Duration of Fly Machines API calls by action.",
            ["action"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.redis_reads = Counter(
            "flyswarm_controller_redis_reads_total",
            "Batched Redis reads issued by the reconciler, by what was read.",
            ["what"],
            registry=r,
        )
        self.sessions = Gauge(
            "flyswarm_controller_sessions", "Sessions by phase at the last resync.", ["phase"], registry=r
        )
        self.machines = Gauge(
            "flyswarm_controller_machines",
            "Machines of ours by Fly state at the last resync.",
            ["state"],
            registry=r,
        )
        self.fly_app_machines = Gauge(
            "flyswarm_controller_fly_app_machines",
            "Machines of ours per agent app at the last resync (creates spread over the apps).",
            ["app"],
            registry=r,
        )
        self.leader = Gauge(
            "flyswarm_controller_leader", "1 while this controller holds the leader lease.", registry=r
        )
        self.shards_held = Gauge(
            "flyswarm_controller_shards_held", "Shards this replica holds and acts on.", registry=r
        )
        self.shard_held = Gauge(
            "flyswarm_controller_shard_held", "1 for each shard this replica holds.", ["shard"], registry=r
        )
        self.replicas = Gauge(
            "flyswarm_controller_replicas",
            "Live controller replicas this one counts (Fly's per-app budget is divided by it).",
            registry=r,
        )
        self.ready = Gauge(
            "flyswarm_controller_ready", "1 while Redis and Fly were reachable at the last look.", registry=r
        )
        self.expectations = Gauge(
            "flyswarm_controller_expectations", "Creates issued but not yet seen in Fly's list.", registry=r
        )
        # -- warm pools (controller/pool_*.py) --
        self.pool_claim_seconds = Histogram(
            "flyswarm_controller_pool_claim_seconds",
            "Time from a claim's pop of a ready pool machine to the machine's resume call returning.",
            ["pool"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.pool_claims = Counter(
            "flyswarm_controller_pool_claims_total",
            "Sessions served by a pool machine.",
            ["pool"],
            registry=r,
        )
        self.pool_claim_misses = Counter(
            "flyswarm_controller_pool_claim_misses_total",
            "Sessions that fit a pool with no ready machine (created fresh instead).",
            ["pool"],
            registry=r,
        )
        self.pool_claim_fallbacks = Counter(
            "flyswarm_controller_pool_claim_fallbacks_total",
            "Claims whose machine would not resume (destroyed; the session got a fresh machine).",
            ["pool"],
            registry=r,
        )
        self.pool_refill_creates = Counter(
            "flyswarm_controller_pool_refill_creates_total", "Pool machines created.", ["pool"], registry=r
        )
        self.pool_machines = Gauge(
            "flyswarm_controller_pool_machines",
            "Pool machines by state (ready, booting, claimed) at the last pool pass.",
            ["pool", "state"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "flyswarm_controller_webhook_deliveries_total",
            "Webhook delivery attempts by outcome (delivered, retry, failed: retry window over).",
            ["outcome"],
            registry=r,
        )
        self.webhook_queue_depth = Gauge(
            "flyswarm_controller_webhook_queue_depth",
            "Webhook deliveries queued (due, waiting for a retry, or in flight).",
            registry=r,
        )
        self.webhook_latency = Histogram(
            "flyswarm_controller_webhook_delivery_seconds",
            "Duration of one webhook delivery attempt (request to answer or error).",
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.webhook_fanned_out = Counter(
            "flyswarm_controller_webhook_events_total",
            "Session events fanned out to webhook deliveries, by event type.",
            ["event"],
            registry=r,
        )
        for phase in Phase:
            self.sessions.labels(phase=phase.value).set(0)
        self.replicas.set(1)

    def on_fly_response(self, action: str, status: str, seconds: float) -> None:
        """The Fly client's ``on_response`` hook (must not raise or block)."""
        self.fly_calls.labels(action=action, status=status).inc()
        self.fly_call_duration.labels(action=action).observe(seconds)

    def observe_fleet(self, phases: Iterable[str], machine_states: Iterable[str]) -> None:
        """Set the per-phase and per-state gauges from one resync's snapshot."""
        phase_counts = TallyCounter(phases)
        for phase in Phase:
            self.sessions.labels(phase=phase.value).set(phase_counts.get(phase.value, 0))
        state_counts = TallyCounter(machine_states)
        seen = {s.labels.get("state", "") for m in self.machines.collect() for s in m.samples}
        for state in seen | set(state_counts):
            self.machines.labels(state=state).set(state_counts.get(state, 0))

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Current value of a sample (0 when absent); for tests and benchmarks."""
        found = self.registry.get_sample_value(name, dict(labels or {}))
        return float(found) if found is not None else 0.0

    def total(self, name: str, **match: str) -> float:
        """Sum of a metric's samples whose labels include ``match`` (e.g. all Fly calls of one action)."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name != name:
                    continue
                if all(sample.labels.get(k) == v for k, v in match.items()):
                    total += sample.value
        return total

    def render(self) -> bytes:
        return generate_latest(self.registry)
