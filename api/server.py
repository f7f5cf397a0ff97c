"""Run the API under uvicorn: ``flyswarm api`` (``main()``), or ``python -m api.server``.

One uvicorn process with uvloop and httptools when installed (``uvicorn[standard]``). uvicorn's own
access log is off (the app writes one structured ``http_request`` line per request) and its
logging config is left alone so every line goes through :func:`api.logs.configure_logging` (JSON,
redacted).

Safety: without ``API_TOKENS`` the API has no auth, so it refuses to bind anything but a loopback
address and exits non-zero with a message saying what to set. On SIGTERM uvicorn stops accepting,
gives open requests and streams ``FLYSWARM_SHUTDOWN_GRACE_SECONDS``, then exits.
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

from api.app import create_app
from api.logs import configure_logging, get_logger
from api.settings import ApiSettings, is_loopback_host


class UnsafeBind(RuntimeError):
    """Binding a non-loopback address without any API token."""


def check_bind(settings: ApiSettings) -> None:
    """Raise :class:`UnsafeBind` when the API would be open to the network."""
    if settings.auth_enabled or is_loopback_host(settings.host):
        return
    raise UnsafeBind(
        f"refusing to listen on {settings.host}:{settings.port} without API_TOKENS: anyone who can "
        "reach that address could create and delete sessions (and spend your Anthropic budget). "
        "Set API_TOKENS=<token>[,<token>...] (clients send `Authorization: Bearer <token>`), "
        "or bind a loopback address (HOST=127.0.0.1)."
    )


def uvicorn_config(settings: ApiSettings, app: Any = None) -> uvicorn.Config:
    """The server settings the API runs with (the benchmark's baseline uses the same ones)."""
    return uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        # uvicorn takes whole seconds, and None would mean waiting for ever.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
        lifespan="on",
    )


def serve(settings: ApiSettings) -> None:
    """Serve until SIGINT/SIGTERM. Exits with status 2 (and says why) on an unsafe bind."""
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        check_bind(settings)
    except UnsafeBind as exc:
        get_logger("api").error("unsafe_bind_refused", host=settings.host, port=settings.port)
        print(f"flyswarm api: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    uvicorn.Server(uvicorn_config(settings)).run()


def main() -> None:
    """Entry point of ``flyswarm api``: settings from the environment and ``.env``."""
    serve(ApiSettings())


if __name__ == "__main__":  # pragma: no cover
    main()
