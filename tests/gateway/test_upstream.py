"""The gateway's upstream client against the real scripted model: back-pressure, keep-alive, errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.upstream import Upstream, UpstreamError
from local.model import ModelServer
from local.redis_server import free_port
from tests.gateway.conftest import UPSTREAM_KEY, messages_body

HEADERS = [(b"x-api-key", UPSTREAM_KEY.encode()), (b"content-type", b"application/json")]


def _body(text: str) -> bytes:
    return json.dumps(messages_body(f'[[scenario:text {{"text": "{text}"}}]]')).encode()


async def test_a_reader_that_stops_pauses_the_upstream_and_loses_nothing(model: ModelServer) -> None:
    upstream = Upstream(model.url, connect_timeout=5)
    text = "x" * 40_000  # 4 000 SSE deltas
    response = await upstream.request("/v1/messages?beta=true", HEADERS, _body(text), head_timeout=10)
    assert response.status == 200

    async def paused() -> None:
        while not response._conn.paused:
            await asyncio.sleep(0.01)

    # Nobody reads: the socket stops being read instead of the body piling up in memory.
    await asyncio.wait_for(paused(), 10)
    queued = len(response._conn.body)
    await asyncio.sleep(0.2)
    assert len(response._conn.body) == queued
    raw = b"".join([chunk async for chunk in response.chunks(idle_timeout=10)])
    response.close()
    deltas = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]
    got = "".join(e["delta"]["text"] for e in deltas if e["type"] == "content_block_delta")
    assert got == text
    await upstream.aclose()


async def test_connections_are_reused(model: ModelServer) -> None:
    upstream = Upstream(model.url, connect_timeout=5)
    for _ in range(3):
        response = await upstream.request("/v1/messages", HEADERS, _body("hi"), head_timeout=10)
        _ = [c async for c in response.chunks(idle_timeout=10)]
        response.close()
    assert len(upstream._idle) == 1
    await upstream.aclose()


async def test_a_closed_port_is_an_upstream_error() -> None:
    upstream = Upstream(f"http://127.0.0.1:{free_port()}", connect_timeout=2)
    with pytest.raises(UpstreamError, match="cannot connect"):
        await upstream.request("/v1/messages", HEADERS, b"{}", head_timeout=2)
