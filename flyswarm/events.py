"""A session's event stream, as Server-Sent Events read by both clients.

The API sends ``id:``/``event:``/``data:`` frames (``data`` is a :class:`~flyswarm.models.SessionEvent`
as JSON; ``id`` its Redis stream id, ``<ms>-<seq>``), keep-alive comments, an ``event: end`` frame
without an id when the session is over, and an ``event: error`` frame without an id before it closes
a stream it cannot serve (Redis lost mid-stream, a follower too slow).

:class:`Resume` is the reconnect bookkeeping both clients share: it remembers the last id received,
sends it as ``Last-Event-ID`` on the next connection, and drops any event at or before it, so a
reader sees every event exactly once and in order across dropped connections and server restarts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flyswarm.errors import FlyswarmError, ServerUnreachable, Unavailable
from flyswarm.models import SessionEvent

# A followed stream carries a keep-alive comment at least every 15 s (FLYSWARM_SSE_KEEPALIVE_SECONDS);
# this long without a byte means the connection is dead even if TCP has not noticed.
STALL_TIMEOUT = 60.0
# Without follow, the server sends the history and closes; this only bounds a stuck read.
HISTORY_TIMEOUT = 30.0
END = "end"


@dataclass(frozen=True)
class Event:
    """One event of a session's stream: its id (None for the closing ``end``), type and decoded data."""

    id: str | None
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def is_end(self) -> bool:
        """The server's last frame: the session finished (``data["reason"]``: finished or deleted)."""
        return self.type == END and self.id is None

    def model(self) -> SessionEvent:
        """The event as the API's :class:`SessionEvent` (type, source, reason, message, data, time)."""
        return SessionEvent.model_validate(self.data)


class StreamInterrupted(FlyswarmError):
    """The server closed the stream in-band (``event: error``); the reader resumes from its last id."""


def _order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)


class SseParser:
    """Text lines in, events out (comments and keep-alives skipped; ``id`` only from the frame's own line)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._id: str | None = None
        self._type = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if line == "":
            event = _event(self._id, self._type, "\n".join(self._data)) if self._data else None
            self._reset()
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = value or None
        elif name == "event":
            self._type = value or "message"
        elif name == "data":
            self._data.append(value)
        return None

    def close(self) -> Event | None:
        return self.feed("")


def parse_lines(lines: Iterable[str]) -> Iterator[Event]:
    parser = SseParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
    last = parser.close()
    if last is not None:
        yield last


def _event(event_id: str | None, event_type: str, raw: str) -> Event:
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = {"message": raw}
    if not isinstance(decoded, dict):
        decoded = {"value": decoded}
    kind = str(decoded.get("type") or event_type)
    return Event(id=event_id, type=kind, data=decoded)


@dataclass
class Resume:
    """Reconnect bookkeeping for one :meth:`events` call (see the module docstring)."""

    last_id: str | None
    max_reconnects: int | None
    failures: int = 0

    def headers(self) -> dict[str, str]:
        headers = {"accept": "text/event-stream"}
        if self.last_id:
            headers["last-event-id"] = self.last_id
        return headers

    def accept(self, event: Event) -> bool:
        """Whether to hand ``event`` to the reader (False: already delivered). Raises on an in-band error."""
        if event.id is None and event.type == "error":
            detail = event.data.get("error")
            message = detail.get("message") if isinstance(detail, dict) else detail
            raise StreamInterrupted(str(message or "the server interrupted the stream"))
        self.failures = 0
        if event.id is None:
            return True
        if self.last_id is not None and _order(event.id) <= _order(self.last_id):
            return False
        self.last_id = event.id
        return True

    def failed(self, url: str, reason: str) -> None:
        """Count a lost connection; past ``max_reconnects`` consecutive ones, give up."""
        self.failures += 1
        if self.max_reconnects is not None and self.failures > self.max_reconnects:
            raise ServerUnreachable(url, f"event stream lost ({reason})")


def resumable(error: FlyswarmError) -> str | None:
    """Why a stream may be resumed after ``error`` (a reason to report), or None: raise it."""
    if isinstance(error, StreamInterrupted):
        return str(error)
    if isinstance(error, ServerUnreachable):
        return error.reason
    if isinstance(error, Unavailable) or getattr(error, "status", 0) >= 500:
        return f"{getattr(error, 'status', '')} {getattr(error, 'code', '')}".strip()
    return None
