"""The HTTP API: a thin FastAPI app over the store.

The API only writes desired state (spec, labels, deletion, chat messages) and reads what the
controller and the agents wrote; it never talks to Fly. Each handler is a few store calls; what the
bodies look like is :mod:`api.wire`, the error body is :mod:`api.errors`, the edge (auth, request id,
access log, metrics) is :mod:`api.middleware`, streams are :mod:`api.streaming` and :mod:`api.websocket`.

Routes
    ``POST /sessions`` create (201) or return the identical existing session (200); same id with
    another spec or labels is a 409. ``PUT /sessions/{id}`` declarative apply: the body is the whole
    desired state (omitted labels mean none); the ``Flyswarm-Apply-Result`` header says ``created``
    (201), ``configured`` or ``unchanged`` (200). Changing ``spec.mode`` of an existing session is a
    422 (immutable, as Kubernetes answers for immutable fields); changing the spec of a finished
    session, or anything of a session being deleted, is a 409. ``GET /sessions/{id}``,
    ``GET /sessions`` (``labelSelector``/``selector``, ``phase``, ``limit``, ``cursor``),
    ``DELETE /sessions/{id}`` (202; the controller finalizes), ``POST /sessions/{id}/messages`` (202;
    chat sessions only, 409 for task, finished or deleting sessions), ``GET /sessions/{id}/events``
    (SSE), ``WS /sessions/{id}/ws``, ``GET /sessions/{id}/artifacts[/{name}]`` and
    ``GET /sessions/{id}/files?path=`` (:mod:`api.artifact_routes`), ``GET /health``,
    ``GET /readyz``, ``GET /metrics``, ``GET /openapi.json``. Pools (``/pools``, warm agent
    machines): :mod:`api.pool_routes`.

Auth
    Bearer tokens from ``API_TOKENS``; ``/health`` and ``/readyz`` are always open, ``/metrics``
    needs a token unless ``FLYSWARM_METRICS_PUBLIC=true``; ``/openapi.json`` and ``/docs`` need one
    too (an open API's shape is nobody's business). Without tokens the API is open and
    :mod:`api.server` refuses to bind anything but loopback.

Redis outages
    Every :class:`~api.store_base.StoreUnavailable` becomes a 503 with ``Retry-After: 1``; the client's
    connection pool reconnects by itself, so the API serves again as soon as Redis is back. A
    request that waited ``FLYSWARM_REDIS_POOL_TIMEOUT_SECONDS`` for a free connection
    (:class:`~api.store_base.StoreBusy`) gets the same 503, with a message naming the limit.

Followers
    ``follow=true`` event streams and WebSockets are served by the process's fan-out hub
    (:mod:`api.fanout`, SSE framing in :mod:`api.sse`): a few Redis readers for every follower.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, cast
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Header, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response, StreamingResponse

from api.artifact_routes import router as artifact_router
from api.errors import (
    ApiError,
    ErrorBody,
    FieldProblem,
    bad_request,
    error_payload,
    error_response,
    field_problems,
    invalid,
)
from api.fanout import Hub
from api.follower import FeedItem
from api.logs import get_logger, register_secret
from api.metrics import ApiMetrics
from api.middleware import OPEN_PATHS, EdgeMiddleware
from api.models import MessageAccepted, Phase, SessionView, generate_session_id
from api.pool_routes import pool_router
from api.pool_wire import pool_openapi_schemas
from api.selector import SelectorError, parse_selector
from api.settings import ApiSettings
from api.sse import SseFollow, sse_error_frame
from api.store import ApiStore, InvalidCursor
from api.store_base import StoreBusy, StoreUnavailable
from api.streaming import parse_stream_id, replay_events, sse_frame
from api.webhook_routes import admit_notify, webhook_router
from api.websocket import SessionSocket
from api.wire import (
    APPLY_RESULT_HEADER,
    ERRORS_DOC,
    MessageIn,
    SessionList,
    body_doc,
    check_id,
    differences,
    openapi_schemas,
    parse_session_body,
    read_json_object,
    session_view,
)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_UNAVAILABLE = "the session store (Redis) is unreachable"


@dataclass(frozen=True)
class ApiContext:
    """What every handler needs, built once by :func:`create_app` (``app.state.ctx``)."""

    settings: ApiSettings
    store: ApiStore
    metrics: ApiMetrics
    log: Any
    hub: Hub
    # A blocking read must end well before the Redis socket timeout, or it would look like a dead server.
    block_slice_seconds: float


def _ctx(conn: HTTPConnection) -> ApiContext:
    return cast(ApiContext, conn.app.state.ctx)


def _request_id(conn: HTTPConnection) -> str | None:
    value = conn.scope.get("state", {}).get("request_id")
    return str(value) if value is not None else None


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=headers)


def _redis_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def store_from_settings(settings: ApiSettings) -> ApiStore:
    """The API's store: few, fast retries, so an outage answers 503 quickly instead of hanging."""
    return ApiStore.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=settings.redis_timeout_seconds,
        retries=2,
        pool_size=settings.redis_pool_size,
        pool_timeout=settings.redis_pool_timeout_seconds,
        blocking_pool_size=settings.stream_readers,
    )


router = APIRouter()

# -- probes ---------------------------------------------------------------------------------------


@router.get("/health", tags=["probes"], summary="Liveness (no auth, no Redis)")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["probes"],
    summary="Readiness: Redis answers (no auth)",
    responses={503: {"model": ErrorBody}},
)
async def readyz(request: Request) -> Response:
    ctx = _ctx(request)
    try:
        await asyncio.wait_for(ctx.store.ping(), timeout=min(2.0, ctx.settings.redis_timeout_seconds))
    except (StoreUnavailable, TimeoutError):
        return error_response(ApiError("unavailable", _UNAVAILABLE), _request_id(request))
    return _json({"status": "ok"})


@router.get(
    "/metrics",
    tags=["probes"],
    summary="Prometheus metrics (bearer token unless FLYSWARM_METRICS_PUBLIC=true)",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        401: {"model": ErrorBody},
    },
)
async def prometheus_metrics(request: Request) -> Response:
    ctx = _ctx(request)
    await ctx.metrics.refresh_sessions(ctx.store)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- sessions -------------------------------------------------------------------------------------


@router.post(
    "/sessions",
    tags=["sessions"],
    summary="Create a session (full resource or the seed's short form); idempotent by id",
    status_code=201,
    responses={201: {"model": SessionView}, 200: {"model": SessionView}, **ERRORS_DOC},
    openapi_extra=body_doc("SessionManifest", "ShortForm"),
)
async def create_session(request: Request) -> Response:
    ctx = _ctx(request)
    data = await read_json_object(request, ctx.settings.max_body_bytes)
    parsed = parse_session_body(data, ctx.settings.prompt_max_chars)
    await admit_notify(parsed.spec, ctx.settings.webhook_allow_private)
    session_id = parsed.name or generate_session_id()
    outcome = await ctx.store.create_or_get(ctx.store.new_session(session_id, parsed.spec, parsed.labels))
    stored = outcome.session
    if stored is None:  # pragma: no cover - the store always returns the session
        raise StoreUnavailable("create returned no session")
    location = {"Location": f"/sessions/{session_id}"}
    if outcome.result == "created":
        ctx.log.info("session_created", session_id=session_id, mode=parsed.spec.mode)
        return _json(session_view(stored), 201, location)
    if stored.deleted:
        raise ApiError("conflict", f"session {session_id} exists and is being deleted")
    changed = differences(stored, parsed.spec, parsed.labels)
    if changed:
        message = (
            f"session {session_id} already exists with another spec; PUT /sessions/{session_id} changes it"
        )
        raise ApiError("conflict", message, fields=changed)
    return _json(session_view(stored), 200, location)


@router.put(
    "/sessions/{id}",
    tags=["sessions"],
    summary="Apply a session: create it or update its spec and labels (declarative)",
    responses={201: {"model": SessionView}, 200: {"model": SessionView}, **ERRORS_DOC},
    openapi_extra=body_doc("SessionManifest", "ShortForm"),
)
async def apply_session(request: Request, id: str) -> Response:
    ctx = _ctx(request)
    session_id = check_id(id)
    data = await read_json_object(request, ctx.settings.max_body_bytes)
    parsed = parse_session_body(data, ctx.settings.prompt_max_chars)
    await admit_notify(parsed.spec, ctx.settings.webhook_allow_private)
    manifest = parsed.form == "manifest"
    if parsed.name is not None and parsed.name != session_id:
        reason = f"must equal the id in the path ({session_id}) or be omitted"
        raise invalid([FieldProblem("metadata.name" if manifest else "session_id", reason)])
    # The store applies atomically and checks the rules itself (mode is immutable, a finished
    # session's spec is frozen, a deleting session takes no change); the messages come from the
    # session it returns with the refusal.
    outcome = await ctx.store.apply(ctx.store.new_session(session_id, parsed.spec, parsed.labels))
    if outcome.result == "deleting":
        raise ApiError("conflict", f"session {session_id} is being deleted")
    if outcome.result == "mode_conflict":
        current = outcome.session.spec.mode if outcome.session is not None else "different"
        reason = f"is immutable (the session is a {current} session)"
        raise invalid(
            [FieldProblem("spec.mode" if manifest else "mode", reason)],
            "spec.mode cannot change; delete the session and create a new one",
        )
    if outcome.result == "finished":
        phase = outcome.session.effective_phase().value if outcome.session is not None else "finished"
        raise ApiError(
            "conflict",
            f"session {session_id} has finished ({phase}); its spec can no longer change",
            fields=[FieldProblem("spec", "the session has finished")],
        )
    if outcome.session is None:  # pragma: no cover
        raise StoreUnavailable("apply returned no session")
    if outcome.result != "unchanged":
        ctx.log.info("session_applied", session_id=session_id, result=outcome.result)
    status = 201 if outcome.result == "created" else 200
    return _json(session_view(outcome.session), status, {APPLY_RESULT_HEADER: outcome.result})


@router.get(
    "/sessions/{id}",
    tags=["sessions"],
    summary="Get a session",
    responses={200: {"model": SessionView}, **ERRORS_DOC},
)
async def get_session(request: Request, id: str) -> Response:
    session = await _ctx(request).store.get(check_id(id))
    if session is None:
        raise ApiError("not_found", f"no session {id}")
    return _json(session_view(session))


@router.get(
    "/sessions",
    tags=["sessions"],
    summary="List sessions by label selector and phase, in id order, a page at a time",
    responses={200: {"model": SessionList}, **ERRORS_DOC},
)
async def list_sessions(
    request: Request,
    labelSelector: Annotated[str | None, Query(description="e.g. team=ios,tier!=free,env in (a,b)")] = None,
    selector: Annotated[str | None, Query(description="Alias of labelSelector.")] = None,
    phase: Annotated[
        str | None,
        Query(
            description="Only sessions in this (effective) phase; any case.",
            json_schema_extra={"enum": [p.value for p in Phase]},
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="The cursor of the previous page.")] = None,
) -> Response:
    if labelSelector is not None and selector is not None and labelSelector != selector:
        raise bad_request("selector", "give labelSelector or selector, not both")
    field = "labelSelector" if labelSelector is not None else "selector"
    try:
        parsed_selector = parse_selector(labelSelector if labelSelector is not None else selector)
    except SelectorError as exc:
        raise bad_request(field, str(exc)) from None
    wanted = _parse_phase(phase)
    try:
        page = await _ctx(request).store.list(
            selector=parsed_selector, phase=wanted, limit=limit, cursor=cursor
        )
    except InvalidCursor as exc:
        raise bad_request("cursor", str(exc)) from None
    return _json({"items": [session_view(s) for s in page.sessions], "cursor": page.cursor})


def _parse_phase(value: str | None) -> Phase | None:
    if value is None or not value.strip():
        return None
    for phase in Phase:
        if phase.value.lower() == value.strip().lower():
            return phase
    raise bad_request("phase", "must be one of " + ", ".join(p.value for p in Phase))


@router.delete(
    "/sessions/{id}",
    tags=["sessions"],
    summary="Delete a session (the controller destroys its machine, then removes the record)",
    status_code=202,
    responses={202: {"model": SessionView}, **ERRORS_DOC},
)
async def delete_session(request: Request, id: str) -> Response:
    ctx = _ctx(request)
    session = await ctx.store.mark_deleted(check_id(id))
    if session is None:
        raise ApiError("not_found", f"no session {id}")
    ctx.log.info("session_deleted", session_id=id)
    return _json(session_view(session), 202)


# -- chat -----------------------------------------------------------------------------------------


async def accept_message(ctx: ApiContext, session_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """Validate one chat message and put it in the session's inbox (HTTP and WebSocket alike)."""
    try:
        message = MessageIn.model_validate(data)
    except ValidationError as exc:
        raise invalid(field_problems(exc)) from None
    if len(message.text) > ctx.settings.prompt_max_chars:
        raise invalid([FieldProblem("text", f"longer than {ctx.settings.prompt_max_chars} characters")])
    session = await ctx.store.get(session_id)
    if session is None:
        raise ApiError("not_found", f"no session {session_id}")
    if session.spec.mode != "chat":
        raise ApiError(
            "conflict",
            f"session {session_id} is a task session; only chat sessions take messages",
            fields=[FieldProblem("spec.mode", "is task")],
        )
    if session.deleted:
        raise ApiError("conflict", f"session {session_id} is being deleted")
    phase = session.effective_phase()
    if phase.finished:
        raise ApiError("conflict", f"session {session_id} has finished ({phase.value})")
    stored = await ctx.store.send_message(session_id, message.text)
    ctx.log.info("message_accepted", session_id=session_id, message_id=stored.id)
    return {"id": stored.id, "session_id": session_id, "createdAt": stored.createdAt.isoformat()}


@router.post(
    "/sessions/{id}/messages",
    tags=["chat"],
    summary="Send a chat message to a chat session",
    status_code=202,
    responses={202: {"model": MessageAccepted}, **ERRORS_DOC},
    openapi_extra=body_doc("MessageIn"),
)
async def post_message(request: Request, id: str) -> Response:
    ctx = _ctx(request)
    session_id = check_id(id)
    data = await read_json_object(request, ctx.settings.max_body_bytes)
    return _json(await accept_message(ctx, session_id, data), 202)


# -- streams --------------------------------------------------------------------------------------


@router.get(
    "/sessions/{id}/events",
    tags=["streams"],
    summary="Server-Sent Events of a session: replay after Last-Event-ID (or ?after=), then follow",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS_DOC},
)
async def session_events(
    request: Request,
    id: str,
    after: Annotated[str | None, Query(description="Replay events after this id.")] = None,
    follow: Annotated[bool, Query(description="false: send what exists and close.")] = True,
    last_event_id: Annotated[str | None, Header(description="Sent by EventSource; wins over after.")] = None,
) -> Response:
    ctx = _ctx(request)
    session_id = check_id(id)
    field, raw = ("Last-Event-ID", last_event_id) if last_event_id is not None else ("after", after)
    try:
        start = parse_stream_id(raw)
    except ValueError as exc:
        raise bad_request(field, str(exc)) from None
    if await ctx.store.get(session_id) is None:
        raise ApiError("not_found", f"no session {session_id}")
    if follow:
        if ctx.hub.followers >= ctx.hub.max_followers:
            raise _follower_limit(ctx)

        def feed(on_cut: Callable[[], None]) -> AsyncGenerator[FeedItem, None]:
            return ctx.hub.events(session_id, start, "sse", on_cut)

        return SseFollow(feed, ctx.metrics, _SSE_HEADERS)
    return StreamingResponse(
        _sse_replay(ctx, session_id, start), media_type="text/event-stream", headers=_SSE_HEADERS
    )


def _follower_limit(ctx: ApiContext) -> ApiError:
    message = (
        f"this API process already serves {ctx.hub.max_followers} followers "
        "(FLYSWARM_STREAM_MAX_FOLLOWERS); retry shortly"
    )
    return ApiError("unavailable", message, headers={"Retry-After": "1"})


async def _sse_replay(ctx: ApiContext, session_id: str, start: str | None) -> AsyncIterator[bytes]:
    """``follow=false``: what is stored after ``start``, then the end of the response."""
    ctx.metrics.streams.inc()
    try:
        yield b"retry: 2000\n\n"
        async for item in replay_events(ctx.store, session_id, start):
            yield sse_frame(item)
    except StoreUnavailable:
        # The headers are gone: say why in-band and end; EventSource reconnects with Last-Event-ID.
        yield sse_error_frame("unavailable", _UNAVAILABLE)
    finally:
        ctx.metrics.streams.dec()


@router.websocket("/sessions/{id}/ws")
async def session_ws(websocket: WebSocket, id: str, after: str | None = None) -> None:
    ctx = _ctx(websocket)

    async def sink(session_id: str, data: dict[str, Any]) -> dict[str, Any]:
        return await accept_message(ctx, session_id, data)

    socket = SessionSocket(
        websocket,
        ctx.store,
        ctx.hub,
        sink,
        request_id=_request_id(websocket),
    )
    try:
        session_id = check_id(id)
    except ApiError as exc:
        await websocket.accept()
        await socket.send_error(exc)
        await websocket.close(4400)
        return
    ctx.metrics.streams.inc()
    try:
        await socket.serve(session_id, after)
    finally:
        ctx.metrics.streams.dec()


# -- error handlers -------------------------------------------------------------------------------


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, _request_id(request))


async def _on_store_unavailable(request: Request, exc: Exception) -> Response:
    ctx = _ctx(request)
    ctx.metrics.store_unavailable.inc()
    if isinstance(exc, StoreBusy):
        # A real limit, reached by this request only: every connection of the pool stayed busy.
        ctx.log.warning("store_busy", path=request.url.path)
        message = (
            "the API is at its limit of concurrent Redis calls (FLYSWARM_REDIS_POOL_SIZE); retry shortly"
        )
        error = ApiError("unavailable", message, headers={"Retry-After": "1"})
        return error_response(error, _request_id(request))
    ctx.log.warning("store_unavailable", path=request.url.path)
    error = ApiError("unavailable", f"{_UNAVAILABLE}; retry shortly", headers={"Retry-After": "1"})
    return error_response(error, _request_id(request))


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    """Query, path and header parameters FastAPI validated: 400 naming each by its wire name."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        name = ".".join(loc[1:]) if len(loc) > 1 else (loc[0] if loc else "request")
        if loc and loc[0] == "header":
            name = "-".join(part.capitalize() for part in name.replace("_", "-").split("-"))
        problems.append(FieldProblem(name, str(err.get("msg", "invalid"))))
    first = problems[0] if problems else FieldProblem("request", "invalid")
    error = ApiError("bad_request", f"invalid {first.field}: {first.reason}", fields=problems)
    return error_response(error, _request_id(request))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 401: "unauthorized"}
    code = codes.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
    messages = {404: "no such route", 405: "method not allowed on this route"}
    payload = error_payload(code, messages.get(exc.status_code, "request refused"), (), _request_id(request))
    return JSONResponse(payload, status_code=exc.status_code, headers=dict(exc.headers or {}))


# -- the app --------------------------------------------------------------------------------------


def _install_openapi(app: FastAPI) -> None:
    """FastAPI's document plus the hand-parsed body schemas and the bearer scheme."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, description=__doc__, routes=app.routes
        )
        components = schema.setdefault("components", {})
        for name, body in {**openapi_schemas(), **pool_openapi_schemas()}.items():
            components.setdefault("schemas", {}).setdefault(name, body)
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        # The probes answer without a token: an empty requirement overrides the global one.
        for path in OPEN_PATHS:
            for operation in schema["paths"].get(path, {}).values():
                operation["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _block_slice(settings: ApiSettings) -> float:
    return max(0.05, min(settings.sse_keepalive_seconds, settings.redis_timeout_seconds / 2))


def create_app(settings: ApiSettings, store: ApiStore | None = None) -> FastAPI:
    """The ASGI app. Without ``store`` it builds its own from ``REDIS_URL`` and closes it at shutdown."""
    for token in settings.token_values():
        register_secret(token)
    register_secret(_redis_password(settings.redis_url.get_secret_value()))
    owns_store = store is None
    the_store = store if store is not None else store_from_settings(settings)
    metrics = ApiMetrics(settings.metrics_sessions_refresh_seconds)
    metrics.watch_pools(the_store.pool_stats)
    block_slice = _block_slice(settings)
    ctx = ApiContext(
        settings=settings,
        store=the_store,
        metrics=metrics,
        log=get_logger("api"),
        hub=Hub(
            the_store,
            metrics,
            readers=settings.stream_readers,
            max_followers=settings.stream_max_followers,
            buffer=settings.stream_follower_buffer,
            keepalive_seconds=settings.sse_keepalive_seconds,
            block_slice_seconds=block_slice,
        ),
        block_slice_seconds=block_slice,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        ctx.log.info("api_started", host=settings.host, port=settings.port, auth=settings.auth_enabled)
        # Learn a Redis Cluster's topology before the first requests race (see StoreBase.learn_topology);
        # Redis being away at start is an outage like any other, served as 503s until it is back.
        with contextlib.suppress(StoreUnavailable):
            await ctx.store.learn_topology()
        try:
            yield
        finally:
            await ctx.hub.aclose()
            if owns_store:
                await ctx.store.close()
            ctx.log.info("api_stopped")

    app = FastAPI(
        title="flyswarm",
        version="1",
        summary="Declare Claude Agent SDK sessions; a controller runs them on Fly Machines.",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.include_router(router)
    app.include_router(pool_router)
    app.include_router(webhook_router)
    app.include_router(artifact_router)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StoreUnavailable, _on_store_unavailable)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    _install_openapi(app)
    app.add_middleware(
        EdgeMiddleware,
        tokens=settings.token_values(),
        metrics=ctx.metrics,
        metrics_public=settings.metrics_public,
    )
    return app
