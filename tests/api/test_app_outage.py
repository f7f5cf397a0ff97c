"""Redis goes away and comes back: the API answers 503 meanwhile and recovers by itself.

A dedicated redis-server (with AOF, so data survives the restart) is stopped mid-test and started
again on the same port; the same app instance, never restarted, must serve again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from local.redis_server import RedisServer, free_port, start_redis
from tests.api.app_harness import api_settings


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """A private redis-server; a list so the test can replace it with its restarted self."""
    servers = [start_redis(tmp_path / "redis", port=free_port(), appendonly=True)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.mark.timeout(60)
async def test_api_answers_503_while_redis_is_down_and_recovers_when_it_returns(
    own_redis: list[RedisServer],
) -> None:
    first = own_redis[0]
    app = create_app(api_settings(first.url, redis_timeout_seconds=1.0))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            created = await client.post("/sessions", json={"prompt": "survive", "session_id": "durable"})
            assert created.status_code == 201

            first.stop()
            down = await client.get("/sessions/durable")
            assert down.status_code == 503 and down.headers["retry-after"] == "1"
            error = down.json()["error"]
            assert error["code"] == "unavailable" and "Redis" in error["message"]
            assert "Traceback" not in down.text
            posted = await client.post("/sessions", json={"prompt": "p"})
            assert posted.status_code == 503
            pool = {"kind": "Pool", "metadata": {"name": "warm"}, "spec": {"size": 1}}
            pool_down = await client.put("/pools/warm", json=pool)
            assert pool_down.status_code == 503 and pool_down.json()["error"]["code"] == "unavailable"
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "unavailable"
            assert (await client.get("/health")).status_code == 200

            own_redis.append(start_redis(first.data_dir, port=first.port, appendonly=True))
            back = await client.get("/sessions/durable")
            assert back.status_code == 200 and back.json()["spec"]["prompt"] == "survive"
            assert (await client.get("/readyz")).status_code == 200
            again = await client.post("/sessions", json={"prompt": "after", "session_id": "after-outage"})
            assert again.status_code == 201
            assert (await client.put("/pools/warm", json=pool)).status_code == 201
            metrics = (await client.get("/metrics")).text
            assert "flyswarm_api_store_unavailable_total 3.0" in metrics
    finally:
        await app.state.ctx.store.close()
