"""The controller's own small HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics``.

* ``/healthz`` answers 200 while the process's event loop runs (liveness: restart me if not).
* ``/readyz`` answers 200 when Redis and Fly were reachable at the last look, whether this
  replica leads or stands by; 503 otherwise, with which one failed. It also says which shards
  this replica holds, of how many, among how many live replicas. "Not ready" never means the
  controller gives up: it keeps retrying and turns ready again by itself.
* ``/metrics`` is the Prometheus exposition of :class:`controller.metrics.ControllerMetrics`.

The bodies say only booleans and role names: no URLs, no tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controller.metrics import CONTENT_TYPE, ControllerMetrics


@dataclass(frozen=True)
class Readiness:
    """What ``/readyz`` reports."""

    redis: bool
    fly: bool
    leader: bool
    holder: str | None = None
    shards: tuple[int, ...] = ()  #: the shards this replica holds
    shard_count: int = 1
    replicas: int = 1

    @property
    def ready(self) -> bool:
        return self.redis and self.fly


def create_health_app(readiness: Callable[[], Readiness], metrics: ControllerMetrics) -> Starlette:
    """The ASGI app; ``readiness`` is asked on every ``/readyz`` (it must be cheap, no I/O)."""

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        state = readiness()
        body = {
            "ready": state.ready,
            "redis": state.redis,
            "fly": state.fly,
            "role": "leader" if state.leader else "standby",
            "leader": state.holder,
            "shards": list(state.shards),
            "shardCount": state.shard_count,
            "replicas": state.replicas,
        }
        return JSONResponse(body, status_code=200 if state.ready else 503)

    async def metrics_endpoint(_request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
        ]
    )
