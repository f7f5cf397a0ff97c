"""The artifact store on one node and on a cluster: byte-exact chunked round trip, caps, replacement,
and removal with the session (the registry holds every artifact key)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import SessionSpec
from api.store_artifacts import CHUNK_BYTES, ArtifactLimits, Skipped
from api.store_channel import ChannelStore
from tests.store import Store

REDIS_MODES = ("single", "cluster")
LIMITS = ArtifactLimits(max_file_bytes=3 * CHUNK_BYTES, max_session_bytes=4 * CHUNK_BYTES, max_files=3)


@pytest.fixture
async def channel_store(redis_client: aioredis.Redis, redis_url: str) -> AsyncIterator[ChannelStore]:
    s = ChannelStore.from_url(redis_url)
    try:
        yield s
    finally:
        await s.close()


async def _session_keys(redis_client: aioredis.Redis, session_id: str) -> list[str]:
    return sorted([k async for k in redis_client.scan_iter(match=keys.session_key_pattern(session_id))])


async def _read(store: Store, session_id: str, name: str) -> bytes:
    artifact = await store.get_artifact(session_id, name)
    assert artifact is not None
    return b"".join([chunk async for chunk in store.artifact_bytes(artifact)])


async def test_artifacts_round_trip_byte_exact_within_caps_and_go_with_the_session(
    store: Store, channel_store: ChannelStore, redis_client: aioredis.Redis
) -> None:
    sid = "art-store"
    await store.create_or_get(store.new_session(sid, SessionSpec(prompt="p")))
    # Every byte value, across chunk boundaries (two full chunks and a tail), and an empty file.
    binary = bytes(range(256)) * (2 * CHUNK_BYTES // 256) + b"\x00\xff\r\n tail"
    put = channel_store.put_artifact
    assert await put(sid, "out/data.bin", binary, hashlib.sha256(binary).hexdigest(), "x/y", LIMITS) is None
    assert await put(sid, "empty", b"", hashlib.sha256(b"").hexdigest(), "text/plain", LIMITS) is None
    assert await _read(store, sid, "out/data.bin") == binary
    assert await _read(store, sid, "empty") == b""

    # Caps: one file over the per-file cap; the session total; the file count. Nothing stored for them.
    big = b"x" * (LIMITS.max_file_bytes + 1)
    assert await put(sid, "big", big, "0" * 64, "x/y", LIMITS) == "file_too_large"
    two_chunks = b"y" * (2 * CHUNK_BYTES)
    assert await put(sid, "more", two_chunks, "0" * 64, "x/y", LIMITS) == "session_bytes"
    assert await put(sid, "small", b"s", "0" * 64, "x/y", LIMITS) is None
    assert await put(sid, "fourth", b"f", "0" * 64, "x/y", LIMITS) == "session_files"
    # Replacing a name counts once: the new bytes replace the old ones, whose data key is deleted.
    old_keys = await _session_keys(redis_client, sid)
    replacement = b"new bytes"
    assert await put(sid, "out/data.bin", replacement, "1" * 64, "x/y", LIMITS) is None
    assert await _read(store, sid, "out/data.bin") == replacement
    await channel_store.record_skipped(sid, [Skipped("big", "too big", len(big))])

    artifacts, skipped = await store.list_artifacts(sid)
    assert [(a.name, a.size) for a in artifacts] == [("empty", 0), ("out/data.bin", 9), ("small", 1)]
    assert [(s.name, s.reason, s.size) for s in skipped] == [("big", "too big", len(big))]
    # Data keys before and after the replacement (the empty file has none): small's stays, the
    # replaced upload's is gone, the new upload's is there.
    old_data = {k for k in old_keys if ":art:d:" in k}
    new_data = {k for k in await _session_keys(redis_client, sid) if ":art:d:" in k}
    assert len(old_data) == len(new_data) == 2 and len(old_data & new_data) == 1

    await store.remove(sid)
    assert await _session_keys(redis_client, sid) == []
    # An upload racing the removal writes nothing.
    assert await put(sid, "late", b"l", "0" * 64, "x/y", LIMITS) == "gone"
    await channel_store.record_skipped(sid, [Skipped("late", "r", None)])
    assert await _session_keys(redis_client, sid) == []
