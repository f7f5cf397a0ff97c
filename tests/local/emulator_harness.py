"""The emulator in-process for its own tests: an httpx client over the ASGI app, and small helpers."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from local.emulator import EmulatorSettings, EmulatorState, create_app, emulator_state

APP = "demo"
SLEEP = "import time\nprint('ready', flush=True)\nwhile True: time.sleep(0.05)"


@dataclass
class Emulator:
    client: httpx.AsyncClient
    state: EmulatorState

    async def create(self, config: dict[str, Any], app: str = APP, **body: Any) -> dict[str, Any]:
        r = await self.client.post(f"/v1/apps/{app}/machines", json={"config": config, **body})
        assert r.status_code == 200, r.text
        machine: dict[str, Any] = r.json()
        return machine

    async def wait(self, machine_id: str, state: str, app: str = APP, timeout: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"state": state, "timeout": timeout}
        if "stopped" in state:
            # Fly needs the version whose stop you wait for: the current one.
            params["version"] = (await self.get(machine_id, app))["version"]
        r = await self.client.get(f"/v1/apps/{app}/machines/{machine_id}/wait", params=params)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def get(self, machine_id: str, app: str = APP) -> dict[str, Any]:
        r = await self.client.get(f"/v1/apps/{app}/machines/{machine_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def post(self, machine_id: str, action: str, app: str = APP, **kwargs: Any) -> httpx.Response:
        return await self.client.post(f"/v1/apps/{app}/machines/{machine_id}/{action}", **kwargs)

    async def events(self, machine_id: str, app: str = APP, **params: Any) -> list[dict[str, Any]]:
        r = await self.client.get(f"/v1/apps/{app}/machines/{machine_id}/events", params=params)
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()
        return events

    async def log(self, machine_id: str) -> str:
        return (await self.client.get(f"/_admin/machines/{machine_id}/logs")).text

    async def pid(self, machine_id: str) -> int | None:
        pid: int | None = (await self.client.get(f"/_admin/machines/{machine_id}")).json()["pid"]
        return pid


EmulatorFactory = Callable[..., Awaitable[Emulator]]


@pytest.fixture
async def make_emulator(tmp_path: Path) -> AsyncIterator[EmulatorFactory]:
    states: list[EmulatorState] = []
    clients: list[httpx.AsyncClient] = []

    async def make(**overrides: Any) -> Emulator:
        values: dict[str, Any] = {
            "transition_delay": 0.02,
            "work_root": tmp_path / f"machines{len(states)}",
            "stop_timeout": 5.0,
            # Restart-policy backoff scaled down like the transitions (its own test sets it).
            "restart_backoff": 0.01,
            "restart_backoff_max": 0.05,
        }
        values.update(overrides)
        app = create_app(EmulatorSettings(**values))
        state = emulator_state(app)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://emulator", timeout=70
        )
        states.append(state)
        clients.append(client)
        return Emulator(client, state)

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()
        for state in states:
            await state.aclose()


@pytest.fixture
async def emu(make_emulator: EmulatorFactory) -> Emulator:
    return await make_emulator()


def script_config(script: str, *, policy: str = "no", **extra: Any) -> dict[str, Any]:
    return {
        "image": "python:3.11-slim",
        "init": {"exec": [sys.executable, "-c", script]},
        "restart": {"policy": policy},
        **extra,
    }


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll until ``check`` passes; the timeout only makes a broken test fail fast."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
