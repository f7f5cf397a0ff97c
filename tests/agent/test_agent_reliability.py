"""The agent's results survive Redis: a run that ends while Redis is away is reported once it is back.

The real agent (real SDK and CLI, the gateway in front of the scripted model) runs against a Redis
of the test's own, behind the control plane's agent channel, that is killed with ``kill -9`` mid-run
and restarted from its AOF: the channel answers 503 meanwhile and the agent retries its report.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from api.store_errors import StoreUnavailable
from local.model import ModelServer
from tests.agent.conftest import AgentRig, gateway_for
from tests.restartable_redis import RestartableRedis
from tests.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
async def aof_rig(
    own_redis: RestartableRedis, model_server: ModelServer, tmp_path: Path
) -> AsyncIterator[AgentRig]:
    store = Store.from_url(own_redis.url)
    gateway = gateway_for(own_redis.url, model_server)
    rig = AgentRig(
        store=store, redis_server=own_redis.server, model=model_server, gateway=gateway, tmp_path=tmp_path
    )
    try:
        yield rig
    finally:
        rig.cleanup()
        gateway.stop()
        await store.close()


def _log_lines(rig: AgentRig) -> list[dict[str, object]]:
    lines = []
    for line in rig.agents[0].log().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


async def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_task_that_finishes_while_redis_is_down_reports_its_result_once_redis_is_back(
    aof_rig: AgentRig, own_redis: RestartableRedis, model_server: ModelServer
) -> None:
    rig = aof_rig
    started = time.time()
    marker = uuid.uuid4().hex[:8]
    directive = f'[[scenario:slow {{"seconds": 3, "text": "answer {marker}", "id": "{marker}"}}]]'
    await rig.create("outage", prompt=f"{directive} think slowly", mode="task")
    agent = await rig.start_session("outage")
    await rig.wait_for_event("outage", "run_started")

    def the_model_is_answering() -> bool:
        return any(
            r["time"] >= started and r.get("scenario") == "slow" and not r.get("side_query")
            for r in model_server.state.requests
        )

    # The gateway admits a model request by its token in Redis: kill Redis once it was admitted.
    await _until(the_model_is_answering, 30, "the model request")
    own_redis.kill()  # mid-run: the model answers while Redis is away

    def retried_past_the_old_limit() -> bool:
        # The old agent gave up after 5 attempts (~1.6 s) and exited 0 with its result lost.
        return any(
            e.get("event") == "store_write_failed" and e.get("what") == "report" and int(e["attempt"]) > 8
            for e in _log_lines(rig)
            if "attempt" in e
        )

    await _until(retried_past_the_old_limit, 60, "the final report to be retried")
    assert agent.popen.poll() is None, "the agent gave up on its result"

    own_redis.start()
    assert await agent.wait(60) == 0, agent.log()
    session = None
    for _ in range(100):  # the test's own connection to the killed server reconnects
        try:
            session = await rig.store.get("outage")
            break
        except StoreUnavailable:
            await asyncio.sleep(0.05)
    assert session is not None and session.agent is not None
    assert session.agent.state == "done"
    assert session.agent.resultText == f"answer {marker}"
    # Computed once: one main request carried the directive (side queries carry no tools).
    runs = [
        r
        for r in model_server.state.requests
        if r["time"] >= started and r.get("scenario") == "slow" and not r.get("side_query")
    ]
    assert len(runs) == 1, runs
