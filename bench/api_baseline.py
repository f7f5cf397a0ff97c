"""The baseline of bench/api.py: the API's stack doing the least it could, one bare ``SET`` per request.

A raw ASGI app (no framework, no validation, no middleware) on the very uvicorn settings the API
runs with (:func:`api.server.uvicorn_config`) and a Redis client configured like the API's. It reads
the request body, does one ``SET`` and answers a small JSON object, whatever the method and path.
Whatever the API costs beyond this is the price of FastAPI, validation, Lua, logging and metrics.
With ``FLYSWARM_BENCH_BASELINE=fastapi`` it serves the same bare route from FastAPI instead, which
shows how much of that price is the framework alone.

Run: ``python -m bench.api_baseline`` (from the project root; run as a script, ``bench/api.py``
would shadow the ``api`` package) with ``REDIS_URL``, ``HOST`` and ``PORT`` in the environment.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.server import uvicorn_config
from api.settings import ApiSettings

_RESPONSE_HEADERS = [(b"content-type", b"application/json")]


class BaselineApp:
    def __init__(self, redis_url: str, timeout: float) -> None:
        self.redis: Any = aioredis.Redis.from_url(
            redis_url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=2.0
        )
        self._counter = itertools.count()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.redis.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        key = f"bench:baseline:{next(self._counter) % 10_000}"
        await self.redis.set(key, body or scope["path"])
        payload = b'{"ok":true,"key":"' + key.encode() + b'"}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_RESPONSE_HEADERS, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def fastapi_baseline(redis_url: str, timeout: float) -> Any:
    """The same bare route in FastAPI: what the framework alone costs over raw ASGI (for reference)."""
    redis: Any = aioredis.Redis.from_url(
        redis_url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=2.0
    )
    counter = itertools.count()
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def bare(request: Request) -> JSONResponse:
        body = await request.body()
        key = f"bench:fastapi:{next(counter) % 10_000}"
        await redis.set(key, body or request.url.path)
        return JSONResponse({"ok": True, "key": key})

    return app


def main() -> None:
    settings = ApiSettings()
    url, timeout = settings.redis_url.get_secret_value(), settings.redis_timeout_seconds
    if os.environ.get("FLYSWARM_BENCH_BASELINE") == "fastapi":
        app = fastapi_baseline(url, timeout)
    else:
        app = BaselineApp(url, timeout)
    uvicorn.Server(uvicorn_config(settings, app=app)).run()


if __name__ == "__main__":
    main()
