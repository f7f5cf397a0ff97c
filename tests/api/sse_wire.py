"""A minimal SSE follower on a raw asyncio socket, for tests that open hundreds of streams.

httpx costs a client and a pool per stream; this is one socket, an HTTP/1.1 request and a chunked
body parser. ``receive_buffer`` shrinks the socket's kernel buffer (a client that stops reading
then stalls the server's writes quickly).
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class SseFollower:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    frames: list[dict[str, Any]] = field(default_factory=list)
    _buffer: bytes = b""
    eof: bool = False

    @property
    def ids(self) -> list[str]:
        return [f["id"] for f in self.frames if "id" in f]

    async def _chunk(self) -> bytes:
        size_line = await self.reader.readline()
        if not size_line:
            self.eof = True
            return b""
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            self.eof = True
            return b""
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def read_frame(self) -> dict[str, Any] | None:
        """The next complete frame (event, error, end or comment); None at the end of the stream."""
        while b"\n\n" not in self._buffer:
            try:
                chunk = await self._chunk()
            except (asyncio.IncompleteReadError, ConnectionError):
                self.eof = True
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk
        block, _, self._buffer = self._buffer.partition(b"\n\n")
        frame: dict[str, Any] = {}
        for line in block.decode().splitlines():
            if line.startswith(":"):
                frame["comment"] = line[1:].strip()
                continue
            name, _, value = line.partition(": ")
            frame[name] = json.loads(value) if name == "data" else value
        if "id" in frame or "event" in frame or "comment" in frame:
            self.frames.append(frame)
        return frame

    async def read_until(self, predicate: Any, timeout: float = 20.0) -> dict[str, Any] | None:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.read_frame()
                if frame is None or predicate(frame):
                    return frame

    def close(self) -> None:
        self.writer.close()


async def open_sse(
    base: str, path: str, *, last_event_id: str | None = None, receive_buffer: int | None = None
) -> SseFollower:
    parts = urlsplit(base)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    return SseFollower(reader, writer, status)
