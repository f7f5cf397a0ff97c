"""Removing a session: every key (its token included) in one atomic step, no keyspace scan."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import SessionEvent, SessionSpec
from tests.store import Store

REDIS_MODES = ("single", "cluster")


@pytest.fixture
async def store(redis_client: aioredis.Redis, redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    yield s  # type: ignore[misc]
    await s.close()


async def seed(store: Store, sid: str) -> None:
    """A session with every kind of key a live session accumulates, its token included."""
    await store.apply(store.new_session(sid, SessionSpec(prompt="p", mode="chat")))
    await store.mint_session_token(sid)
    await store.record_launch(sid, f"l-{sid}")
    await store.heartbeat(sid, "m-1", 60, "running")
    await store.append_event(sid, SessionEvent(type="tick"))
    message = await store.send_message(sid, "hi")
    await store.inbox_ack(sid, message.id)
    transcripts = store.transcripts(sid)
    await transcripts.append({"project_key": "-w", "session_id": "c1"}, [{"type": "user", "uuid": "u1"}])
    await transcripts.append(
        {"project_key": "-w", "session_id": "c1", "subpath": "subagents/a"}, [{"type": "user", "uuid": "u2"}]
    )


async def session_keys(client: aioredis.Redis, sid: str) -> set[str]:
    return {str(k) async for k in client.scan_iter(match=keys.session_key_pattern(sid))}


async def scans(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


async def test_remove_takes_every_key_of_the_session_and_nothing_else(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await seed(store, "gone")
    await seed(store, "kept")
    kept_before = await session_keys(redis_client, "kept")
    assert len(await session_keys(redis_client, "gone")) >= 10  # fixed keys, transcripts, registry
    scans_before = await scans(redis_client)

    await store.remove("gone")

    assert await scans(redis_client) == scans_before  # the registry, not a keyspace SCAN
    assert await session_keys(redis_client, "gone") == set()
    assert await session_keys(redis_client, "kept") == kept_before
    assert await store.all_ids() == ["kept"]
    assert await redis_client.exists(keys.session_token("gone")) == 0
    assert await redis_client.exists(keys.session_token("kept")) == 1
    assert [c.kind for c in await store.read_changes("0-0") if c.session_id == "gone"][-1] == "removed"


async def test_a_hostile_registry_entry_cannot_make_removal_delete_other_keys(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await seed(store, "evil")
    await seed(store, "victim")
    victim_before = await session_keys(redis_client, "victim")
    # A registry entry naming keys that are not the session's own (a bug, or a hostile writer).
    await redis_client.sadd(keys.session_registry("evil"), keys.session("victim"), keys.INDEX, keys.CHANGES)

    await store.remove("evil")

    assert await session_keys(redis_client, "victim") == victim_before
    assert await store.all_ids() == ["victim"]
    assert await redis_client.exists(keys.CHANGES) == 1
