"""The controller's /healthz, /readyz and /metrics, in-process through ASGI."""

from __future__ import annotations

import httpx

from controller.health import Readiness, create_health_app
from controller.metrics import ControllerMetrics


async def test_readyz_follows_redis_and_fly_and_metrics_are_exposed() -> None:
    state = {"ready": Readiness(redis=True, fly=False, leader=False, holder="other-1")}
    metrics = ControllerMetrics()
    metrics.on_fly_response("create", "201", 0.02)
    metrics.actions.labels(action="create", outcome="done").inc()
    app = create_health_app(lambda: state["ready"], metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as http:
        assert (await http.get("/healthz")).status_code == 200
        not_ready = await http.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json() == {
            "ready": False,
            "redis": True,
            "fly": False,
            "role": "standby",
            "leader": "other-1",
            "shards": [],
            "shardCount": 1,
            "replicas": 1,
        }
        state["ready"] = Readiness(
            redis=True, fly=True, leader=True, holder="me", shards=(0, 5), shard_count=8, replicas=3
        )
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["role"] == "leader"
        assert ready.json()["shards"] == [0, 5] and ready.json()["replicas"] == 3
        text = (await http.get("/metrics")).text
    assert 'flyswarm_controller_fly_calls_total{action="create",status="201"} 1.0' in text
    assert 'flyswarm_controller_actions_total{action="create",outcome="done"} 1.0' in text
    assert 'flyswarm_controller_sessions{phase="Running"} 0.0' in text


def test_fleet_gauges_count_phases_and_states_and_reset_what_is_gone() -> None:
    metrics = ControllerMetrics()
    metrics.observe_fleet(["Running", "Running", "Sleeping"], ["started", "started", "stopped"])
    assert metrics.value("flyswarm_controller_sessions", {"phase": "Running"}) == 2
    assert metrics.value("flyswarm_controller_machines", {"state": "stopped"}) == 1
    metrics.observe_fleet(["Running"], ["started"])
    assert metrics.value("flyswarm_controller_sessions", {"phase": "Sleeping"}) == 0
    assert metrics.value("flyswarm_controller_machines", {"state": "stopped"}) == 0
