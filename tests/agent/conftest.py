"""The agent test rig: the real agent as a subprocess, the real SDK and CLI, the real gateway in front
of the scripted model (which refuses every key but the gateway's upstream key).

Every agent runs as a machine does: its environment holds the gateway's URL and a session token
minted as the controller mints one at launch (no Redis address, no Anthropic key), in a private
temp dir, with a tag in its environment. The CLI and the tools' shells inherit that environment
(the CLI puts its Bash tool in a session of its own, so a process group would miss them); at
teardown every process carrying the tag is killed, so no test leaves a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from api.models import Session, SessionSpec
from local.model import ModelServer, start_in_thread
from local.redis_server import RedisServer
from tests.gateway.conftest import UPSTREAM_KEY, GatewayServer, start_gateway
from tests.store import Store

ROOT = Path(__file__).resolve().parents[2]
TAG = "FLYSWARM_TEST_TAG"


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``tag`` (read from /proc)."""
    marker = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def kill_tagged(tag: str) -> None:
    for pid in tagged_processes(tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass
class AgentProcess:
    """A running ``python -m agent``."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent still running after {timeout}s; log:\n{self.log()}")
            await asyncio.sleep(0.05)
        return int(self.popen.returncode)

    def send(self, sig: signal.Signals) -> None:
        os.kill(self.popen.pid, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class AgentRig:
    """Creates sessions and starts agents against one Redis and one scripted model."""

    store: Store
    redis_server: RedisServer
    model: ModelServer
    gateway: GatewayServer
    tmp_path: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    agents: list[AgentProcess] = field(default_factory=list)

    async def create(self, session_id: str, **spec: Any) -> Session:
        outcome = await self.store.create_or_get(
            self.store.new_session(session_id, SessionSpec.model_validate(spec))
        )
        assert outcome.session is not None
        return outcome.session

    async def token(self, session_id: str) -> str:
        """A fresh session token, as the controller mints one for each launch."""
        return (await self.store.mint_session_token(session_id)).value

    def env(self, session_id: str, token: str, *, machine: str = "m-1", **extra: str) -> dict[str, str]:
        home = self.tmp_path / "agent-home"
        home.mkdir(exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            TAG: self.tag,
            "IS_SANDBOX": "1",  # the tests run as root; the CLI refuses bypassPermissions otherwise
            "CLAUDE_CODE_MAX_RETRIES": "1",
            "FLYSWARM_SESSION_ID": session_id,
            "FLYSWARM_CONTROL_URL": self.gateway.url,
            "FLYSWARM_SESSION_TOKEN": token,
            "FLYSWARM_MACHINE_ID": machine,
            "FLYSWARM_WORK_ROOT": str(self.tmp_path / machine),
            "FLYSWARM_HEARTBEAT_INTERVAL_SECONDS": "0.3",
            "FLYSWARM_HEARTBEAT_TTL_SECONDS": "2",
            "FLYSWARM_STOP_TIMEOUT_SECONDS": "5",
            "FLYSWARM_INBOX_BLOCK_MS": "200",
            "FLYSWARM_STARTUP_TIMEOUT_SECONDS": "2",
        }
        env.update(extra)
        return env

    def start(self, env: dict[str, str]) -> AgentProcess:
        log_path = self.tmp_path / f"agent-{len(self.agents)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "agent"],
                env=env,
                cwd=str(ROOT),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        agent = AgentProcess(popen, log_path, env)
        self.agents.append(agent)
        return agent

    async def start_session(self, session_id: str, *, machine: str = "m-1", **extra: str) -> AgentProcess:
        return self.start(self.env(session_id, await self.token(session_id), machine=machine, **extra))

    def work_dir(self, session_id: str, machine: str = "m-1") -> Path:
        return self.tmp_path / machine / session_id / "work"

    async def event_types(self, session_id: str) -> list[str]:
        return [e.event.type for e in await self.store.read_events(session_id, count=10_000)]

    async def wait_for_event(self, session_id: str, type_: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while type_ not in await self.event_types(session_id):
            if time.monotonic() > deadline:
                logs = "\n".join(a.log() for a in self.agents)
                raise AssertionError(f"no {type_!r} event after {timeout}s; agent logs:\n{logs}")
            await asyncio.sleep(0.05)

    def cleanup(self) -> None:
        for agent in self.agents:
            if agent.popen.poll() is None:
                agent.popen.kill()
            agent.popen.wait(5)
        kill_tagged(self.tag)


@pytest.fixture(scope="session")
def model_server() -> Iterator[ModelServer]:
    server = start_in_thread(api_key=UPSTREAM_KEY)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def store(redis_client: aioredis.Redis, redis_url: str) -> AsyncIterator[Store]:
    s = Store.from_url(redis_url)
    try:
        yield s
    finally:
        await s.close()


def gateway_for(redis_url: str, model: ModelServer, **settings: Any) -> GatewayServer:
    """The control plane's gateway over ``redis_url``, in front of the scripted model."""
    values: dict[str, Any] = {"upstream_url": model.url, "upstream_api_key": UPSTREAM_KEY, **settings}
    return start_gateway(redis_url=redis_url, **values)


@pytest.fixture(scope="session")
def gateway(redis_server: RedisServer, model_server: ModelServer) -> Iterator[GatewayServer]:
    server = gateway_for(redis_server.url, model_server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def rig(
    store: Store, redis_server: RedisServer, model_server: ModelServer, gateway: GatewayServer, tmp_path: Path
) -> AsyncIterator[AgentRig]:
    rig = AgentRig(
        store=store, redis_server=redis_server, model=model_server, gateway=gateway, tmp_path=tmp_path
    )
    try:
        yield rig
    finally:
        rig.cleanup()
        assert tagged_processes(rig.tag) == [], "a test left agent, CLI or tool processes behind"
