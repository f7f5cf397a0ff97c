"""The model gateway: the Messages API for agents, with the real key and the budgets kept here.

A plain ASGI app (no framework: every proxied byte passes through two awaits, nothing more). For
``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` (the only endpoints the bundled CLI
calls; ``/agent/v1/...`` is the agent channel (:mod:`gateway.channel`), ``/git/<i>/...`` the
git proxy (:mod:`gateway.git`); anything else is an Anthropic-shaped 404) it:

1. **authenticates** the session token the agent sends as ``x-api-key`` (what the CLI sends with
   ``ANTHROPIC_API_KEY``) or ``Authorization: Bearer`` (``ANTHROPIC_AUTH_TOKEN``): the token names
   its session, the stored digest must match (constant time). Malformed, unknown or revoked: 401.
   Valid but the session is deleted or finished: 403.
2. **admits** it against the budgets: the session's metered cost has reached ``maxCostUsd``, or a
   label budget it matches is spent for this period: 402 ``billing_error`` (and a label budget is
   recorded on the session's ``usage.budgetExceeded`` so the controller finishes it).
3. **forwards** it with the real key, headers kept but for hop-by-hop ones and the agent's
   credentials, the query (``?beta=true``) kept, and ``accept-encoding: identity`` so the
   response can be metered as it passes. The response (status, headers, body: errors and
   ``retry-after`` included) goes back byte for byte as it arrives (:mod:`gateway.upstream`): each
   write carries what arrived since the previous one, and past a few dozen chunks not yet relayed
   the upstream socket stops being read, so a slow agent slows the upstream (back-pressure), never
   a buffer.
4. **meters** ``usage`` from the passing bytes (:mod:`gateway.metering`), prices it
   (:mod:`gateway.pricing`), adds it to the session's totals with a ``usage`` event on its stream
   (one Lua step) and to every matching label budget. The upstream is read to its end even if the
   agent hangs up, so what was spent is counted.

Timeouts: connecting (``..._CONNECT_TIMEOUT_SECONDS``), silence from the upstream before its
headers or between chunks (``..._IDLE_TIMEOUT_SECONDS``: 504 before headers, a cut stream after),
and the whole request (``..._REQUEST_TIMEOUT_SECONDS``). A Redis outage answers 503 (the CLI
retries 5xx); an unreachable upstream 502.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from api.logs import get_logger
from api.models import Session, SessionEvent, utcnow
from api.session_token import Refusal, check, parse
from api.store_base import StoreUnavailable
from api.store_gateway import GatewayStore, MeteredUsage
from gateway.budgets import Budget
from gateway.channel import AgentChannel
from gateway.errors import GatewayError
from gateway.git import GitProxy
from gateway.metering import JsonMeter, StreamMeter
from gateway.metrics import GatewayMetrics
from gateway.pricing import PriceTable
from gateway.settings import GatewaySettings
from gateway.upstream import Upstream, UpstreamError, UpstreamResponse, UpstreamTimeout

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = get_logger("gateway")

PROXIED = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
# Request headers never forwarded: hop-by-hop ones, the agent's credentials, what the client sets itself.
_DROP_REQUEST = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"content-length",
        b"x-api-key",
        b"authorization",
        b"accept-encoding",
        b"cookie",
        b"proxy-authorization",
        b"trailer",
    }
)
_DROP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"proxy-connection", b"upgrade"}
)


def _token_from(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
    for name, value in headers:
        if name == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return rest.strip()
    return None


class Gateway:
    """The ASGI app. ``store`` and the upstream client are made at startup (lifespan)."""

    def __init__(self, settings: GatewaySettings, store: GatewayStore | None = None) -> None:
        self.settings = settings
        self.prices = PriceTable(settings.prices)
        self.budgets = [Budget.from_spec(spec) for spec in settings.budgets]
        self.metrics = GatewayMetrics()
        self.store = store
        self._owns_store = store is None
        self.upstream: Upstream | None = None
        key = settings.upstream_api_key
        self._upstream_key = key.get_secret_value().encode() if key is not None else None
        self._metrics_tokens = [t.get_secret_value().encode() for t in settings.api_tokens]
        self.channel = AgentChannel(settings)  # the agents' way to their own state: /agent/v1/...
        self.git = GitProxy(settings)  # the agents' way to their declared repositories: /git/<i>/...

    # -- lifecycle --------------------------------------------------------------------------------

    async def startup(self) -> None:
        if self.store is None:
            self.store = GatewayStore.from_url(
                self.settings.redis_url.get_secret_value(),
                socket_timeout=self.settings.redis_timeout_seconds,
                retries=2,
            )
        self.upstream = Upstream(
            self.settings.upstream_url, connect_timeout=self.settings.connect_timeout_seconds
        )
        await self.channel.startup()
        await self.git.startup()

    async def shutdown(self) -> None:
        await self.channel.shutdown()
        await self.git.shutdown()
        if self.upstream is not None:
            await self.upstream.aclose()
        if self.store is not None and self._owns_store:
            await self.store.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in PROXIED:
            if method != "POST":
                await _error(send, GatewayError(405, "method", f"{method} {path} is not supported"))
                return
            await self._proxy(scope, receive, send)
        elif path.startswith("/agent/"):
            await self.channel(scope, receive, send)
        elif path.startswith("/git/"):
            assert self.store is not None
            await self.git(scope, receive, send, self.store)
        elif path in ("/healthz", "/health") and method in ("GET", "HEAD"):
            await _reply(send, 200, b'{"ok":true}', b"application/json")
        elif path == "/readyz" and method == "GET":
            await self._ready(send)
        elif path == "/metrics" and method == "GET":
            await self._metrics(scope, send)
        else:
            await _error(
                send, GatewayError(404, "not_found", f"{method} {path} is not served by this gateway")
            )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _ready(self, send: Send) -> None:
        assert self.store is not None
        try:
            await self.store.ping()
        except StoreUnavailable:
            await _reply(send, 503, b'{"ok":false,"redis":"unavailable"}', b"application/json")
            return
        await _reply(send, 200, b'{"ok":true}', b"application/json")

    async def _metrics(self, scope: Scope, send: Send) -> None:
        if self._metrics_tokens:
            given = (
                _token_from([(n, v) for n, v in scope["headers"] if n == b"authorization"]) or ""
            ).encode()
            if not any(hmac.compare_digest(given, t) for t in self._metrics_tokens):
                await _error(send, GatewayError(401, "metrics", "a bearer token from API_TOKENS is required"))
                return
        await _reply(send, 200, self.metrics.render(), b"text/plain; version=0.0.4")

    # -- the proxy --------------------------------------------------------------------------------

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        try:
            session = await self._admit(_token_from(scope["headers"]))
            body = await _read_body(receive, self.settings.max_body_bytes)
            status = await self._forward(scope, send, body, session, deadline)
        except GatewayError as exc:
            # Raised only before the response started: after that, the pipe ends the body itself.
            self.metrics.refused.labels(exc.reason).inc()
            log.info("gateway_refused", path=path, status=exc.status, reason=exc.reason)
            await _error(send, exc)
            status = exc.status
        self.metrics.requests.labels(path, str(status)).inc()

    async def _admit(self, token_value: str | None) -> Session:
        """The session the token belongs to, or a :class:`GatewayError`."""
        token = parse(token_value) if token_value else None
        if token is None:
            # Missing or malformed: refused without a store read.
            refusal = check(token_value, None, None)
            assert isinstance(refusal, Refusal)
            raise GatewayError(refusal.status, refusal.reason, f"x-api-key: {refusal.message}")
        now = utcnow()
        assert self.store is not None
        try:
            view = await self.store.view(token.session_id, [b.counter_key(now) for b in self.budgets])
        except StoreUnavailable:
            raise GatewayError(
                503, "unavailable", "the control plane's store is unavailable; retry"
            ) from None
        verdict = check(token.value, view.token_digest, view.session)
        if isinstance(verdict, Refusal):
            raise GatewayError(verdict.status, verdict.reason, f"x-api-key: {verdict.message}")
        session = view.session
        assert session is not None
        spent = session.usage.costUsd if session.usage else 0.0
        limit = session.spec.maxCostUsd
        if limit is not None and spent >= limit:
            raise GatewayError(
                402, "budget", f"session {session.id} spent {spent:.4f} USD of its maxCostUsd={limit}"
            )
        if session.usage is not None and session.usage.budgetExceeded:
            raise GatewayError(402, "label_budget", f"budget {session.usage.budgetExceeded} is spent")
        for budget in self.budgets:
            if not budget.applies_to(session.metadata.labels):
                continue
            used = view.budget_spend.get(budget.counter_key(now), 0.0)
            if used >= budget.max_cost_usd:
                try:
                    await self.store.mark_budget_exceeded(session.id, budget.name)
                except StoreUnavailable:
                    pass  # the refusal stands; the next request records it
                raise GatewayError(
                    402,
                    "label_budget",
                    f"budget {budget.name} ({budget.period}, max {budget.max_cost_usd} USD) is spent: "
                    f"{used:.4f} USD this {budget.period}",
                )
        return session

    def _upstream_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        out = [(n, v) for n, v in headers if n not in _DROP_REQUEST]
        out.append((b"accept-encoding", b"identity"))
        if self._upstream_key is not None:
            out.append((b"x-api-key", self._upstream_key))
        return out

    async def _forward(self, scope: Scope, send: Send, body: bytes, session: Session, deadline: float) -> int:
        assert self.upstream is not None
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        idle = self.settings.idle_timeout_seconds
        started = time.perf_counter()
        try:
            response = await self.upstream.request(
                path + (f"?{query}" if query else ""),
                self._upstream_headers(scope["headers"]),
                body,
                head_timeout=max(0.0, min(idle, deadline - time.monotonic())),
            )
        except UpstreamTimeout:
            raise GatewayError(504, "upstream_timeout", "the upstream did not answer in time") from None
        except UpstreamError as exc:
            log.warning("gateway_upstream_unreachable", error=str(exc))
            raise GatewayError(
                502, "upstream_unreachable", "the upstream Messages API is unreachable"
            ) from None
        self.metrics.upstream.labels(path).observe(time.perf_counter() - started)
        meter: StreamMeter | JsonMeter | None = None
        if response.status == 200 and path == "/v1/messages":
            content_type = next((v for n, v in response.headers if n.lower() == b"content-type"), b"")
            meter = StreamMeter() if content_type.startswith(b"text/event-stream") else JsonMeter()
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [(n, v) for n, v in response.headers if n.lower() not in _DROP_RESPONSE],
                }
            )
            await self._pipe(response, send, meter, deadline)
        finally:
            response.close()
            if meter is not None:
                await self._record(session, meter)
        return response.status

    async def _pipe(
        self, response: UpstreamResponse, send: Send, meter: StreamMeter | JsonMeter | None, deadline: float
    ) -> None:
        """Relay the body as it arrives: each send carries all that came since the previous one."""
        try:
            async for data in response.chunks(self.settings.idle_timeout_seconds):
                if meter is not None:
                    meter.feed(data)
                await send({"type": "http.response.body", "body": data, "more_body": True})
                if time.monotonic() > deadline:
                    # A silent upstream is the idle timeout's; this caps a slow but steady one.
                    log.warning("gateway_request_timeout", seconds=self.settings.request_timeout_seconds)
                    break
        except UpstreamError as exc:
            # Headers are sent: all that is left is to end the body (the agent sees a cut stream).
            log.warning("gateway_upstream_cut", error=str(exc))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _record(self, session: Session, meter: StreamMeter | JsonMeter) -> None:
        session_id, labels = session.id, session.metadata.labels
        if isinstance(meter, JsonMeter):
            meter.finish()
        if not meter.seen:
            return
        model = meter.model or "unknown"
        tokens = meter.usage()
        usage = MeteredUsage(
            input_tokens=tokens.input_tokens,
            output_tokens=tokens.output_tokens,
            cache_creation_input_tokens=tokens.cache_creation_input_tokens,
            cache_read_input_tokens=tokens.cache_read_input_tokens,
            cost_usd=self.prices.cost(model, tokens),
        )
        label = labels.get(self.settings.metrics_label, "") if self.settings.metrics_label else ""
        self.metrics.metered(model, label, usage)
        now = utcnow()
        charged = [(b.counter_key(now), b.ttl_seconds()) for b in self.budgets if b.applies_to(labels)]
        assert self.store is not None
        try:
            # Shielded: the spend is recorded even when the request's task is being cancelled.
            event = _usage_event(model, usage)
            limit = session.spec.maxCostUsd
            warn_at = limit * self.settings.budget_warning_fraction if limit is not None else None
            await asyncio.shield(self.store.record_usage(session_id, usage, charged, event, warn_at))
        except StoreUnavailable:
            log.error("gateway_usage_not_recorded", session=session_id, cost_usd=usage.cost_usd)


def _usage_event(model: str, usage: MeteredUsage) -> SessionEvent:
    """The ``usage`` event of one response (the store adds the session's ``totalCostUsd``)."""
    return SessionEvent(
        type="usage",
        source="gateway",
        message=f"{model}: {usage.input_tokens} in, {usage.output_tokens} out, {usage.cost_usd:.6f} USD",
        data={
            "model": model,
            "inputTokens": usage.input_tokens,
            "outputTokens": usage.output_tokens,
            "cacheCreationInputTokens": usage.cache_creation_input_tokens,
            "cacheReadInputTokens": usage.cache_read_input_tokens,
            "costUsd": usage.cost_usd,
        },
    )


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise GatewayError(400, "disconnected", "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, "too_large", f"request body larger than {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _reply(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _error(send: Send, error: GatewayError) -> None:
    await _reply(send, error.status, error.body(), b"application/json")


def create_app(settings: GatewaySettings | None = None, store: GatewayStore | None = None) -> Gateway:
    return Gateway(settings or GatewaySettings(), store)
