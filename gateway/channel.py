"""The agent channel: an agent's only way to its own state, served by the gateway with its session token.

An agent machine holds no Redis credential. Besides model traffic (``/v1/messages``), everything the
agent reads or writes about its session goes over HTTP to these routes, with the same per-session
token as ``x-api-key`` or ``Authorization: Bearer``:

=========================================  =====================================================
``GET  /agent/v1/session``                  its session (spec, status, report)
``PUT  /agent/v1/report``                   its report (the session's ``agent`` block)
``PUT  /agent/v1/heartbeat``                its heartbeat
``POST /agent/v1/events``                   a batch of events, appended in order
``GET  /agent/v1/inbox/next?waitMs=``       the oldest unacknowledged message (long-poll)
``POST /agent/v1/inbox/ack``                acknowledge a message's turn
``/agent/v1/transcripts/...``               the SDK ``SessionStore`` (:mod:`agent.channel_transcripts`)
``/agent/v1/artifacts...``, ``/files/...``  artifacts and live files (:mod:`gateway.channel_outputs`)
``/agent/v1/pool/...``                      a parked pool agent's booted mark and assignment, by
                                            its pool slot token only (:mod:`gateway.pool_routes`)
=========================================  =====================================================

The token decides the session: no route takes a session id, so an agent cannot name another
session's state at all. A malformed, unknown or revoked token is 401; a valid token of a deleted
session, or of one the controller has finished, is 403. Redis away: 503 (the agent retries).

The inbox long-poll waits on :class:`gateway.inbox.InboxHub`: a thousand idle agents are a thousand
futures and one ``XREAD``, not a thousand Redis connections.

Transcript summaries: the SDK's summary fold runs in the agent (the control plane does not install
the SDK). An append carries the summary the agent folded and the stored summary it folded from
(``summaryBase``); the store writes both in one transaction only if that base is still the stored
summary and every entry is new, and answers 409 with the stored summary and the new entries
otherwise, so the agent folds again. Concurrent writers neither lose nor double a summary update.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.logs import get_logger
from api.models import AgentReport, SessionEvent
from api.session_token import digest_matches, parse
from api.store_channel import ChannelStore, guarded
from api.store_errors import StoreUnavailable
from api.transcript_types import TranscriptKey
from gateway.inbox import InboxHub, InboxWaits
from gateway.pool_hub import AssignmentHub
from gateway.pool_routes import add_pool_routes
from gateway.settings import GatewaySettings

log = get_logger("gateway.channel")

PREFIX = "/agent/v1"
MAX_WAIT_MS = 30_000
STREAM_ID = r"^\d{1,20}-\d{1,20}$"


class ChannelError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


# -- bodies (pydantic at the edge) --------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeartbeatBody(_Body):
    machineId: str | None = Field(default=None, max_length=128)
    ttlSeconds: int = Field(ge=1, le=3600)
    state: str = Field(max_length=64)


class EventsBody(_Body):
    events: list[SessionEvent] = Field(max_length=1000)


class AckBody(_Body):
    id: str = Field(pattern=STREAM_ID)


class KeyBody(_Body):
    project_key: str = Field(min_length=1, max_length=4096)
    session_id: str = Field(min_length=1, max_length=512)
    subpath: str | None = Field(default=None, max_length=4096)

    def key(self) -> TranscriptKey:
        key: TranscriptKey = {"project_key": self.project_key, "session_id": self.session_id}
        if self.subpath:
            key["subpath"] = self.subpath
        return key


class LookupBody(_Body):
    key: KeyBody


class AppendBody(_Body):
    key: KeyBody
    entries: list[dict[str, Any]] = Field(max_length=10_000)
    summary: dict[str, Any] | None = None
    summaryBase: dict[str, Any] | None = None


class SummaryConflict(Exception):
    """The stored summary is not the one the agent folded from, or some entries were stored already."""

    def __init__(self, stored: Any, fresh: list[int]) -> None:
        super().__init__("summary conflict")
        self.stored, self.fresh = stored, fresh


# -- the app ----------------------------------------------------------------------------------------


class AgentChannel:
    """The channel's ASGI app, with its store and inbox hub (made by :meth:`startup`)."""

    def __init__(self, settings: GatewaySettings, store: ChannelStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self._owns_store = store is None
        self.inbox: InboxWaits | None = None
        self._hub: InboxHub | None = None
        self.files: InboxHub | None = None  # live-file requests wait like the inbox (channel_outputs)
        self.pool_hub: AssignmentHub | None = None
        self.app = _build_app(self)

    async def startup(self) -> None:
        if self.store is None:
            self.store = ChannelStore.connect(
                self.settings.redis_url.get_secret_value(),
                socket_timeout=max(self.settings.redis_timeout_seconds, 2.0),
            )
        block_ms = int(min(1000.0, self.settings.redis_timeout_seconds * 500))
        self._hub = InboxHub(self.store, block_ms=max(block_ms, 10))
        self.inbox = self._hub
        self.files = InboxHub(
            self.store, block_ms=max(block_ms, 10), read_many=self.store.file_requests_read_many
        )
        self.pool_hub = AssignmentHub(self.store)

    async def shutdown(self) -> None:
        if self._hub is not None:
            await self._hub.aclose()
        if self.files is not None:
            await self.files.aclose()
        if self.pool_hub is not None:
            await self.pool_hub.aclose()
        if self.store is not None and self._owns_store:
            await self.store.close()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    async def session_of(self, request: Request) -> str:
        """The session the request's token belongs to, or a 401/403 :class:`ChannelError`."""
        value = _token(request)
        if not value:
            raise ChannelError(401, "unauthorized", "x-api-key: a session token is required")
        token = parse(value)
        if token is None:
            raise ChannelError(401, "unauthorized", "x-api-key: not a flyswarm session token")
        admission = await self._store().admission(token.session_id)
        if not digest_matches(token.value, admission.token_digest):
            raise ChannelError(401, "unauthorized", "x-api-key: unknown or revoked session token")
        if not admission.exists or admission.deleted:
            raise ChannelError(403, "deleted", f"session {token.session_id} was deleted")
        if admission.finished:
            raise ChannelError(403, "finished", f"session {token.session_id} is finished")
        return token.session_id

    def _store(self) -> ChannelStore:
        assert self.store is not None, "startup() makes the store"
        return self.store


def _token(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, rest = request.headers.get("authorization", "").partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else None


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


async def _session_of(request: Request) -> str:
    channel: AgentChannel = request.app.state.channel
    return await channel.session_of(request)


# The session a request's token names: every route's one way to a session id.
SessionId = Annotated[str, Depends(_session_of)]


def _build_app(channel: AgentChannel) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.channel = channel

    @app.exception_handler(ChannelError)
    async def _refused(request: Request, exc: ChannelError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, **exc.extra)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return _error(503, "unavailable", "the control plane's store is unavailable; retry")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        message = f"{request.method} {request.url.path} is not a route of the agent channel"
        return _error(exc.status_code, code, message if exc.status_code in (404, 405) else str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"field": ".".join(str(p) for p in err["loc"][1:]) or "body", "reason": err["msg"]}
            for err in exc.errors()
        ]
        return _error(422, "invalid", "the request has invalid fields", fields=fields)

    @app.get(PREFIX + "/session")
    async def get_session(session_id: SessionId) -> Response:
        try:
            session = await channel._store().get(session_id)
        except ValueError as exc:  # an invalid stored spec: the agent reports SpecInvalid
            return _error(422, "session_spec_invalid", str(exc)[:1000])
        if session is None:
            raise ChannelError(403, "deleted", f"session {session_id} was deleted")
        return Response(session.model_dump_json(), media_type="application/json")

    @app.put(PREFIX + "/report")
    async def put_report(session_id: SessionId, report: AgentReport) -> dict[str, bool]:
        return {"written": await channel._store().write_agent_report(session_id, report)}

    @app.put(PREFIX + "/heartbeat", status_code=204)
    async def put_heartbeat(session_id: SessionId, beat: HeartbeatBody) -> None:
        await channel._store().heartbeat(session_id, beat.machineId, beat.ttlSeconds, beat.state)

    @app.post(PREFIX + "/events")
    async def post_events(session_id: SessionId, body: EventsBody) -> dict[str, list[str]]:
        forged = [i for i, e in enumerate(body.events) if e.source != "agent"]
        if forged:
            fields = [
                {"field": f"events.{i}.source", "reason": "an agent writes only source=agent"} for i in forged
            ]
            raise ChannelError(422, "invalid", "the request has invalid fields", fields=fields)
        return {"ids": await channel._store().append_events(session_id, body.events)}

    @app.get(PREFIX + "/inbox/next")
    async def inbox_next(
        session_id: SessionId, waitMs: Annotated[int, Query(ge=0, le=MAX_WAIT_MS)] = 0
    ) -> Response:
        store = channel._store()
        acked, message = await store.inbox_peek(session_id)
        if message is None and waitMs > 0 and channel.inbox is not None:
            if await channel.inbox.wait(session_id, acked, waitMs / 1000):
                acked, message = await store.inbox_peek(session_id)
        body = '{"message":' + (message.model_dump_json() if message else "null") + "}"
        return Response(body, media_type="application/json")

    @app.post(PREFIX + "/inbox/ack", status_code=204)
    async def inbox_ack(session_id: SessionId, body: AckBody) -> None:
        await channel._store().inbox_ack(session_id, body.id)

    _transcript_routes(app, channel)
    from gateway.channel_outputs import output_routes  # it imports this module: loaded by now

    output_routes(app, channel)
    add_pool_routes(app, channel, _token)
    return app


def _transcript_routes(app: FastAPI, channel: AgentChannel) -> None:
    """The SDK ``SessionStore`` over HTTP, for the token's session's transcripts."""

    @app.post(PREFIX + "/transcripts/append")
    async def append(session_id: SessionId, body: AppendBody) -> Response:
        key, entries = body.key.key(), body.entries
        fold = None
        if body.summary is not None and not body.key.subpath:
            index = {id(e): i for i, e in enumerate(entries)}
            wanted = body.summary

            def fold(prev: Any, _key: Any, fresh: Any) -> Any:
                # Runs inside the store's transaction, after the uuid check, with the stored summary.
                if prev != body.summaryBase or len(fresh) != len(entries):
                    raise SummaryConflict(prev, [index[id(e)] for e in fresh])
                return wanted

        store = channel._store().transcripts(session_id, fold=fold)
        try:
            await guarded(store.append(key, entries))  # type: ignore[arg-type]
        except SummaryConflict as conflict:
            return JSONResponse(
                {
                    "error": {"code": "conflict", "message": "fold again"},
                    "summary": conflict.stored,
                    "fresh": conflict.fresh,
                },
                status_code=409,
            )
        stored = None
        if fold is not None:  # what is stored now (this fold, or a retried batch's earlier one)
            summaries = await guarded(store.list_session_summaries(body.key.project_key))
            stored = next((s for s in summaries if s.get("session_id") == body.key.session_id), None)
        return JSONResponse({"summary": stored})

    @app.post(PREFIX + "/transcripts/load")
    async def load(session_id: SessionId, body: LookupBody) -> dict[str, Any]:
        store = channel._store().transcripts(session_id)
        return {"entries": await guarded(store.load(body.key.key()))}

    @app.get(PREFIX + "/transcripts/sessions")
    async def list_sessions(
        session_id: SessionId, projectKey: Annotated[str, Query(min_length=1, max_length=4096)]
    ) -> dict[str, Any]:
        store = channel._store().transcripts(session_id)
        return {"sessions": await guarded(store.list_sessions(projectKey))}

    @app.get(PREFIX + "/transcripts/summaries")
    async def list_summaries(
        session_id: SessionId, projectKey: Annotated[str, Query(min_length=1, max_length=4096)]
    ) -> dict[str, Any]:
        store = channel._store().transcripts(session_id)
        return {"summaries": await guarded(store.list_session_summaries(projectKey))}

    @app.post(PREFIX + "/transcripts/delete", status_code=204)
    async def delete(session_id: SessionId, body: LookupBody) -> None:
        await guarded(channel._store().transcripts(session_id).delete(body.key.key()))

    @app.post(PREFIX + "/transcripts/subkeys")
    async def list_subkeys(session_id: SessionId, body: LookupBody) -> dict[str, Any]:
        store = channel._store().transcripts(session_id)
        key = {"project_key": body.key.project_key, "session_id": body.key.session_id}
        return {"subkeys": await guarded(store.list_subkeys(key))}  # type: ignore[arg-type]

    @app.get(PREFIX + "/transcripts/projects")
    async def projects(session_id: SessionId) -> dict[str, Any]:
        return {"projects": await guarded(channel._store().transcripts(session_id).project_keys())}
