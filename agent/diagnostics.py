"""The CLI's diagnostics: the tail of its stderr plus the errors of its debug log.

The CLI prints little to stderr: an API error after retries, for instance, only shows up in its
debug log (``--debug-file``). Reports therefore carry both: the debug log's ``[ERROR]``/``[WARN]``
lines and the last stderr lines, redacted and capped, so a failed session explains itself.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from api.logs import redact_text

_DEBUG_LEVELS = ("[ERROR]", "[WARN]")
_READ_BYTES = 256 * 1024
_MAX_DEBUG_LOG_BYTES = 5 * 1024 * 1024


class CliDiagnostics:
    def __init__(self, *, lines: int, chars: int, debug_log: Path | None) -> None:
        self._stderr: deque[str] = deque(maxlen=lines)
        self._lines = lines
        self._chars = chars
        self.debug_log = debug_log

    def on_stderr(self, line: str) -> None:
        """The SDK's ``stderr`` callback (one line at a time)."""
        line = line.rstrip("\n")
        if line.strip():
            self._stderr.append(line)

    def reset_debug_log(self, *, only_if_large: bool = False) -> None:
        """Start the debug log afresh (at start-up, and between chat turns when it grew large)."""
        if self.debug_log is None:
            return
        try:
            if only_if_large and self.debug_log.stat().st_size < _MAX_DEBUG_LOG_BYTES:
                return
            self.debug_log.write_bytes(b"")
        except FileNotFoundError:
            pass
        except OSError:
            pass

    def _debug_errors(self) -> list[str]:
        if self.debug_log is None:
            return []
        try:
            with open(self.debug_log, "rb") as fh:
                fh.seek(0, 2)
                size = fh.tell()
                fh.seek(max(0, size - _READ_BYTES))
                raw = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        return [line for line in raw.splitlines() if any(level in line for level in _DEBUG_LEVELS)]

    def tail(self) -> str | None:
        """The last lines (debug-log errors first, then stderr), redacted; None when there are none."""
        lines = [*self._debug_errors(), *self._stderr][-self._lines :]
        if not lines:
            return None
        text = redact_text("\n".join(lines))
        return text[-self._chars :]
