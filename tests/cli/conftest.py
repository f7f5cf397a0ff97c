"""A real API for the CLI tests: ``flyswarm api`` (uvicorn + ``create_app``) on a free loopback port,
over the real Redis of tests/conftest.py (flushed before each test).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner, Result

from cli.main import main
from local.redis_server import RedisServer, free_port
from tests.store import Store

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveApi:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def serve_api(tmp: Path, redis_url: str, port: int | None = None, **env: str) -> LiveApi:
    """``flyswarm api`` (the process verb) in a subprocess, as users run it."""
    port = port or free_port()
    log = tmp / f"api-{port}.log"
    inherited = {k: v for k, v in os.environ.items() if k != "API_TOKENS" and not k.startswith("FLYSWARM_")}
    environ = {
        **inherited,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "REDIS_URL": redis_url,
        "PYTHONPATH": str(ROOT),
        **env,
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "api"], stdout=out, stderr=subprocess.STDOUT, env=environ, cwd=tmp
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return LiveApi(url, process, log)
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the API did not start:\n{log.read_text()}")
        time.sleep(0.05)


def stop_api(api: LiveApi) -> None:
    api.process.terminate()
    try:
        api.process.wait(10)
    except subprocess.TimeoutExpired:
        api.process.kill()
        api.process.wait(10)


@pytest.fixture(scope="session")
def live_api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    # One per test process (every CLI module shares it; each test flushes Redis). A short
    # keep-alive makes followed streams notice a finished session quickly.
    api = serve_api(tmp_path_factory.mktemp("api"), redis_server.url, FLYSWARM_SSE_KEEPALIVE_SECONDS="0.5")
    try:
        yield api
    finally:
        stop_api(api)


@pytest.fixture(scope="module")
def secured_api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    api = serve_api(tmp_path_factory.mktemp("api"), redis_server.url, API_TOKENS="right-token")
    try:
        yield api
    finally:
        stop_api(api)


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def api_url(live_api: LiveApi, clean_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FLYSWARM_URL", live_api.url)
    monkeypatch.delenv("FLYSWARM_TOKEN", raising=False)
    return live_api.url


class Cli:
    """Runs ``flyswarm`` in-process with click's runner; stdout and stderr kept apart."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return self.runner.invoke(main, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def cli() -> Cli:
    return Cli()


def store_call(redis_url: str, call: Callable[[Store], Any]) -> Any:
    """Run one store call from synchronous test code (the CLI tests run no event loop)."""

    async def run() -> Any:
        store = Store.from_url(redis_url)
        try:
            return await call(store)
        finally:
            await store.close()

    return asyncio.run(run())
