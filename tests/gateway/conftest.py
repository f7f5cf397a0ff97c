"""A real gateway (uvicorn, loopback, its own thread and event loop) in front of the real scripted
model, which refuses every key but the gateway's upstream key, over the suite's real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn

from api.models import Session, SessionSpec, SessionUsage
from api.session_token import SessionToken
from gateway.app import create_app
from gateway.settings import GatewaySettings
from local.model import ModelServer, start_in_thread
from local.redis_server import free_port
from tests.store import Store

UPSTREAM_KEY = "sk-ant-upstream-only-the-gateway-holds"


@dataclass
class GatewayServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_gateway(**settings: Any) -> GatewayServer:
    port = free_port()
    config = uvicorn.Config(
        create_app(GatewaySettings(**{"host": "127.0.0.1", "port": port, **settings})),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        # The plain asyncio loop: uvloop reports the transports it closes at loop teardown as
        # unraisable ResourceWarnings, which this suite turns into errors.
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.01)
    return GatewayServer(f"http://127.0.0.1:{port}", server, thread)


def messages_body(prompt: str = "hi", *, stream: bool = True, model: str = "claude-test-1") -> dict[str, Any]:
    """A Messages API request as the CLI makes it (``tools`` present: not a side query)."""
    return {
        "model": model,
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        "tools": [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}],
    }


def agent_headers(token: str) -> dict[str, str]:
    return {
        "x-api-key": token,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219",
        "content-type": "application/json",
    }


@dataclass
class GatewayRig:
    store: Store
    model: ModelServer
    redis_url: str
    gateways: list[GatewayServer] = field(default_factory=list)

    def gateway(self, **settings: Any) -> GatewayServer:
        values: dict[str, Any] = {
            "redis_url": self.redis_url,
            "upstream_url": self.model.url,
            "upstream_api_key": UPSTREAM_KEY,
        }
        values.update(settings)
        server = start_gateway(**values)
        self.gateways.append(server)
        return server

    async def session(
        self, session_id: str, labels: dict[str, str] | None = None, **spec: Any
    ) -> tuple[Session, SessionToken]:
        """A stored session and a freshly minted token for it (as the controller mints at launch)."""
        spec.setdefault("prompt", "do it")
        outcome = await self.store.create_or_get(
            self.store.new_session(session_id, SessionSpec.model_validate(spec), labels=labels)
        )
        assert outcome.session is not None
        return outcome.session, await self.store.mint_session_token(session_id)

    async def usage(self, session_id: str) -> SessionUsage | None:
        session = await self.store.get(session_id)
        assert session is not None
        return session.usage


@pytest.fixture
def model() -> Iterator[ModelServer]:
    server = start_in_thread(api_key=UPSTREAM_KEY)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def rig(redis_client: aioredis.Redis, redis_url: str, model: ModelServer) -> AsyncIterator[GatewayRig]:
    store = Store.from_url(redis_url)
    rig = GatewayRig(store=store, model=model, redis_url=redis_url)
    try:
        yield rig
    finally:
        for server in rig.gateways:
            server.stop()
        await store.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as client:
        yield client


async def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll an async ``check`` until it returns something truthy (or fail at the deadline)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.05)
