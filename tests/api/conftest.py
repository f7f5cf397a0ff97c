"""Fixtures shared by the API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.api.app_harness import api_settings
from tests.store import Store


@pytest.fixture
async def store(redis_client: aioredis.Redis, redis_url: str) -> AsyncIterator[Store]:
    """A store of every role, with the API's timeouts and retries, on the test Redis (flushed per test)."""
    settings = api_settings(redis_url)
    s = Store.from_url(
        settings.redis_url.get_secret_value(), socket_timeout=settings.redis_timeout_seconds, retries=2
    )
    try:
        yield s
    finally:
        await s.close()
