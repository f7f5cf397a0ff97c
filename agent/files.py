"""Answering live-file requests: the API's ``GET /sessions/{id}/files`` served from this machine.

A task of its own, started with the heartbeat and stopped at the end of the run, so it answers
while a turn runs (the SDK's work happens in the CLI process; this loop only needs the event loop).
It long-polls the gateway (``GET /agent/v1/files/next``, :mod:`gateway.channel_outputs`), answers
each request from the work dir in a thread, and posts the answer. A request is
``{"id", "path", "maxBytes"}``; the answer is one of::

    {"type": "directory", "path", "entries": [{"name", "type", "size", "mtime"}], "truncated"}
    {"type": "file", "path", "size", "content": <base64>}
    {"error": "not_found" | "refused" | "too_large", "message": "..."}

``path`` is relative to the work dir; the API refuses absolute paths and ``..``, and this side
checks again where the path *really* is (symlinks resolved): nothing outside the work dir is read.
A file larger than ``maxBytes`` is not read (``too_large``, with its size): the API's cap, not the
agent's, bounds the bytes that cross Redis.
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path
from typing import Any

from agent.channel import AgentChannel
from api.store_errors import StoreAuthFailed, StoreUnavailable

#: Entries of one directory listing at most (the rest is cut, ``truncated`` says so).
MAX_ENTRIES = 1000


def answer(work_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request (runs in a thread: it touches the disk)."""
    raw_path = str(request.get("path") or ".")
    max_bytes = int(request.get("maxBytes") or 0)
    root = Path(os.path.realpath(work_dir))
    if raw_path.startswith("/") or ".." in raw_path.split("/"):
        return {"error": "refused", "message": "path must be relative to the work dir, without '..'"}
    real = Path(os.path.realpath(work_dir / raw_path))
    if real != root and root not in real.parents:
        return {"error": "refused", "message": f"{raw_path} is outside the work dir"}
    try:
        info = real.stat()
    except OSError:
        return {"error": "not_found", "message": f"no file or directory {raw_path} in the work dir"}
    if stat.S_ISDIR(info.st_mode):
        return _listing(real, raw_path)
    if not stat.S_ISREG(info.st_mode):
        return {"error": "refused", "message": f"{raw_path} is not a regular file or a directory"}
    if info.st_size > max_bytes:
        message = f"{raw_path} is {info.st_size} bytes, more than the {max_bytes} a live read returns"
        return {"error": "too_large", "message": message, "size": info.st_size}
    with real.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        return {"error": "too_large", "message": f"{raw_path} grew past {max_bytes} bytes", "size": len(data)}
    content = base64.b64encode(data).decode()
    return {"type": "file", "path": raw_path, "size": len(data), "content": content}


def _listing(directory: Path, raw_path: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    truncated = False
    with os.scandir(directory) as scan:
        for entry in sorted(scan, key=lambda e: e.name):
            if len(entries) >= MAX_ENTRIES:
                truncated = True
                break
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            kind = "directory" if stat.S_ISDIR(info.st_mode) else "symlink" if entry.is_symlink() else "file"
            entries.append({"name": entry.name, "type": kind, "size": info.st_size, "mtime": info.st_mtime})
    return {"type": "directory", "path": raw_path, "entries": entries, "truncated": truncated}


async def serve_files(channel: AgentChannel, work_dir: Path, log: Any, *, wait_ms: int) -> None:
    """Answer live-file requests until cancelled (or until the token is refused: the session ended).

    ``wait_ms``: how long one long-poll waits (the agent's ``inbox_block_ms``).
    """
    after = "0-0"
    delay = 0.5
    while True:
        try:
            response = await channel.request(
                "GET",
                "/files/next",
                params={"after": after, "waitMs": wait_ms},
                timeout=channel.timeout + wait_ms / 1000,
            )
            for item in response.json().get("requests", []):
                # Past it whatever happens: a request that cannot be answered is not retried forever.
                after, request = item["streamId"], item["request"]
                try:
                    reply = await asyncio.to_thread(answer, work_dir, request)
                except OSError as exc:
                    reply = {
                        "error": "refused",
                        "message": f"unreadable: {exc.strerror or type(exc).__name__}",
                    }
                body = {"streamId": item["streamId"], "id": str(request.get("id")), "answer": reply}
                await channel.request("POST", "/files/reply", json=body)
            delay = 0.5
        except StoreAuthFailed:
            log.info("files_server_stopped", reason="token refused")
            return
        except StoreUnavailable:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        except Exception as exc:  # a refused request or a bug: keep serving, slowly
            log.warning("files_request_failed", error_type=type(exc).__name__, error=str(exc)[:300])
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
