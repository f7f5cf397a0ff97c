"""Event streams: SSE replay and follow, keep-alives, the end of a stream, and the WebSocket.

Replays (``follow=false``) go through ASGITransport; followed streams and WebSockets need a real
server (ASGITransport buffers whole responses), so those run against uvicorn in a thread.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import ClientConnection, connect

from api import keys
from api.app import create_app
from api.models import Phase, SessionEvent, SessionSpec, SessionStatus
from tests.api.app_harness import api_settings, live_server
from tests.store import Store


@pytest.fixture
async def api(store: Store, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(api_settings(redis_url), store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        yield client


def parse_sse(text: str) -> list[dict[str, Any]]:
    frames = []
    for block in text.split("\n\n"):
        frame: dict[str, Any] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            if name in ("id", "event", "data"):
                frame[name] = json.loads(value) if name == "data" else value
        if "event" in frame:
            frames.append(frame)
    return frames


def _spec() -> SessionSpec:
    return SessionSpec(prompt="watch me", mode="chat")


async def add_events(store: Store, session_id: str, *types: str) -> list[str]:
    return [await store.append_event(session_id, SessionEvent(type=t, message=f"{t}!")) for t in types]


async def test_sse_replays_every_event_in_order_without_following(
    api: httpx.AsyncClient, store: Store
) -> None:
    await api.post("/sessions", json={"prompt": "p", "session_id": "ev"})
    ids = await add_events(store, "ev", "machine_created", "agent_started", "assistant_text")
    response = await api.get("/sessions/ev/events", params={"follow": "false"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(response.text)
    assert [f["id"] for f in frames] == ids
    assert [f["event"] for f in frames] == ["machine_created", "agent_started", "assistant_text"]
    assert frames[2]["data"]["message"] == "assistant_text!"


async def test_sse_resumes_after_last_event_id_or_after(api: httpx.AsyncClient, store: Store) -> None:
    await api.post("/sessions", json={"prompt": "p", "session_id": "resume"})
    ids = await add_events(store, "resume", "a", "b", "c", "d")
    by_header = await api.get(
        "/sessions/resume/events", params={"follow": "false"}, headers={"Last-Event-ID": ids[1]}
    )
    assert [f["id"] for f in parse_sse(by_header.text)] == ids[2:]
    by_query = await api.get("/sessions/resume/events", params={"follow": "false", "after": ids[2]})
    assert [f["id"] for f in parse_sse(by_query.text)] == ids[3:]
    # The header (what EventSource sends on reconnect) wins over the URL's after.
    both = await api.get(
        "/sessions/resume/events",
        params={"follow": "false", "after": ids[0]},
        headers={"Last-Event-ID": ids[2]},
    )
    assert [f["id"] for f in parse_sse(both.text)] == ids[3:]


async def test_sse_refuses_bad_resume_ids_and_unknown_sessions(api: httpx.AsyncClient) -> None:
    await api.post("/sessions", json={"prompt": "p", "session_id": "known"})
    bad_header = await api.get("/sessions/known/events", headers={"Last-Event-ID": "yesterday"})
    assert bad_header.status_code == 400
    assert [f["field"] for f in bad_header.json()["error"]["fields"]] == ["Last-Event-ID"]
    bad_query = await api.get("/sessions/known/events", params={"after": "1-2-3"})
    assert bad_query.status_code == 400 and bad_query.json()["error"]["fields"][0]["field"] == "after"
    assert (await api.get("/sessions/unknown/events")).status_code == 404


@pytest.mark.timeout(30)
@pytest.mark.redis_modes("single", "cluster")  # the fan-out hub on a cluster too
async def test_sse_follows_new_events_with_keepalives_and_ends_when_the_session_finishes(
    store: Store, redis_url: str
) -> None:
    await store.apply(store.new_session("live", _spec()))
    first = (await add_events(store, "live", "machine_created"))[0]
    app = create_app(api_settings(redis_url, sse_keepalive_seconds=0.3))
    with live_server(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10.0)) as client:
            async with client.stream("GET", "/sessions/live/events") as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                seen: list[str] = []
                keepalives = 0
                added: list[str] = []
                async for line in lines:
                    seen.append(line)
                    if line == ": keep-alive":
                        keepalives += 1
                        if keepalives == 1:
                            added = await add_events(store, "live", "assistant_text")
                        elif keepalives == 2:
                            await store.write_status("live", SessionStatus(phase=Phase.SUCCEEDED))
                    if line == "event: end":
                        break
                end_data = json.loads((await anext(lines)).removeprefix("data: "))
    text = "\n".join(seen)
    assert f"id: {first}" in text and f"id: {added[0]}" in text
    assert text.index(f"id: {first}") < text.index(": keep-alive") < text.index(f"id: {added[0]}")
    assert keepalives >= 2 and end_data == {"reason": "finished"}


@pytest.mark.timeout(30)
async def test_sse_ends_when_the_session_is_removed(store: Store, redis_url: str) -> None:
    await store.apply(store.new_session("vanish", _spec()))
    app = create_app(api_settings(redis_url, sse_keepalive_seconds=0.2))
    with live_server(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10.0)) as client:
            async with client.stream("GET", "/sessions/vanish/events") as response:
                lines = response.aiter_lines()
                async for line in lines:
                    if line == ": keep-alive":
                        await store.remove("vanish")
                    if line == "event: end":
                        break
                assert json.loads((await anext(lines)).removeprefix("data: ")) == {"reason": "deleted"}


@pytest.mark.timeout(30)
async def test_sse_stream_closes_cleanly_when_the_client_goes_away(store: Store, redis_url: str) -> None:
    await store.apply(store.new_session("leaver", _spec()))
    app = create_app(api_settings(redis_url, sse_keepalive_seconds=0.2))
    with live_server(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10.0)) as client:
            async with client.stream("GET", "/sessions/leaver/events") as response:
                async for line in response.aiter_lines():
                    if line == ": keep-alive":
                        break
            # The server notices the disconnect and releases the stream.
            streams = ""
            for _ in range(100):
                metrics = (await client.get("/metrics")).text
                streams = next(x for x in metrics.splitlines() if x.startswith("flyswarm_api_event_streams "))
                if streams.endswith(" 0.0"):
                    break
                await asyncio.sleep(0.05)
            assert streams == "flyswarm_api_event_streams 0.0"


# -- WebSocket ------------------------------------------------------------------------------------


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), timeout=10)
    return dict(json.loads(frame))


@pytest.mark.timeout(30)
@pytest.mark.redis_modes("single", "cluster")  # the fan-out hub on a cluster too
async def test_websocket_streams_events_out_and_takes_messages_in(
    store: Store, redis_url: str, redis_client: aioredis.Redis
) -> None:
    await store.apply(store.new_session("wschat", _spec()))
    old = await add_events(store, "wschat", "machine_created", "agent_started")
    app = create_app(api_settings(redis_url, sse_keepalive_seconds=0.5))
    with live_server(app) as base:
        url = base.replace("http://", "ws://") + f"/sessions/wschat/ws?after={old[0]}"
        async with connect(url) as ws:
            replayed = await recv_json(ws)
            assert replayed["type"] == "event" and replayed["id"] == old[1]
            assert replayed["event"]["type"] == "agent_started"

            await ws.send(json.dumps({"text": "hello agent", "ref": 7}))
            ack = await recv_json(ws)
            assert ack["type"] == "ack" and ack["ref"] == 7

            await ws.send("this is not json")
            error = await recv_json(ws)
            assert error["type"] == "error" and error["error"]["code"] == "malformed_json"
            await ws.send(json.dumps({"txt": "typo"}))
            typo = await recv_json(ws)
            assert typo["error"]["code"] == "invalid"
            assert {f["field"] for f in typo["error"]["fields"]} == {"text", "txt"}

            # Still open after bad frames: events keep coming and messages keep landing.
            new = await add_events(store, "wschat", "assistant_text")
            live = await recv_json(ws)
            assert live["type"] == "event" and live["id"] == new[0]
            await ws.send(json.dumps({"text": "second"}))
            assert (await recv_json(ws))["type"] == "ack"
    inbox = await redis_client.xrange(keys.inbox("wschat"))
    assert [fields["text"] for _, fields in inbox] == ["hello agent", "second"]
    assert ack["id"] == inbox[0][0]


@pytest.mark.timeout(30)
async def test_websocket_refuses_messages_to_task_sessions_and_unknown_sessions(
    store: Store, redis_url: str, redis_client: aioredis.Redis
) -> None:
    await store.apply(store.new_session("wstask", SessionSpec(prompt="p")))
    app = create_app(api_settings(redis_url))
    with live_server(app) as base:
        ws_base = base.replace("http://", "ws://")
        async with connect(f"{ws_base}/sessions/wstask/ws") as ws:
            await ws.send(json.dumps({"text": "hi"}))
            refused = await recv_json(ws)
            assert refused["type"] == "error" and refused["error"]["code"] == "conflict"
        async with connect(f"{ws_base}/sessions/nobody/ws") as ws:
            missing = await recv_json(ws)
            assert missing["error"]["code"] == "not_found"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    assert await redis_client.exists(keys.inbox("wstask")) == 0


@pytest.mark.timeout(30)
async def test_websocket_without_a_token_is_refused_at_the_handshake(store: Store, redis_url: str) -> None:
    await store.apply(store.new_session("wsauth", _spec()))
    app = create_app(api_settings(redis_url, api_tokens="ws-token-123456"))
    with live_server(app) as base:
        url = base.replace("http://", "ws://") + "/sessions/wsauth/ws"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == 403
        async with connect(url, additional_headers={"Authorization": "Bearer ws-token-123456"}) as ws:
            await ws.send(json.dumps({"text": "let me in"}))
            assert (await recv_json(ws))["type"] == "ack"
