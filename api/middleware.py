"""The API's edge, as one pure ASGI middleware: request id, bearer auth, access log, metrics, last resort.

Pure ASGI (no ``BaseHTTPMiddleware``) because it runs on every request and must not buffer streams.

* **Request id**: a sane incoming ``X-Request-ID`` is kept, else one is made; it is echoed in the
  response header, bound into every log line of the request and put into error bodies.
* **Auth**: ``Authorization: Bearer <token>`` checked against every configured token with
  :func:`hmac.compare_digest` over SHA-256 digests (equal lengths, no early exit, so timing tells
  nothing about which token or how much of it matched). ``/health`` and ``/readyz`` are open, and
  ``/metrics`` when ``FLYSWARM_METRICS_PUBLIC`` is set. A WebSocket without a valid token is
  refused before the handshake completes (the client sees HTTP 403).
* **Access log**: one ``http_request`` line per request (method, route template, status,
  duration_ms, request_id, session_id when the route has one). Never headers, never the query.
* **Last resort**: an exception that escaped every handler is logged with its traceback (through the
  redacting log pipeline) and answered with a generic 500 carrying the request id; a client never
  sees a stack trace.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_payload
from api.logs import get_logger
from api.metrics import ApiMetrics

OPEN_PATHS = frozenset({"/health", "/readyz"})
# Routes whose duration is the client's business (streams), kept out of the latency histogram.
STREAM_ROUTES = frozenset({"/sessions/{id}/events", "/sessions/{id}/ws"})
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_JSON_HEADERS = [(b"content-type", b"application/json")]


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        tokens: Iterable[str],
        metrics: ApiMetrics,
        metrics_public: bool = False,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]
        self._open = OPEN_PATHS | ({"/metrics"} if metrics_public else set())
        self._log = get_logger("api.http")

    def _check_token(self, scope: Scope) -> tuple[bool, bool]:
        """(authorized, a token was presented)."""
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False, bool(header)
        digest = hashlib.sha256(token).digest()
        matched = False
        for expected in self._digests:
            # No early exit: every configured token is compared on every request.
            matched |= hmac.compare_digest(digest, expected)
        return matched, True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID_RE.match(candidate):
                    request_id = candidate
                break
        request_id = request_id or secrets.token_hex(8)
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["request_id"] = request_id
        method = scope.get("method", "GET") if kind == "http" else "WS"

        if self._digests and scope["path"] not in self._open:
            authorized, presented = self._check_token(scope)
            if not authorized:
                await self._refuse(scope, send, request_id, presented)
                self._finish(scope, method, 401 if kind == "http" else 403, started_at, request_id)
                return

        status = 500
        response_started = False
        rid_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", ()), rid_header]
            elif message["type"] == "websocket.accept":
                status = 101
            elif message["type"] == "websocket.close" and not response_started and status != 101:
                status = 403
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client left while sending its body: nobody to answer, nothing to fix (nginx's 499).
            status = 499
        except Exception:
            self._log.exception("request_failed", method=method, path=scope["path"])
            status = 500
            if kind == "http" and not response_started:
                body = _json_bytes(
                    error_payload(
                        "internal", "internal error; the server log has the details", (), request_id
                    )
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [*_JSON_HEADERS, rid_header, (b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
            self._finish(scope, method, status, started_at, request_id)

    async def _refuse(self, scope: Scope, send: Send, request_id: str, presented: bool) -> None:
        if scope["type"] == "websocket":
            # Closing before accept makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        challenge = 'Bearer realm="flyswarm"' + (', error="invalid_token"' if presented else "")
        message = "a valid bearer token is required (Authorization: Bearer <token>)"
        body = _json_bytes(error_payload("unauthorized", message, (), request_id))
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    *_JSON_HEADERS,
                    (b"www-authenticate", challenge.encode()),
                    (b"x-request-id", request_id.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _finish(self, scope: Scope, method: str, status: int, started_at: float, request_id: str) -> None:
        seconds = time.perf_counter() - started_at
        route_obj = scope.get("route")
        route = getattr(route_obj, "path", None)
        if route is None:
            # Routes FastAPI serves itself (/openapi.json, /docs) carry no template; their paths are
            # fixed. Anything else unmatched is one label, so the metric's cardinality stays bounded.
            route = scope["path"] if status < 300 else "unmatched"
        if status == 401:
            route = "unauthorized"
        streaming = route in STREAM_ROUTES
        self.metrics.observe(method, route, status, None if streaming else seconds)
        params = scope.get("path_params") or {}
        extra: dict[str, Any] = {}
        if "id" in params:
            extra["session_id"] = params["id"]
        self._log.info(
            "http_request",
            method=method,
            route=route,
            status=status,
            duration_ms=round(seconds * 1000, 2),
            request_id=request_id,
            **extra,
        )
