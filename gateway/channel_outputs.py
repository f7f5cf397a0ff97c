"""The agent channel's output routes: artifact uploads and answers to live-file requests.

=========================================  =====================================================
``GET  /agent/v1/artifacts/limits``         the caps (per file, per session, file count)
``PUT  /agent/v1/artifacts?name=``          one artifact: the raw bytes as the body
``POST /agent/v1/artifacts/skipped``        what the agent did not upload, and why
``GET  /agent/v1/files/next?after=&waitMs``  live-file requests after a stream id (long-poll)
``POST /agent/v1/files/reply``              the answer to one live-file request
=========================================  =====================================================

The caps are the gateway's settings and are enforced here, whatever the agent believes: an upload
past a cap is refused with 413 and the cap it passed (``error.code``: ``file_too_large``,
``session_bytes``, ``session_files``), which the agent records as the file's skip reason. The body
is read up to the per-file cap and no further. The sha256 is computed here, not taken from the
agent. Artifact names are the file's path relative to the work dir, validated as
:func:`api.models.check_work_path` does for the spec's globs.

The file-request long-poll waits on an :class:`gateway.inbox.InboxHub` over the request streams:
one ``XREAD`` for every waiting agent of this process, as for the inbox.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.models import check_work_path
from api.store_artifacts import REFUSALS, ArtifactLimits, Skipped

# gateway.channel imports this module inside ``_build_app`` only, once it is itself loaded: no cycle.
from gateway.channel import PREFIX, AgentChannel, ChannelError, SessionId

STREAM_ID = r"^\d{1,20}-\d{1,20}$"
#: Largest live-file answer (JSON, base64 content included) an agent may post.
MAX_ANSWER_CHARS = 2 * 1024 * 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SkippedItem(_Body):
    name: str = Field(min_length=1, max_length=1024)
    reason: str = Field(min_length=1, max_length=500)
    size: int | None = Field(default=None, ge=0)


class SkippedBody(_Body):
    items: list[SkippedItem] = Field(max_length=1000)


class FileAnswer(_Body):
    streamId: str = Field(pattern=STREAM_ID)
    id: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    answer: dict[str, Any]


def limits_of(channel: AgentChannel) -> ArtifactLimits:
    s = channel.settings
    return ArtifactLimits(s.artifact_max_file_bytes, s.artifact_max_session_bytes, s.artifact_max_files)


def output_routes(app: FastAPI, channel: AgentChannel) -> None:
    """Add the routes above to the channel's app."""

    def artifact_name(name: str) -> str:
        try:
            return check_work_path(name, "name")
        except ValueError as exc:
            raise ChannelError(
                422, "invalid", str(exc), fields=[{"field": "name", "reason": str(exc)}]
            ) from None

    @app.get(PREFIX + "/artifacts/limits")
    async def artifact_limits(session_id: SessionId) -> dict[str, int]:
        limits = limits_of(channel)
        return {
            "maxFileBytes": limits.max_file_bytes,
            "maxSessionBytes": limits.max_session_bytes,
            "maxFiles": limits.max_files,
        }

    @app.put(PREFIX + "/artifacts", status_code=201)
    async def put_artifact(
        request: Request, session_id: SessionId, name: Annotated[str, Query(max_length=1024)]
    ) -> dict[str, Any]:
        name = artifact_name(name)
        limits = limits_of(channel)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limits.max_file_bytes:
                raise ChannelError(
                    413, "file_too_large", REFUSALS["file_too_large"], limit=limits.max_file_bytes
                )
        digest = hashlib.sha256(data).hexdigest()
        content_type = request.headers.get("content-type") or "application/octet-stream"
        refused = await channel._store().put_artifact(
            session_id, name, bytes(data), digest, content_type[:200], limits
        )
        if refused == "gone":
            raise ChannelError(403, "deleted", f"session {session_id} was deleted")
        if refused is not None:
            raise ChannelError(413, refused, REFUSALS.get(refused, refused))
        return {"name": name, "size": len(data), "sha256": digest}

    @app.post(PREFIX + "/artifacts/skipped", status_code=204)
    async def post_skipped(session_id: SessionId, body: SkippedBody) -> None:
        items = [Skipped(artifact_name(i.name), i.reason, i.size) for i in body.items]
        await channel._store().record_skipped(session_id, items)

    @app.get(PREFIX + "/files/next")
    async def files_next(
        session_id: SessionId,
        after: Annotated[str, Query(pattern=STREAM_ID)] = "0-0",
        waitMs: Annotated[int, Query(ge=0, le=30_000)] = 0,
    ) -> dict[str, Any]:
        store = channel._store()
        found = await store.file_requests_after(session_id, after)
        if not found and waitMs > 0 and channel.files is not None:
            if await channel.files.wait(session_id, after, waitMs / 1000):
                found = await store.file_requests_after(session_id, after)
        return {"requests": [{"streamId": sid, "request": req} for sid, req in found]}

    @app.post(PREFIX + "/files/reply", status_code=204)
    async def files_reply(request: Request, session_id: SessionId) -> None:
        raw = await request.body()
        if len(raw) > MAX_ANSWER_CHARS:
            raise ChannelError(413, "answer_too_large", f"an answer is at most {MAX_ANSWER_CHARS} bytes")
        try:
            body = FileAnswer.model_validate_json(raw)
        except ValidationError as exc:
            fields = [
                {"field": ".".join(str(p) for p in e["loc"]) or "body", "reason": e["msg"]}
                for e in exc.errors()
            ]
            raise ChannelError(422, "invalid", "the request has invalid fields", fields=fields) from None
        await channel._store().answer_file_request(session_id, body.streamId, body.id, body.answer)
