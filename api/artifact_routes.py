"""The API's routes for a session's files: its artifacts, and the live files of its running agent.

``GET /sessions/{id}/artifacts``
    What the agent uploaded (``items``: name, size, sha256, uploadedAt, contentType) and what it
    skipped and why (``skipped``: name, reason, size). The bytes live in Redis
    (:mod:`api.store_artifacts`, which says why and with which caps).
``GET /sessions/{id}/artifacts/{name}``
    One artifact's bytes, streamed, with its content type, ``Content-Length`` and an
    ``X-Flyswarm-Sha256`` header. ``name`` is the path relative to the work dir; an absolute one or
    one with ``..`` is 400 naming ``name``.
``GET /sessions/{id}/files?path=``
    Served by the running agent (:mod:`api.store_files` explains the round trip): a directory is a
    JSON listing, a file its bytes (``X-Flyswarm-File-Type`` says which; at most
    ``FLYSWARM_FILES_MAX_BYTES``, larger: 413 with its size). ``path`` (default: the work dir) is
    checked like an artifact name (400 naming ``path``).
    No live agent (no heartbeat): 409; no answer within ``FLYSWARM_FILES_TIMEOUT_SECONDS``: 504.
"""

from __future__ import annotations

import base64
import mimetypes
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, cast

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from api.errors import ApiError, FieldProblem, bad_request
from api.models import check_work_path
from api.store_artifacts import Artifact, ArtifactGone
from api.wire import ERRORS_DOC, check_id

if TYPE_CHECKING:
    from api.app import ApiContext

router = APIRouter()


def _ctx(request: Request) -> ApiContext:
    return cast("ApiContext", request.app.state.ctx)


def _relative(field: str, value: str) -> str:
    try:
        return check_work_path(value, field)
    except ValueError as exc:
        raise bad_request(field, str(exc)) from None


async def _existing(ctx: ApiContext, session_id: str) -> None:
    if await ctx.store.get(session_id) is None:
        raise ApiError("not_found", f"no session {session_id}")


@router.get(
    "/sessions/{id}/artifacts",
    tags=["files"],
    summary="List a session's artifacts, and the files it skipped with the reason",
    responses=ERRORS_DOC,
)
async def list_artifacts(request: Request, id: str) -> Response:
    ctx = _ctx(request)
    session_id = check_id(id)
    await _existing(ctx, session_id)
    artifacts, skipped = await ctx.store.list_artifacts(session_id)
    return JSONResponse(
        {
            "items": [a.view() for a in artifacts],
            "skipped": [s.view() for s in skipped],
            "totalBytes": sum(a.size for a in artifacts),
        }
    )


@router.get(
    "/sessions/{id}/artifacts/{name:path}",
    tags=["files"],
    summary="Download one artifact (its bytes, as uploaded)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS_DOC},
)
async def get_artifact(request: Request, id: str, name: str) -> Response:
    ctx = _ctx(request)
    session_id = check_id(id)
    name = _relative("name", name)
    artifact = await ctx.store.get_artifact(session_id, name)
    if artifact is None:
        await _existing(ctx, session_id)
        raise ApiError("not_found", f"session {session_id} has no artifact {name}")
    headers = {
        "Content-Length": str(artifact.size),
        "X-Flyswarm-Sha256": artifact.sha256,
        "Content-Disposition": f'attachment; filename="{_safe_filename(name)}"',
    }
    return StreamingResponse(_bytes(ctx, artifact), media_type=artifact.contentType, headers=headers)


def _safe_filename(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base) or "artifact"


async def _bytes(ctx: ApiContext, artifact: Artifact) -> AsyncIterator[bytes]:
    try:
        async for chunk in ctx.store.artifact_bytes(artifact):
            yield chunk
    except ArtifactGone:
        # The headers are sent: ending short of Content-Length tells the client the body is cut.
        ctx.log.warning("artifact_gone", name=artifact.name)


@router.get(
    "/sessions/{id}/files",
    tags=["files"],
    summary="List a directory or read a file of a running session's work dir (from its live agent)",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}, "application/json": {}}},
        **ERRORS_DOC,
        504: ERRORS_DOC[503],
    },
)
async def live_file(
    request: Request,
    id: str,
    path: Annotated[str, Query(description="Relative to the work dir; a directory is listed.")] = ".",
) -> Response:
    ctx = _ctx(request)
    session_id = check_id(id)
    path = "." if path in ("", ".", "./") else _relative("path", path.rstrip("/"))
    session = await ctx.store.get(session_id)
    if session is None:
        raise ApiError("not_found", f"no session {session_id}")
    if not await ctx.store.agent_alive(session_id):
        phase = session.effective_phase().value
        raise ApiError(
            "conflict", f"session {session_id} has no running agent (phase {phase}); try its artifacts"
        )
    request_id = uuid.uuid4().hex
    await ctx.store.request_file(
        session_id, {"id": request_id, "path": path, "maxBytes": ctx.settings.files_max_bytes}
    )
    answer = await ctx.store.await_reply(session_id, request_id, ctx.settings.files_timeout_seconds)
    if answer is None:
        timeout = ctx.settings.files_timeout_seconds
        raise ApiError("agent_timeout", f"the agent of {session_id} did not answer within {timeout}s")
    return _answer_response(path, answer)


def _answer_response(path: str, answer: dict[str, Any]) -> Response:
    error = answer.get("error")
    if error == "not_found":
        raise ApiError("not_found", str(answer.get("message")), fields=[FieldProblem("path", "not found")])
    if error == "too_large":
        raise ApiError(
            "payload_too_large", str(answer.get("message")), fields=[FieldProblem("path", "too large")]
        )
    if error is not None:
        raise bad_request("path", str(answer.get("message") or error))
    if answer.get("type") == "directory":
        return JSONResponse(answer, headers={"X-Flyswarm-File-Type": "directory"})
    data = base64.b64decode(str(answer.get("content") or ""))
    media = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return Response(data, media_type=media, headers={"X-Flyswarm-File-Type": "file"})
