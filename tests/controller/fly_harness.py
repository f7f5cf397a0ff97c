"""The Fly client wired in-process to the real emulator (no mocks), with a request recorder.

``FlyHarness`` owns one emulator app (``local.emulator.create_app``) and hands out
:class:`FlyClient` instances that talk to it through ``httpx.ASGITransport`` wrapped in a
:class:`RecordingTransport`, so tests can check what was really sent. Admin calls (fault knobs,
request stats) go to ``/_admin/...`` on the same app. ``aclose`` kills every machine process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from controller.fly import FlyClient, FlyClientConfig
from controller.fly_types import MachineConfig, MachineInit, MachineRestart, StopConfig
from local.emulator import EmulatorSettings, create_app, emulator_state
from local.emulator_faults import FaultSettings
from local.redis_server import free_port
from tests.controller.fly_contract import RecordingTransport

APP = "flyswarm-test"
TOKEN = "fly-test-token-6d1f0c"
BASE_URL = "http://fly.test"


def sleeper_config(
    metadata: Mapping[str, str] | None = None, *, seconds: int = 3600, **fields: Any
) -> MachineConfig:
    """A machine whose main process sleeps: it stays started until stopped."""
    return MachineConfig(
        image="python",
        init=MachineInit(exec=[sys.executable, "-c", f"import time; time.sleep({seconds})"]),
        metadata=dict(metadata or {}),
        restart=MachineRestart(policy="no"),
        stop_config=StopConfig(signal="SIGTERM", timeout="2s"),
        **fields,
    )


def exiting_config(code: int, metadata: Mapping[str, str] | None = None) -> MachineConfig:
    """A machine whose main process exits at once with ``code``."""
    return MachineConfig(
        image="python",
        init=MachineInit(exec=[sys.executable, "-c", f"raise SystemExit({code})"]),
        metadata=dict(metadata or {}),
        restart=MachineRestart(policy="no"),
    )


class FlyHarness:
    def __init__(self, work_root: Path, *, faults: FaultSettings | None = None, **settings: Any) -> None:
        self.settings = EmulatorSettings(
            work_root=work_root,
            transition_delay=settings.pop("transition_delay", 0.02),
            api_token=TOKEN,
            faults=faults or FaultSettings(),
            **settings,
        )
        self.app = create_app(self.settings)
        self.state = emulator_state(self.app)
        self.recorder = RecordingTransport(httpx.ASGITransport(app=self.app))
        self.admin = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url=BASE_URL,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        self._clients: list[FlyClient] = []

    def config(self, **overrides: Any) -> FlyClientConfig:
        base = FlyClientConfig(
            app_name=APP,
            api_token=TOKEN,
            base_url=BASE_URL,
            call_deadline=10.0,
            backoff_base=0.02,
            backoff_max=0.2,
        )
        return replace(base, **overrides)

    def client(self, **overrides: Any) -> FlyClient:
        client = FlyClient(self.config(**overrides), transport=self.recorder)
        self._clients.append(client)
        return client

    async def set_faults(self, **knobs: Any) -> None:
        response = await self.admin.patch("/_admin/faults", json=knobs)
        response.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        response = await self.admin.get("/_admin/stats")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def reset_stats(self) -> None:
        (await self.admin.delete("/_admin/stats")).raise_for_status()

    async def count(self, operation: str, status: int | None = None) -> int:
        """Requests the emulator saw for an operationId (optionally with one status)."""
        rows = (await self.stats())["requests"]
        return sum(
            r["count"] for r in rows if r["op"] == operation and (status is None or r["status"] == status)
        )

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
        await self.admin.aclose()
        await self.state.aclose()


@contextlib.asynccontextmanager
async def served_on_loopback(harness: FlyHarness) -> AsyncIterator[str]:
    """Serve the harness's emulator over real HTTP on 127.0.0.1 (for timeouts and disconnects,
    which ``ASGITransport`` does not have); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(harness.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def closed_loopback_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    return free_port()  # bound and released at once: nothing listens there
