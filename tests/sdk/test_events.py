"""``events()`` of both clients across a server restart: the uvicorn API process is stopped
mid-stream and a new one started on the same port; no event is lost or repeated, order is kept."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from api.models import AgentReport, SessionEvent
from flyswarm import AsyncClient, Client, Event, Retry
from local.redis_server import RedisServer, free_port
from tests.cli.conftest import serve_api, stop_api, store_call
from tests.sdk.conftest import Kind
from tests.store import Store

FAST = Retry(backoff=0.1, max_backoff=0.5)


def _event(store: Store, message: str) -> Any:
    return store.append_event(
        "streamed", SessionEvent(type="assistant_text", source="agent", message=message)
    )


def _follow(kind: Kind, url: str, seen: list[Event], reconnects: list[str]) -> None:
    def note(_n: int, why: str) -> None:
        reconnects.append(why)

    if kind == "sync":
        with Client(url, retry=FAST) as client:
            seen.extend(client.events("streamed", on_reconnect=note))
        return

    async def run() -> None:
        async with AsyncClient(url, retry=FAST) as client:
            async for event in client.events("streamed", on_reconnect=note):
                seen.append(event)

    asyncio.run(run())


@pytest.mark.timeout(90)
def test_followed_events_survive_an_api_restart_without_loss_or_repeats(
    kind: Kind, redis_server: RedisServer, clean_redis: Any, tmp_path: Path
) -> None:
    port = free_port()
    env = {"FLYSWARM_SSE_KEEPALIVE_SECONDS": "0.5", "FLYSWARM_SHUTDOWN_GRACE_SECONDS": "1"}
    api = serve_api(tmp_path, redis_server.url, port, **env)
    seen: list[Event] = []
    reconnects: list[str] = []
    try:
        with Client(api.url) as client:
            client.apply({"metadata": {"name": "streamed"}, "spec": {"prompt": "p"}})

        async def first(store: Store) -> None:
            for i in range(3):
                await _event(store, f"e{i}")

        store_call(redis_server.url, first)
        reader = threading.Thread(target=_follow, args=(kind, api.url, seen, reconnects), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(seen) == 3

        stop_api(api)

        async def while_down(store: Store) -> None:
            for i in range(3, 6):
                await _event(store, f"e{i}")

        store_call(redis_server.url, while_down)
        api = serve_api(tmp_path, redis_server.url, port, **env)

        async def after(store: Store) -> None:
            await _event(store, "e6")
            await store.write_agent_report("streamed", AgentReport(state="done", resultText="ok"))

        store_call(redis_server.url, after)
        reader.join(30)
        assert not reader.is_alive()
    finally:
        stop_api(api)

    messages = [e.data.get("message") for e in seen if not e.is_end]
    assert messages == [f"e{i}" for i in range(7)]
    assert len({e.id for e in seen if not e.is_end}) == 7
    assert seen[-1].is_end and seen[-1].data == {"reason": "finished"}
    assert reconnects, "the reader should have noticed the restart"
