"""Artifacts: the files a session declared in ``spec.output.artifacts``, kept in Redis with caps.

Where the bytes live: in the session's own Redis slot, beside its record. It needs no new service
(``make up`` and a one-node deployment already have Redis), the session's removal takes the bytes
with it in the same atomic step (:mod:`api.store_teardown`), and the caps keep Redis memory bounded:
``FLYSWARM_ARTIFACT_MAX_FILE_BYTES`` per file (10 MiB), ``..._MAX_SESSION_BYTES`` per session (50
MiB), ``..._MAX_FILES`` files (100). An S3-compatible store (Fly's Tigris) is the production answer
for larger outputs: the record format (name, size, sha256, uploadedAt) is what an object key needs,
so the swap is this module's.

Keys (all under the session's hash tag, so every script below stays in one slot):

* :func:`api.keys.artifacts` - hash: name -> record JSON (``size``, ``sha256``, ``uploadedAt``,
  ``contentType``, ``key``: the data key of the upload);
* :func:`api.keys.artifact_data` - list per upload: the bytes in chunks of :data:`CHUNK_BYTES`
  (binary values, never decoded: a round trip is byte-exact);
* :func:`api.keys.artifacts_skipped` - hash: name -> why the agent did not upload it.

Each is added to the session's key registry in the same script that creates it. An upload is one
Lua script: it checks the session exists (no orphan keys after a removal), checks the caps against
what is stored (a re-upload of a name replaces it and counts once), writes the chunks under a new
upload id, points the record at them and deletes the previous upload's data. A reader that fetched
a record just before a re-upload may find its data gone: it gets :class:`ArtifactGone`.

Roles: the gateway writes (:class:`ArtifactWrites`, mixed into the channel store) for the agent;
the API reads (:class:`ArtifactReads`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api import keys
from api.models import utcnow
from api.store_base import StoreBase, unavailable_on_redis_error

CHUNK_BYTES = 256 * 1024
#: Chunks fetched per round trip when serving an artifact.
READ_BATCH = 8


@dataclass(frozen=True)
class ArtifactLimits:
    max_file_bytes: int
    max_session_bytes: int
    max_files: int


@dataclass(frozen=True)
class Artifact:
    name: str
    size: int
    sha256: str
    uploadedAt: datetime
    contentType: str
    key: str

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "uploadedAt": self.uploadedAt.isoformat(),
            "contentType": self.contentType,
        }


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str
    size: int | None

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "size": self.size}


class ArtifactGone(LookupError):
    """The artifact's bytes went away while being read (replaced or the session removed)."""


# KEYS: record hash, skipped hash, registry, new data key, session hash.
# ARGV: name, record JSON, size, max file bytes, max session bytes, max files, chunks...
# Returns "ok" or a refusal: "gone", "file_too_large", "session_bytes", "session_files".
_PUT_LUA = """
if redis.call('EXISTS', KEYS[5]) == 0 then return 'gone' end
local size = tonumber(ARGV[3])
if size > tonumber(ARGV[4]) then return 'file_too_large' end
local total, count, old = 0, 0, nil
local records = redis.call('HGETALL', KEYS[1])
for i = 1, #records, 2 do
  local rec = cjson.decode(records[i + 1])
  if records[i] == ARGV[1] then old = rec.key else
    total = total + rec.size
    count = count + 1
  end
end
if total + size > tonumber(ARGV[5]) then return 'session_bytes' end
if count + 1 > tonumber(ARGV[6]) then return 'session_files' end
for i = 7, #ARGV do redis.call('RPUSH', KEYS[4], ARGV[i]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], KEYS[1], KEYS[2], KEYS[4])
if old and old ~= KEYS[4] then
  redis.call('DEL', old)
  redis.call('SREM', KEYS[3], old)
end
return 'ok'
"""

# KEYS: skipped hash, registry, session hash. ARGV: name, JSON, name, JSON, ...
_SKIP_LUA = """
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[2], KEYS[1])
return 1
"""

#: Why a put was refused, as the agent records it.
REFUSALS = {
    "file_too_large": "larger than the per-file cap (FLYSWARM_ARTIFACT_MAX_FILE_BYTES)",
    "session_bytes": "the session's artifacts would pass FLYSWARM_ARTIFACT_MAX_SESSION_BYTES",
    "session_files": "the session already keeps FLYSWARM_ARTIFACT_MAX_FILES artifacts",
    "gone": "the session was removed",
}


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or []


def _artifact(name: str, raw: str) -> Artifact:
    rec = json.loads(raw)
    return Artifact(
        name=name,
        size=int(rec["size"]),
        sha256=str(rec["sha256"]),
        uploadedAt=datetime.fromisoformat(rec["uploadedAt"]),
        contentType=str(rec.get("contentType") or "application/octet-stream"),
        key=str(rec["key"]),
    )


class ArtifactWrites(StoreBase):
    """The gateway's half: an agent's uploads and skip records."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._put_artifact = self._redis.register_script(_PUT_LUA)
        self._skip_artifacts = self._redis.register_script(_SKIP_LUA)

    @unavailable_on_redis_error
    async def put_artifact(
        self, session_id: str, name: str, data: bytes, sha256: str, content_type: str, limits: ArtifactLimits
    ) -> str | None:
        """Store one artifact (replacing one of the same name); None, or why it was refused."""
        data_key = keys.artifact_data(session_id, uuid.uuid4().hex)
        record = {
            "size": len(data),
            "sha256": sha256,
            "uploadedAt": utcnow().isoformat(),
            "contentType": content_type,
            "key": data_key,
        }
        reply = await self._put_artifact(
            keys=[
                keys.artifacts(session_id),
                keys.artifacts_skipped(session_id),
                keys.session_registry(session_id),
                data_key,
                keys.session(session_id),
            ],
            args=[
                name,
                json.dumps(record),
                len(data),
                limits.max_file_bytes,
                limits.max_session_bytes,
                limits.max_files,
                *_chunks(data),
            ],
        )
        return None if str(reply) == "ok" else str(reply)

    @unavailable_on_redis_error
    async def record_skipped(self, session_id: str, skipped: list[Skipped]) -> None:
        if not skipped:
            return
        args: list[str] = []
        for item in skipped:
            args += [item.name, json.dumps({"reason": item.reason, "size": item.size})]
        await self._skip_artifacts(
            keys=[
                keys.artifacts_skipped(session_id),
                keys.session_registry(session_id),
                keys.session(session_id),
            ],
            args=args,
        )


class ArtifactReads(StoreBase):
    """The API's half: list and read a session's artifacts."""

    @unavailable_on_redis_error
    async def list_artifacts(self, session_id: str) -> tuple[list[Artifact], list[Skipped]]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.artifacts(session_id))
            pipe.hgetall(keys.artifacts_skipped(session_id))
            stored, skipped = await pipe.execute()
        artifacts = sorted((_artifact(n, r) for n, r in stored.items()), key=lambda a: a.name)
        skips = []
        for name, raw in sorted(skipped.items()):
            rec = json.loads(raw)
            skips.append(Skipped(name=name, reason=str(rec.get("reason")), size=rec.get("size")))
        return artifacts, skips

    @unavailable_on_redis_error
    async def get_artifact(self, session_id: str, name: str) -> Artifact | None:
        raw = await self._redis.hget(keys.artifacts(session_id), name)
        return None if raw is None else _artifact(name, raw)

    async def artifact_bytes(self, artifact: Artifact) -> AsyncIterator[bytes]:
        """The artifact's bytes, a few chunks per round trip; :class:`ArtifactGone` if they vanish."""
        sent, index = 0, 0
        while sent < artifact.size:
            batch = await self._chunk_batch(artifact.key, index)
            if not batch:
                raise ArtifactGone(artifact.name)
            for chunk in batch:
                sent += len(chunk)
                yield chunk
            index += len(batch)
        if sent != artifact.size:
            raise ArtifactGone(artifact.name)

    @unavailable_on_redis_error
    async def _chunk_batch(self, key: str, start: int) -> list[bytes]:
        # NEVER_DECODE: this client decodes replies as UTF-8; artifact bytes must come back untouched.
        reply = await self._redis.execute_command(
            "LRANGE", key, start, start + READ_BATCH - 1, NEVER_DECODE=True
        )
        return [bytes(chunk) for chunk in reply or []]
