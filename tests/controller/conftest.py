"""Fixtures shared by the controller tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.controller.fly_harness import FlyHarness
from tests.controller.world import World, make_world


@pytest.fixture
async def fly(tmp_path: Path) -> AsyncIterator[FlyHarness]:
    """The emulator in-process with a real Fly client on it; every machine process is killed after.

    A test module that needs other emulator settings (regions, ...) defines its own ``fly``.
    """
    harness = FlyHarness(tmp_path)
    try:
        yield harness
    finally:
        await harness.aclose()


@pytest.fixture
async def world(redis_url: str, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[World]:
    """Real Redis, the emulator over loopback HTTP, and controllers started on demand."""
    async with make_world(redis_url, redis_client, tmp_path) as w:
        yield w
