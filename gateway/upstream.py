"""The gateway's HTTP/1.1 client for the upstream Messages API: keep-alive, streamed bodies.

Why not httpx: bench/gateway.py showed most of the gateway's CPU in httpcore, whose pool scans
(and polls the socket of) every idle connection on each request and each response close, and
whose pure-Python h11 parses every chunk; a streamed reply is ~40 chunks. This client parses with
httptools (C; the parser uvicorn itself uses), keeps idle connections on a stack, and hands the
body over as it arrives:

* **streaming with back-pressure**: body chunks queue on the connection; past ``_HIGH_WATER``
  queued chunks the socket stops being read (``pause_reading``) until the gateway has relayed
  them, so a slow agent slows the upstream read and nothing accumulates;
* **bursts in one piece**: :meth:`UpstreamResponse.chunks` yields everything that arrived since
  the last call, joined (an event is never held back waiting for more);
* **timeouts**: connect, and idle (no response head, or no body bytes, for that long);
* **stale keep-alive**: a reused connection that the upstream had closed (no byte of the response
  came back) is retried once on a fresh connection, as browsers and httpx do.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import certifi
import httptools

_HIGH_WATER = 64
_MAX_IDLE = 512


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the connection or the protocol."""


class UpstreamTimeout(UpstreamError):
    """Connecting took too long, or the upstream stayed silent past the idle timeout."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the parse state of the response in flight on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._begin()

    def _begin(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.body: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.paused = False
        self.error: UpstreamError | None = None

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._begin()
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have the same methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(UpstreamError("the upstream sent a malformed response"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(UpstreamError("the upstream closed the connection"))

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        if len(self.body) >= _HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- helpers ------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
        self._wake()


class UpstreamResponse:
    """A response whose head has arrived; read :meth:`chunks`, then :meth:`close` (always)."""

    def __init__(self, upstream: Upstream, conn: _Connection) -> None:
        self.status = conn.status
        self.headers = conn.headers
        self._upstream = upstream
        self._conn = conn
        self._closed = False

    async def chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        """The body as it arrives, each item all that came since the previous one."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        while True:
            if conn.body:
                data = b"".join(conn.body) if len(conn.body) > 1 else conn.body[0]
                conn.body.clear()
                if conn.paused and conn.transport is not None:
                    conn.paused = False
                    conn.transport.resume_reading()
                yield data
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise conn.error
            conn.waiter = loop.create_future()
            try:
                async with asyncio.timeout(idle_timeout):
                    await conn.waiter
            except TimeoutError:
                raise UpstreamTimeout("the upstream stayed silent past the idle timeout") from None
            finally:
                conn.waiter = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._upstream._release(self._conn)


class Upstream:
    """Keep-alive connections to one origin (``http://host:port`` or ``https://host``)."""

    def __init__(self, base_url: str, *, connect_timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        default_port = (parts.scheme == "https" and self.port == 443) or (
            parts.scheme == "http" and self.port == 80
        )
        self.host_header = (self.host if default_port else f"{self.host}:{self.port}").encode()
        self.ssl = ssl.create_default_context(cafile=certifi.where()) if parts.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []

    async def request(
        self,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        head_timeout: float,
    ) -> UpstreamResponse:
        """POST ``body`` to ``target`` (path and query) and wait for the response head."""
        lines = [
            b"POST " + (self.prefix + target).encode("latin-1") + b" HTTP/1.1",
            b"host: " + self.host_header,
        ]
        lines += [name + b": " + value for name, value in headers]
        lines.append(b"content-length: " + str(len(body)).encode())
        payload = b"\r\n".join(lines) + b"\r\n\r\n" + body
        for attempt in range(2):
            conn, reused = await self._acquire()
            conn.send(payload)
            try:
                async with asyncio.timeout(head_timeout):
                    await conn.head
            except TimeoutError:
                conn.close()
                raise UpstreamTimeout("the upstream did not answer in time") from None
            except UpstreamError:
                conn.close()
                if reused and not conn.received and attempt == 0:
                    continue  # a keep-alive connection the upstream had already closed
                raise
            return UpstreamResponse(self, conn)
        raise UpstreamError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _transport, conn = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        return conn, False

    def _release(self, conn: _Connection) -> None:
        reusable = conn.complete and conn.keep_alive and not conn.closed and not conn.body
        if reusable and len(self._idle) < _MAX_IDLE:
            if conn.paused and conn.transport is not None:
                conn.paused = False
                conn.transport.resume_reading()
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()
