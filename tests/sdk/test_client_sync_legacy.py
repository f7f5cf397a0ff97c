"""The API client on its own: typed errors with the API's field errors, and event streams that
survive a server restart without losing or repeating an event."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from api.client import Event, FlyswarmClient, Invalid, NotFound, ServerUnreachable

from api.models import AgentReport, SessionEvent
from local.redis_server import RedisServer, free_port
from tests.cli.conftest import serve_api, stop_api, store_call
from tests.store import Store


def _event(store: Store, message: str) -> Any:
    return store.append_event(
        "streamed", SessionEvent(type="assistant_text", source="agent", message=message)
    )


SESSION = {
    "apiVersion": "flyswarm.dev/v1",
    "kind": "Session",
    "metadata": {"name": "streamed"},
    "spec": {"prompt": "p"},
}


def test_invalid_body_surfaces_every_field_the_api_names(api_url: str) -> None:
    bad = {**SESSION, "spec": {"prompt": "p", "maxTurns": 0, "sleep": "hibernate"}}
    with FlyswarmClient(api_url) as client, pytest.raises(Invalid) as caught:
        client.apply(bad)

    assert caught.value.status == 422
    assert {f.field for f in caught.value.fields} == {"spec.maxTurns", "spec.sleep"}
    assert "spec.maxTurns: " in str(caught.value)


def test_missing_session_is_not_found(api_url: str) -> None:
    with FlyswarmClient(api_url) as client, pytest.raises(NotFound):
        client.get("absent")


def test_unreachable_server_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with FlyswarmClient(url) as client, pytest.raises(ServerUnreachable) as caught:
        client.list()

    assert (
        str(caught.value)
        == f"cannot reach the flyswarm API at {url}: connection refused — is `make up` running?"
    )


@pytest.mark.timeout(90)
def test_followed_events_survive_an_api_restart_without_loss_or_repeats(
    redis_server: RedisServer, clean_redis: Any, tmp_path: Path
) -> None:
    port = free_port()
    env = {"FLYSWARM_SSE_KEEPALIVE_SECONDS": "0.5", "FLYSWARM_SHUTDOWN_GRACE_SECONDS": "1"}
    api = serve_api(tmp_path, redis_server.url, port, **env)
    url = api.url
    seen: list[Event] = []
    reconnects: list[str] = []
    try:
        with FlyswarmClient(url) as client:
            client.apply(SESSION)

        async def first(store: Store) -> None:
            for i in range(3):
                await _event(store, f"e{i}")

        store_call(redis_server.url, first)

        def follow() -> None:
            with FlyswarmClient(url) as client:
                for event in client.events(
                    "streamed", reconnect_delay=0.1, on_reconnect=lambda n, why: reconnects.append(why)
                ):
                    seen.append(event)

        reader = threading.Thread(target=follow, daemon=True)
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

    messages = [e.data.get("message") for e in seen if e.type != "end"]
    assert messages == [f"e{i}" for i in range(7)]
    assert len({e.id for e in seen if e.type != "end"}) == 7
    assert seen[-1].type == "end" and seen[-1].data == {"reason": "finished"}
    assert reconnects, "the reader should have noticed the restart"


def test_listing_follows_the_cursor_to_the_last_page(api_url: str) -> None:
    with FlyswarmClient(api_url) as client:
        for i in range(12):
            client.apply({**SESSION, "metadata": {"name": f"page-{i:02d}"}})
        first, cursor = client.list_page(limit=5)
        everything = client.list(page_size=5)

    assert len(first) == 5 and cursor
    assert [s["metadata"]["name"] for s in everything] == [f"page-{i:02d}" for i in range(12)]
