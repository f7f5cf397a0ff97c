"""Uploading ``spec.output.artifacts``: the work dir's files matching the globs, through the gateway.

Called at the end of a task run (before the final report: once it is stored the controller finishes
the session and revokes the token) and at the end of every chat turn (a later turn's upload of the
same name replaces the earlier one). What is uploaded:

* every regular file matching a glob (``pathlib`` glob syntax, ``**`` included), relative to the
  work dir, in name order; directories are not artifacts;
* a path whose real location (symlinks resolved) is outside the work dir is skipped (``symlink
  out of the work dir``): a tool cannot publish ``/etc/shadow`` by linking it;
* the gateway's caps (``GET /agent/v1/artifacts/limits``) skip what would pass them before sending
  a byte; the gateway enforces them again (its refusal, 413, becomes the skip reason).

Every skipped file is recorded with its reason (``POST /agent/v1/artifacts/skipped``, served by the
API's artifact list) and the upload ends with one ``artifacts_uploaded`` event. Files are read in a
thread: heartbeats and live-file answers go on meanwhile. An unreachable control plane skips the
file with that reason rather than holding the run's end hostage.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.channel import AgentChannel, ChannelRefused
from api.models import check_work_path
from api.store_errors import StoreUnavailable

Emit = Callable[..., None]

#: Skip records sent per request, and skipped names listed in the event.
SKIP_BATCH = 200
EVENT_NAMES = 20


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int
    max_session_bytes: int
    max_files: int


@dataclass
class UploadSummary:
    uploaded: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str, int | None]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.uploaded)


def matching_files(work_dir: Path, globs: list[str]) -> tuple[list[str], list[tuple[str, str, int | None]]]:
    """Names (relative to ``work_dir``) of the regular files the globs match, and the skipped ones."""
    root = work_dir.resolve()
    found: set[str] = set()
    skipped: dict[str, tuple[str, str, int | None]] = {}
    for pattern in globs:
        for path in work_dir.glob(pattern):
            name = path.relative_to(work_dir).as_posix()
            real = Path(os.path.realpath(path))
            if not _valid_name(name):
                skipped[name] = (
                    _printable(name),
                    "a name the API cannot serve (backslash, NUL or too long)",
                    None,
                )
            elif real != root and root not in real.parents:
                skipped[name] = (name, "symlink out of the work dir", None)
            elif real.is_file():
                found.add(name)
    return sorted(found), sorted(skipped.values())


def _valid_name(name: str) -> bool:
    try:
        check_work_path(name)
    except ValueError:
        return False
    return True


def _printable(name: str) -> str:
    """A name the skip record can carry (the control plane refuses backslashes and NUL)."""
    return name.replace("\\", "%5C").replace("\0", "%00")[:1000]


def _read(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(limit + 1)


async def limits_of(channel: AgentChannel) -> Limits:
    data = (await channel.request("GET", "/artifacts/limits")).json()
    return Limits(int(data["maxFileBytes"]), int(data["maxSessionBytes"]), int(data["maxFiles"]))


async def upload_artifacts(channel: AgentChannel, work_dir: Path, globs: list[str]) -> UploadSummary:
    """Upload what the globs match; what was uploaded and what was skipped (and why)."""
    summary = UploadSummary()
    if not globs or not work_dir.is_dir():
        return summary
    limits = await limits_of(channel)
    names, summary.skipped = await asyncio.to_thread(matching_files, work_dir, globs)
    total = 0
    for index, name in enumerate(names):
        path = work_dir / name
        try:
            size = path.stat().st_size
        except OSError as exc:
            summary.skipped.append((name, f"unreadable: {exc.strerror or type(exc).__name__}", None))
            continue
        if index >= limits.max_files:
            summary.skipped.append((name, f"more than {limits.max_files} files match", size))
        elif size > limits.max_file_bytes:
            summary.skipped.append(
                (name, f"larger than the per-file cap ({limits.max_file_bytes} bytes)", size)
            )
        elif total + size > limits.max_session_bytes:
            cap = limits.max_session_bytes
            summary.skipped.append((name, f"would pass the per-session cap ({cap} bytes)", size))
        else:
            reason = await _upload(channel, path, name, limits)
            if reason is None:
                total += size
                summary.uploaded.append((name, size))
            else:
                summary.skipped.append((name, reason, size))
    for start in range(0, len(summary.skipped), SKIP_BATCH):
        items = [
            {"name": n, "reason": r, "size": s} for n, r, s in summary.skipped[start : start + SKIP_BATCH]
        ]
        await channel.request("POST", "/artifacts/skipped", json={"items": items})
    return summary


async def _upload(channel: AgentChannel, path: Path, name: str, limits: Limits) -> str | None:
    """Upload one file; None, or why it was not stored."""
    data = await asyncio.to_thread(_read, path, limits.max_file_bytes)
    if len(data) > limits.max_file_bytes:  # it grew since its size was read
        return f"larger than the per-file cap ({limits.max_file_bytes} bytes)"
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    try:
        response = await channel.request(
            "PUT",
            "/artifacts",
            params={"name": name},
            content=data,
            headers={"content-type": content_type},
            accept=(413,),
            timeout=max(channel.timeout, 60.0),
        )
    except (StoreUnavailable, ChannelRefused) as exc:
        return f"upload failed: {exc}"[:300]
    if response.status_code == 413:
        error: dict[str, Any] = response.json().get("error", {})
        return f"refused by the control plane: {error.get('message', 'too large')}"
    return None


async def publish_artifacts(
    channel: AgentChannel, work_dir: Path, globs: list[str], emit: Emit, log: Any
) -> None:
    """Upload the artifacts and say so in one event; never raises (a failed upload must not fail
    the run): the failure is logged and becomes the event's ``error``."""
    if not globs:
        return
    try:
        summary = await upload_artifacts(channel, work_dir, globs)
    except Exception as exc:
        log.warning("artifacts_upload_failed", error_type=type(exc).__name__, error=str(exc)[:300])
        emit("artifacts_uploaded", "failed", error=f"{type(exc).__name__}: {exc}"[:300])
        return
    log.info("artifacts_uploaded", uploaded=len(summary.uploaded), skipped=len(summary.skipped))
    emit("artifacts_uploaded", f"{len(summary.uploaded)} uploaded", **event_data(summary))


def event_data(summary: UploadSummary) -> dict[str, Any]:
    """The ``artifacts_uploaded`` event's data: counts, bytes and the first skipped names."""
    return {
        "uploaded": len(summary.uploaded),
        "bytes": summary.bytes,
        "skipped": [{"name": n, "reason": r} for n, r, _ in summary.skipped[:EVENT_NAMES]],
        "skippedCount": len(summary.skipped),
    }
