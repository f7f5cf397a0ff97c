"""A real webhook receiver for tests: an HTTP server on loopback that checks Standard Webhooks
signatures with the standard library alone (the README's snippet) and records every delivery.

It can answer 500 for a while (``failing = True``) and be taken down and brought back on the same
port (:meth:`Receiver.down` / :meth:`Receiver.up`), for the outage tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import logging
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
import uvicorn

from api.logs import configure_logging
from local.redis_server import free_port


@contextlib.contextmanager
def rendered_logs() -> Iterator[io.StringIO]:
    """Every log line this process renders meanwhile (the production processors, JSON), in a buffer;
    the previous configuration is restored after. Loggers bound before it started are not covered."""
    previous, handlers, level = structlog.get_config(), logging.root.handlers[:], logging.root.level
    buffer = io.StringIO()
    configure_logging("debug", json=True, stream=buffer)
    try:
        yield buffer
    finally:
        structlog.configure(**previous)
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """The README's verification, verbatim in spirit: HMAC-SHA256 over ``id.timestamp.body``."""
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(stamp)) > tolerance:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{stamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, sig.partition(",")[2]) for sig in headers["webhook-signature"].split()
    )


@dataclass(frozen=True)
class Received:
    path: str
    msg_id: str
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class _Quiet(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class Receiver:
    """``secrets``: URL path -> the secret deliveries to that path must be signed with."""

    secrets: dict[str, str]
    port: int = field(default_factory=free_port)
    failing: bool = False
    received: list[Received] = field(default_factory=list)
    refused: int = 0  # answered 500 while failing
    bad_signatures: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _server: _Quiet | None = None
    _task: asyncio.Task[None] | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        if self.failing:
            self.refused += 1
            status = 500
        elif path not in self.secrets or not verify(self.secrets[path], headers, body):
            self.bad_signatures += 1
            status = 400
        else:
            self.received.append(Received(path, headers["webhook-id"], body))
            self.arrived.set()
            status = 204
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def up(self) -> None:
        config = uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = _Quiet(config)
        self._task = asyncio.create_task(self._server.serve())
        async with asyncio.timeout(10):
            while not self._server.started:
                await asyncio.sleep(0.01)

    async def down(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, 10)
        self._server, self._task = None, None

    def events(self, path: str) -> list[Received]:
        """Deliveries to ``path`` in arrival order, each ``webhook-id`` once (its first arrival)."""
        seen: set[str] = set()
        found = []
        for got in self.received:
            if got.path == path and got.msg_id not in seen:
                seen.add(got.msg_id)
                found.append(got)
        return found

    async def until(self, check: Any, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), 0.5)
