"""The gateway's Prometheus metrics, on a registry of its own (one per app, so tests can build many).

* ``flyswarm_gateway_requests_total{path,status}``: every proxied request by the status the agent
  got (the upstream's, relayed, or the gateway's own refusal);
* ``flyswarm_gateway_refused_total{reason}``: requests the gateway answered itself
  (``unauthenticated``, ``finished``, ``budget``, ``label_budget``, ``unavailable``, ...);
* ``flyswarm_gateway_tokens_total{model,kind,label}`` (kind: input, output, cache_write,
  cache_read) and ``flyswarm_gateway_cost_usd_total{model,label}``: metered usage, ``label`` being
  the value of the session label named by ``FLYSWARM_GATEWAY_METRICS_LABEL`` (empty when unset);
* ``flyswarm_gateway_upstream_seconds{path}``: time until the upstream's response headers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from api.store_gateway import MeteredUsage

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "flyswarm_gateway_requests",
            "Proxied requests by path and status.",
            ["path", "status"],
            registry=self.registry,
        )
        self.refused = Counter(
            "flyswarm_gateway_refused",
            "Requests refused by the gateway itself.",
            ["reason"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "flyswarm_gateway_tokens",
            "Metered tokens by model, kind and session label.",
            ["model", "kind", "label"],
            registry=self.registry,
        )
        self.cost = Counter(
            "flyswarm_gateway_cost_usd",
            "Metered cost (USD) by model and session label.",
            ["model", "label"],
            registry=self.registry,
        )
        self.upstream = Histogram(
            "flyswarm_gateway_upstream_seconds",
            "Time until the upstream's response headers.",
            ["path"],
            buckets=_BUCKETS,
            registry=self.registry,
        )

    def metered(self, model: str, label: str, usage: MeteredUsage) -> None:
        for kind, count in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_write", usage.cache_creation_input_tokens),
            ("cache_read", usage.cache_read_input_tokens),
        ):
            if count:
                self.tokens.labels(model, kind, label).inc(count)
        if usage.cost_usd:
            self.cost.labels(model, label).inc(usage.cost_usd)

    def render(self) -> bytes:
        return generate_latest(self.registry)
