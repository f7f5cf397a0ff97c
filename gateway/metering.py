"""Reading ``usage`` out of responses while their bytes pass through untouched.

Two meters, fed every chunk the gateway forwards (the chunk is forwarded as it came; a meter only
looks at it):

* :class:`StreamMeter` for ``text/event-stream`` responses. It splits lines incrementally (keeping
  only the unfinished tail) and decodes JSON only for the two events that carry usage:
  ``message_start`` (``message.usage``: input, cache write, cache read, first output count, and the
  model) and ``message_delta`` (``usage``: cumulative counts, output above all). Every other event
  (the many ``content_block_delta``) costs a prefix check per line, no JSON parse.
* :class:`JsonMeter` for a non-streaming response: the body is one JSON message; its copy is kept
  (up to a cap) only to read ``usage`` and ``model`` at the end.

Either ends with :meth:`usage` (the tokens seen so far, also for a cut stream) and :attr:`model`.
"""

from __future__ import annotations

import json
from typing import Any

from api.store_gateway import MeteredUsage

_JSON_CAP = 16 * 1024 * 1024
_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


class _Meter:
    def __init__(self) -> None:
        self.model: str | None = None
        self._counts: dict[str, int] = {}

    def _merge(self, usage: Any) -> None:
        # Counts in message_delta are cumulative: a later value replaces an earlier one.
        if isinstance(usage, dict):
            for name in _FIELDS:
                if name in usage and usage[name] is not None:
                    self._counts[name] = _int(usage[name])

    @property
    def seen(self) -> bool:
        return bool(self._counts)

    def usage(self) -> MeteredUsage:
        c = self._counts
        return MeteredUsage(
            input_tokens=c.get("input_tokens", 0),
            output_tokens=c.get("output_tokens", 0),
            cache_creation_input_tokens=c.get("cache_creation_input_tokens", 0),
            cache_read_input_tokens=c.get("cache_read_input_tokens", 0),
        )


class StreamMeter(_Meter):
    """Usage from an SSE stream of the Messages API, parsed incrementally."""

    def __init__(self) -> None:
        super().__init__()
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        lines = data.split(b"\n")
        self._tail = lines.pop()
        if len(self._tail) > _JSON_CAP:
            self._tail = b""  # a runaway line: not an event we meter
        for line in lines:
            if line.startswith(b"data:") and (b'"message_start"' in line or b'"message_delta"' in line):
                self._event(line[5:])

    def _event(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("type") == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            if isinstance(message.get("model"), str):
                self.model = message["model"]
            self._merge(message.get("usage"))
        elif event.get("type") == "message_delta":
            self._merge(event.get("usage"))


class JsonMeter(_Meter):
    """Usage from a non-streaming JSON message (read once the body is complete)."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= _JSON_CAP:
            self._parts.append(chunk)

    def finish(self) -> None:
        if self._size > _JSON_CAP:
            return
        try:
            message = json.loads(b"".join(self._parts))
        except ValueError:
            return
        self._parts = []
        if isinstance(message, dict):
            if isinstance(message.get("model"), str):
                self.model = message["model"]
            self._merge(message.get("usage"))
