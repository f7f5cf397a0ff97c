"""Helpers for the API tests: settings that ignore the developer's env, and a live uvicorn server.

httpx's ASGITransport buffers a whole response before returning it, so followed event streams and
WebSockets are tested against a real uvicorn server on a free loopback port, run in a thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from api.settings import ApiSettings
from local.redis_server import free_port


def api_settings(redis_url: str, **overrides: Any) -> ApiSettings:
    """Settings from arguments only: no .env file, and no tokens unless given."""
    values: dict[str, Any] = {"redis_url": redis_url, "api_tokens": [], **overrides}
    return ApiSettings(_env_file=None, **values)


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread; yields the base URL; stops on exit."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the test API server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
