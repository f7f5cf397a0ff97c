"""Fixtures shared by the controller tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.controller.fly_harness import FlyHarness


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
