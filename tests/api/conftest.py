"""Fixtures shared by the API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from api.app import store_from_settings
from api.store import Store
from tests.api.app_harness import api_settings


@pytest.fixture
async def store(redis_client: aioredis.Redis, redis_url: str) -> AsyncIterator[Store]:
    """The API's own store (its timeouts and retries) on the test Redis, flushed per test."""
    s = store_from_settings(api_settings(redis_url))
    try:
        yield s
    finally:
        await s.close()
