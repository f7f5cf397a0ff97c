"""Structured logging for every flyswarm process.

structlog renders JSON when stderr is not a TTY (production, CI, log files) and a console format
otherwise. Events are fixed snake_case names (``machine_created``); variables go in keys.

Secrets never reach a log line: a processor masks values of keys that name secrets (token, key,
password, secret, authorization) and scrubs known secret values (registered at start-up with
:func:`register_secret`) and URL passwords from every string value.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEY_RE = re.compile(r"(token|api_key|apikey|password|passwd|secret|authorization|credential)", re.I)
# redis://user:password@host -> redis://user:***@host
_URL_PASSWORD_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_REDACTED = "***"
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is masked wherever it appears in a log line."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact_text(text: str) -> str:
    """Mask URL passwords and registered secret values in a string."""
    text = _URL_PASSWORD_RE.sub(lambda m: f"{m['scheme']}{m['user']}:{_REDACTED}@", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _REDACTED)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        if _SECRET_KEY_RE.search(key) and value:
            return _REDACTED
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(key, v) for v in value]
    return value


def redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor that masks secrets in every key and value."""
    for key in list(event_dict.keys()):
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def configure_logging(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog (and the stdlib root logger) once per process."""
    stream = stream or sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # uvicorn and libraries log through the stdlib; keep them quiet and on the same stream.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stream, format="%(name)s %(message)s")


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A structlog logger with optional bound keys."""
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)
