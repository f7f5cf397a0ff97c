"""Followers at scale: many streams over a few Redis connections, slow clients cut, Redis restarts.

The API runs in uvicorn in a thread (as in test_app_streams); followers are raw-socket SSE clients
(:mod:`tests.api.sse_wire`) so that hundreds of them stay cheap. Pools are configured small so that
"more followers than connections" is cheap to reach.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from api.app import create_app
from api.models import SessionEvent, SessionSpec
from api.store_base import StoreBusy
from local.redis_server import free_port, start_redis
from tests.api.app_harness import api_settings, live_server
from tests.api.sse_wire import SseFollower, open_sse
from tests.store import Store


def _spec() -> SessionSpec:
    return SessionSpec(prompt="follow me", mode="chat")


async def _append(store: Store, session_id: str, count: int, size: int = 0) -> list[str]:
    body = "x" * size
    return [
        await store.append_event(session_id, SessionEvent(type="assistant_text", message=f"{i}:{body}"))
        for i in range(count)
    ]


async def _metric(client: httpx.AsyncClient, line_start: str) -> float:
    text = (await client.get("/metrics")).text
    return float(next(x for x in text.splitlines() if x.startswith(line_start)).rsplit(" ", 1)[1])


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def _collect(follower: SseFollower, count: int) -> list[str]:
    await follower.read_until(lambda _f: len(follower.ids) >= count, timeout=30)
    return follower.ids


@pytest.mark.timeout(60)
async def test_300_followers_leave_writes_reads_and_probes_answering_and_all_get_every_event_in_order(
    store: Store, redis_url: str, redis_client: aioredis.Redis
) -> None:
    await store.apply(store.new_session("crowd", _spec()))
    before = await _append(store, "crowd", 3)
    # 8 command connections and 2 readers: 300 followers are far more than either pool.
    settings = api_settings(redis_url, redis_pool_size=8, stream_readers=2, sse_keepalive_seconds=1.0)
    app = create_app(settings)
    with live_server(app) as base:
        followers = await asyncio.gather(
            *(_follow_retrying(base, "/sessions/crowd/events") for _ in range(300))
        )
        assert {f.status for f in followers} == {200}
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            await _until(lambda: _followers_are(client, 300))
            live = await _append(store, "crowd", 20)
            # Writes, reads and probes answer while every follower is connected.
            posted = await client.post("/sessions/crowd/messages", json={"text": "still here?"})
            assert posted.status_code == 202
            assert (await client.get("/sessions/crowd")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            received = await asyncio.gather(*(_collect(f, 23) for f in followers))
            assert all(ids == before + live for ids in received)
            # Every follower was fed by the readers over at most 2 blocking connections.
            assert await _metric(client, 'flyswarm_api_redis_pool_in_use{pool="blocking"}') <= 2
            assert await _metric(client, "flyswarm_api_stream_readers") == 1
            assert await _metric(client, "flyswarm_api_events_fanned_out_total") >= 300 * 20
            clients = [c for c in await redis_client.client_list() if c.get("cmd") != "client|list"]
            assert len(clients) <= 8 + 2 + 2  # both pools, plus this test's store and client
        for f in followers:
            f.close()


async def _follow_retrying(base: str, path: str) -> SseFollower:
    """Open a follower; a 503 (300 connecting at once over 8 command connections may wait past the
    pool's wait) is retried after its Retry-After, as EventSource does."""
    while True:
        follower = await open_sse(base, path)
        if follower.status == 200:
            return follower
        assert follower.status == 503
        follower.close()
        await asyncio.sleep(0.2)


async def _followers_are(client: httpx.AsyncClient, count: int, transport: str = "sse") -> bool:
    return await _metric(client, f'flyswarm_api_followers{{transport="{transport}"}}') == count


@pytest.mark.timeout(60)
async def test_a_stalled_client_is_cut_while_other_followers_keep_receiving(
    store: Store, redis_url: str
) -> None:
    await store.apply(store.new_session("stall", _spec()))
    app = create_app(api_settings(redis_url, stream_follower_buffer=16, sse_keepalive_seconds=5.0))
    with live_server(app) as base:
        stalled = await open_sse(base, "/sessions/stall/events", receive_buffer=4096)
        reading = await open_sse(base, "/sessions/stall/events")
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            await _until(lambda: _followers_are(client, 2))
            # ~8 MB of events: more than the stalled client's socket buffers can absorb.
            collecting = asyncio.create_task(_collect(reading, 160))
            ids = await _append(store, "stall", 160, size=50_000)
            assert await collecting == ids
            await _until(lambda: _followers_are(client, 1))
            assert await _metric(client, 'flyswarm_api_slow_follower_disconnects_total{transport="sse"}') == 1
            # The cut client, reading at last, gets some events in order and then the end of the stream.
            async with asyncio.timeout(30):
                while await stalled.read_frame() is not None:
                    pass
            assert stalled.eof and stalled.ids == ids[: len(stalled.ids)] and len(stalled.ids) < len(ids)
            # The healthy follower is still attached and still receives.
            more = await _append(store, "stall", 2)
            assert await _collect(reading, 162) == ids + more
        stalled.close()
        reading.close()


@pytest.mark.timeout(60)
async def test_reconnecting_with_last_event_id_after_a_cut_gets_no_gap_and_no_duplicate(
    store: Store, redis_url: str
) -> None:
    await store.apply(store.new_session("again", _spec()))
    app = create_app(api_settings(redis_url, stream_follower_buffer=16, sse_keepalive_seconds=5.0))
    with live_server(app) as base:
        first = await open_sse(base, "/sessions/again/events", receive_buffer=4096)
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            await _until(lambda: _followers_are(client, 1))
            ids = await _append(store, "again", 120, size=50_000)
            await _until(lambda: _followers_are(client, 0))
        got: list[str] = []
        async with asyncio.timeout(30):
            while await first.read_frame() is not None:
                pass
        got += first.ids
        assert 0 < len(got) < len(ids)
        first.close()
        # EventSource's reconnect: resume after the last complete event, while more arrive.
        second = await open_sse(base, "/sessions/again/events", last_event_id=got[-1])
        later = await _append(store, "again", 5)
        got += await _collect(second, len(ids) + len(later) - len(got))
        second.close()
    assert got == ids + later


@pytest.mark.timeout(60)
async def test_a_slow_websocket_follower_is_closed_1013_with_where_to_resume(
    store: Store, redis_url: str
) -> None:
    await store.apply(store.new_session("wsslow", _spec()))
    app = create_app(api_settings(redis_url, stream_follower_buffer=16, sse_keepalive_seconds=5.0))
    with live_server(app) as base:
        url = base.replace("http://", "ws://") + "/sessions/wsslow/ws"
        # A small receive buffer and a one-message queue: a client that stops reading stalls quickly.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        async with connect(url, sock=sock, max_queue=1, max_size=None, compression=None) as ws:
            async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
                await _until(lambda: _followers_are(client, 1, "ws"))
                ids = await _append(store, "wsslow", 160, size=50_000)
                await _until(lambda: _followers_are(client, 0, "ws"))
                assert (
                    await _metric(client, 'flyswarm_api_slow_follower_disconnects_total{transport="ws"}') == 1
                )
            received: list[str] = []
            close_code = None
            try:
                async with asyncio.timeout(30):
                    async for raw in ws:
                        frame = json.loads(raw)
                        if frame["type"] == "event":
                            received.append(frame["id"])
            except Exception as exc:  # the close surfaces as ConnectionClosed
                close_code = getattr(getattr(exc, "rcvd", None), "code", None)
            close_code = close_code or (ws.close_code if ws.close_code is not None else None)
    assert received == ids[: len(received)] and len(received) < len(ids)
    assert close_code in (1013, 1006)  # 1006 when the stalled socket could not take the close frame


async def _post_until_accepted(client: httpx.AsyncClient, path: str) -> list[int]:
    statuses: list[int] = []
    async with asyncio.timeout(30):
        while True:
            response = await client.post(path, json={"text": "are you back?"})
            statuses.append(response.status_code)
            if response.status_code == 202:
                return statuses
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            await asyncio.sleep(0.1)


@pytest.mark.timeout(60)
async def test_followers_survive_a_redis_restart_and_resume_without_gap(tmp_path: Path) -> None:
    port = free_port()
    server = start_redis(tmp_path / "redis", port=port, appendonly=True)
    settings = api_settings(server.url, redis_timeout_seconds=1.0, sse_keepalive_seconds=0.5)
    # A store of every role (the test appends events as an agent would), with the API's timeouts.
    store = Store.from_url(server.url, socket_timeout=settings.redis_timeout_seconds, retries=2)
    try:
        await store.apply(store.new_session("phoenix", _spec()))
        first = await _append(store, "phoenix", 3)
        app = create_app(settings)
        with live_server(app) as base:
            followers = await asyncio.gather(*(open_sse(base, "/sessions/phoenix/events") for _ in range(20)))
            ws = await connect(base.replace("http://", "ws://") + "/sessions/phoenix/ws")
            async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
                await asyncio.gather(*(_collect(f, 3) for f in followers))
                server.stop()
                down = await client.post("/sessions/phoenix/messages", json={"text": "anyone?"})
                assert down.status_code == 503 and down.headers["Retry-After"] == "1"
                server = start_redis(tmp_path / "redis", port=port, appendonly=True)
                # Writes come back by themselves: no 5xx beyond the outage.
                assert (await _post_until_accepted(client, "/sessions/phoenix/messages"))[-1] == 202
                second = await _append(store, "phoenix", 3)
                received = await asyncio.gather(*(_collect(f, 6) for f in followers))
                assert all(ids == first + second for ids in received)
                ws_ids: list[str] = []
                async with asyncio.timeout(20):
                    while len(ws_ids) < 6:
                        frame = json.loads(await ws.recv())
                        if frame["type"] == "event":
                            ws_ids.append(frame["id"])
                assert ws_ids == first + second
                assert await _followers_are(client, 20)
            await ws.close()
            for f in followers:
                f.close()
    finally:
        await store.close()
        server.stop()


async def test_blocking_reads_never_take_the_connections_of_ordinary_commands(redis_url: str) -> None:
    """An agent's inbox wait (or any blocking read) has its own pool: writes still go through."""
    store = Store.from_url(redis_url, pool_size=1, pool_timeout=0.2, blocking_pool_size=1)
    try:
        await store.apply(store.new_session("agent", _spec()))
        waiting = asyncio.create_task(store.inbox_next("agent", block_ms=3000))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        # The one command connection is free for heartbeats and reports while the inbox read blocks.
        await store.heartbeat("agent", "m1", 10, "idle")
        sent = await store.send_message("agent", "hello")
        got = await waiting
        assert got is not None and got.id == sent.id
        # A second blocking read waits for the single blocking connection, then gives up alone.
        first = asyncio.create_task(store.inbox_next("agent2", block_ms=1000))
        await asyncio.sleep(0.1)
        with pytest.raises(StoreBusy):
            await store.inbox_next("agent3", block_ms=1000)
        assert await store.get_heartbeat("agent") is not None
        await first
    finally:
        await store.close()
