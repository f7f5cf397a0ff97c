"""Removing a session: every key in one atomic step, no keyspace scan, and its ACL user for sure."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import SessionEvent, SessionSpec
from api.store_base import redis_client as redis_client_for
from api.store_base import redis_url_with_credentials
from api.store_controller import ControllerStore
from tests.redis_nodes import acl_users_per_node, delete_acl_user_everywhere
from tests.store import Store

REDIS_MODES = ("single", "cluster")


@pytest.fixture
async def store(redis_client: aioredis.Redis, redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    yield s  # type: ignore[misc]
    await s.close()


async def seed(store: Store, sid: str) -> None:
    """A session with every kind of key a live session accumulates, and its ACL user."""
    await store.apply(store.new_session(sid, SessionSpec(prompt="p", mode="chat")))
    await store.ensure_session_credentials(sid)
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


async def acl_users(client: aioredis.Redis) -> set[str]:
    """The ACL users, which every node must agree on (ACLs are per node: the store sets them on each)."""
    per_node = await acl_users_per_node(client)
    assert all(users == per_node[0] for users in per_node), per_node
    return per_node[0]


async def scans(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


async def test_remove_takes_every_key_and_the_user_of_the_session_and_nothing_else(
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
    assert keys.acl_user("gone") not in await acl_users(redis_client)
    assert keys.acl_user("kept") in await acl_users(redis_client)
    assert await redis_client.smembers(keys.ACL_PENDING_DELETE) == set()
    assert [c.kind for c in await store.read_changes("0-0") if c.session_id == "gone"][-1] == "removed"


async def test_a_crash_between_the_keys_and_the_user_is_finished_by_the_next_pass(
    store: Store, redis_client: aioredis.Redis, redis_url: str
) -> None:
    await seed(store, "crash")
    # Step one of remove() only, as if the controller died before ACL DELUSER.
    await store.remove_keys("crash")
    assert await session_keys(redis_client, "crash") == set()
    assert keys.acl_user("crash") in await acl_users(redis_client)
    assert await redis_client.smembers(keys.ACL_PENDING_DELETE) == {"crash"}

    # A new controller process (nothing carried over in memory) runs its pass.
    fresh = ControllerStore.from_url(redis_url)
    try:
        assert await fresh.finish_credential_deletions() == ["crash"]
    finally:
        await fresh.close()
    assert keys.acl_user("crash") not in await acl_users(redis_client)
    assert await redis_client.smembers(keys.ACL_PENDING_DELETE) == set()


async def test_credentials_created_again_for_the_id_clear_a_stale_pending_delete(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await seed(store, "again")
    await store.remove_keys("again")
    await store.apply(store.new_session("again", SessionSpec(prompt="p")))
    await store.ensure_session_credentials("again")
    assert await store.finish_credential_deletions() == []
    assert keys.acl_user("again") in await acl_users(redis_client)


async def test_a_hostile_registry_entry_cannot_make_removal_delete_other_keys(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await seed(store, "evil")
    await seed(store, "victim")
    victim_before = await session_keys(redis_client, "victim")
    # The session's own ACL user can write its registry; it names keys that are not its own.
    await redis_client.sadd(keys.session_registry("evil"), keys.session("victim"), keys.INDEX, keys.CHANGES)

    await store.remove("evil")

    assert await session_keys(redis_client, "victim") == victim_before
    assert await store.all_ids() == ["victim"]
    assert await redis_client.exists(keys.CHANGES) == 1


async def test_credentials_lost_with_a_redis_restart_are_restored_with_the_same_password(
    store: Store, redis_client: aioredis.Redis, redis_url: str
) -> None:
    """ACL users live in memory only; the store keeps their password hashes to re-create them.

    Deleting the users by hand is what a restart does to them (the AOF has no ACL commands); a
    session being removed gets no user back.
    """
    await seed(store, "kept")
    await seed(store, "going")
    creds = await store.ensure_session_credentials("kept")
    assert creds is not None
    await store.remove_keys("going")  # removal under way: its user must not come back
    for user in (keys.acl_user("kept"), keys.acl_user("going")):
        await delete_acl_user_everywhere(redis_client, user)

    assert await store.restore_session_credentials() == 1
    for users in await acl_users_per_node(redis_client):  # ACL users are per node: every one
        assert keys.acl_user("kept") in users and keys.acl_user("going") not in users
    agent = redis_client_for(redis_url_with_credentials(redis_url, creds.username, creds.password))
    try:
        assert await agent.exists(keys.session("kept")) == 1  # the machine's password works again
    finally:
        await agent.aclose()
    stored = await redis_client.hget(keys.CREDENTIALS, "kept")
    assert stored is not None and creds.password not in stored, "only a hash is kept"
    await store.delete_session_credentials("kept")
    assert await redis_client.hget(keys.CREDENTIALS, "kept") is None
