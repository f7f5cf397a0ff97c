"""Redis Cluster: every store method runs without CROSSSLOT; the cross-slot writes are crash-safe.

Each public method of every store role (and of the transcript store) is called against a real
3-master cluster; a method added later without a call here fails
:func:`test_every_store_method_is_exercised_on_the_cluster`. The ordering tests run on a single
node and on the cluster alike: they stop a write between its steps (by doing only the first step,
exactly as a crash after it would leave things) and check what the readers and the resync see.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import AgentReport, Phase, SessionEvent, SessionSpec, SessionStatus, utcnow
from api.pool_models import PoolSpec, PoolStatus
from api.store_artifacts import ArtifactLimits, Skipped
from api.store_channel import ChannelStore
from api.store_controller import ControllerStore
from api.store_gateway import MeteredUsage
from api.store_pool_claims import PoolMachineRecord
from api.transcripts import RedisTranscriptStore
from tests.store import Store

REDIS_MODES = ("single", "cluster")


@pytest.fixture
async def store(redis_client: aioredis.Redis, redis_url: str) -> AsyncIterator[Store]:
    s = Store.from_url(redis_url)
    yield s
    await s.close()


@pytest.fixture
async def channel(redis_client: aioredis.Redis, redis_url: str) -> AsyncIterator[ChannelStore]:
    c = ChannelStore.connect(redis_url)
    yield c
    await c.close()


def chat() -> SessionSpec:
    return SessionSpec(prompt="p", mode="chat")


#: What the cluster test below calls (``from_url``, ``connect`` and ``close`` by the fixtures).
EXERCISED = {
    "Store": {
        # pools (the API's): exercised on the cluster by tests/api/test_pools.py
        "apply_pool", "create_pool", "get_pool", "list_pools", "mark_pool_deleted", "new_pool",
        "acquire_lease", "acquire_shard", "all_ids", "announce_member", "leave_members",
        "release_shard", "renew_shards", "shard_holders", "all_sessions", "append_event", "apply",
        "clear_launch", "close",
        "count", "create_or_get", "drop_from_index", "from_url", "get", "get_heartbeat", "get_launch",
        "get_launches", "get_many", "heartbeat", "heartbeats", "inbox_ack", "inbox_next",
        "inbox_pending", "inbox_pending_many", "last_change_id", "list", "mark_budget_exceeded",
        "learn_topology", "mark_deleted", "mint_session_token", "new_session", "ping", "pool_stats",
        "read_changes",
        "read_events", "read_events_many", "record_controller_seen", "record_create_failure",
        "record_launch", "record_usage", "release_lease", "remove", "renew_lease",
        "revoke_session_token", "send_message", "server_identity", "transcripts", "update_launch",
        "view", "wake_sessions", "write_agent_report", "write_status",
        "agent_alive", "artifact_bytes", "await_reply", "get_artifact", "list_artifacts", "request_file",
        "clear_volume", "get_volume", "record_volume",
        # pool slots: exercised on the cluster by tests/api/test_store_pool_handoff.py
        "assign_pool_slot", "mint_pool_token", "revoke_pool_token",
        # pool machines and claims (the controller's)
        "all_pools", "claim_pool_machine", "drop_pool_claim", "finish_pool_claim", "forget_pool_machine",
        "mark_pool_machine_ready", "pool_state", "put_pool_machine", "remove_pool", "withdraw_pool_machine",
        "write_pool_status",
        # webhooks and their delivery queue: exercised on the cluster by tests/api/test_webhooks.py
        "put_webhook", "get_webhook", "list_webhooks", "delete_webhook", "deliveries",
        "outbox_entries", "ack_outbox", "webhooks_with_secrets", "enqueue", "claim_deliveries",
        "complete_delivery", "delivery_queue_depth",
    },
    "ChannelStore": {
        "admission", "append_event", "append_events", "close", "connect", "from_url", "get",
        "heartbeat", "inbox_ack", "inbox_next", "inbox_peek", "inbox_read_many", "learn_topology",
        "ping",
        "pool_stats", "transcripts", "write_agent_report",
        "answer_file_request", "file_requests_after", "file_requests_read_many", "put_artifact",
        "record_skipped",
        # pool slots: exercised on the cluster by tests/api/test_store_pool_handoff.py
        "mark_pool_booted", "pool_assignment_wakes", "pool_slot_digest", "take_pool_assignment",
    },
    "RedisTranscriptStore": {
        "append", "copy_transcript", "delete", "find_project_key", "list_session_summaries",
        "list_sessions", "list_subkeys", "load", "project_keys",
    },
}  # fmt: skip


def test_every_store_method_is_exercised_on_the_cluster() -> None:
    for cls in (Store, ChannelStore, RedisTranscriptStore):
        public = {n for n, f in inspect.getmembers(cls) if not n.startswith("_") and callable(f)}
        assert public - {"cluster"} == EXERCISED[cls.__name__], "add the new method to the cluster test"


async def test_every_store_method_runs_on_the_cluster_without_crossslot(
    store: Store, channel: ChannelStore, redis_mode: str
) -> None:
    """On the cluster, a CROSSSLOT (or a keyless command the cluster client cannot route) fails it."""
    assert store.cluster == (redis_mode == "cluster") and await store.ping()
    await store.learn_topology()
    await channel.learn_topology()
    ids = [f"s{i}" for i in range(12)]  # spread over the three masters' slots
    for sid in ids:
        assert (await store.create_or_get(store.new_session(sid, chat()))).result == "created"
    assert (await store.apply(store.new_session("s0", chat(), {"a": "b"}))).result == "configured"
    assert await store.all_ids() == sorted(ids) and await store.count() == 12
    assert {s.id for s in await store.all_sessions()} == set(ids)
    assert len(await store.get_many(ids)) == 12 and await store.get("s1") is not None
    page = await store.list(limit=5)
    assert len(page.sessions) == 5 and page.cursor is not None
    assert len((await store.list(limit=50, cursor=page.cursor)).sessions) == 7

    token, _ = await store.acquire_lease("me", 5_000)
    assert token == 1 and await store.renew_lease("me/1", 5_000)
    assert (
        await store.write_status("s1", SessionStatus(phase=Phase.RUNNING), fence=(keys.LEADER_FENCE, 1))
        == "written"
    )
    assert await store.release_lease("me/1")
    await store.record_controller_seen("me", "{}")

    # Shard leases, each in its own slot, and a status write fenced by a shard's token.
    shard_token, _ = await store.acquire_shard(3, "me", 5_000)
    assert shard_token >= 1 and (await store.acquire_shard(5, "me", 5_000))[0] >= 1
    assert await store.renew_shards({3: f"me/{shard_token}"}, 5_000) == {3: True}
    assert (await store.shard_holders([3, 4]))[3] == f"me/{shard_token}"
    fenced = await store.write_status(
        "s2", SessionStatus(phase=Phase.RUNNING), fence=(keys.shard_fence(3), shard_token)
    )
    assert fenced == "written"
    assert await store.release_shard(3, f"me/{shard_token}")
    assert await store.announce_member("me", 5_000) == ["me"]
    await store.leave_members("me")

    await store.record_volume("s1", {"id": "vol_1", "name": "fs_x", "region": "fra"})
    assert (await store.get_volume("s1"))["id"] == "vol_1"
    await store.clear_volume("s1")
    assert await store.get_volume("s1") == {}

    # A pool's machines, claims and status: every key in the pool's slot, the index apart.
    assert (await store.create_pool(store.new_pool("p1", PoolSpec(size=2)))).pool is not None
    assert [p.name for p in await store.all_pools()] == ["p1"]
    booting = PoolMachineRecord(
        machine_id="pm-1", slot="sl1", state="booting", template="t", created_at=utcnow()
    )
    await store.put_pool_machine("p1", booting)
    await store.mark_pool_machine_ready("p1", booting)
    got = await store.claim_pool_machine("p1", "s1", utcnow())
    assert isinstance(got, tuple) and got[0] == "pm-1"
    await store.finish_pool_claim("p1", "s1", "pm-1", "sl1")
    await store.drop_pool_claim("p1", "s1")
    other = PoolMachineRecord(
        machine_id="pm-2", slot="sl2", state="booting", template="t", created_at=utcnow()
    )
    await store.mark_pool_machine_ready("p1", other)
    assert await store.withdraw_pool_machine("p1", "pm-2")
    await store.forget_pool_machine("p1", "pm-2", "sl2")
    assert (await store.pool_state("p1")).claims == {}
    assert await store.write_pool_status("p1", PoolStatus(ready=1))
    await store.remove_pool("p1", ["sl1", "sl2"])
    assert await store.all_pools() == []

    await store.record_launch("s1", "l-1", {"machineId": "m-1"})
    await store.update_launch("s1", {"region": "ams"})
    assert (await store.get_launch("s1"))["region"] == "ams"
    assert set(await store.get_launches(ids)) == {"s1"}
    await store.record_create_failure("s2", "quota", "no")
    await store.clear_launch("s2")

    await store.heartbeat("s1", "m-1", 30, "running")
    assert (await store.get_heartbeat("s1")) is not None and set(await store.heartbeats(ids)) == {"s1"}
    message = await store.send_message("s3", "hi")
    assert await store.inbox_pending("s3") == 1 and (await store.inbox_pending_many(ids))["s3"] == 1
    nxt = await store.inbox_next("s3", block_ms=100)
    assert nxt is not None and nxt.id == message.id
    await store.inbox_ack("s3", message.id)
    assert await store.inbox_next("s3") is None

    first = await store.append_event("s4", SessionEvent(type="tick"))
    assert [e.id for e in await store.read_events("s4")] == [first]
    other = await store.append_event("s5", SessionEvent(type="tock"))  # another slot, another node
    many = await store.read_events_many({"s4": "0-0", "s5": "0-0", "s6": "0-0"}, block_ms=100)
    assert {sid: [e.id for e in events] for sid, events in many.items()} == {"s4": [first], "s5": [other]}
    assert await store.read_events_many({"s4": first, "s5": other}, block_ms=100) == {}
    assert isinstance(store.pool_stats(), list)
    assert await store.read_events("s4", first, block_ms=50) == []
    last = await store.last_change_id()
    await store.mark_deleted("s5")
    changes = await store.read_changes(last, block_ms=500)
    assert [(c.session_id, c.kind) for c in changes] == [("s5", "deleted")]

    wakes = store.wake_sessions()
    woken = asyncio.ensure_future(anext(wakes))
    for _ in range(100):  # publish until the subscription is in place (pub/sub keeps nothing)
        await store.write_agent_report("s6", AgentReport(state="running"))
        done, _ = await asyncio.wait({woken}, timeout=0.05)
        if done:
            break
    assert woken.result() == "s6"
    await wakes.aclose()

    tr = store.transcripts("s7")
    key = {"project_key": "-w", "session_id": "c1"}
    await tr.append(key, [{"type": "user", "uuid": "u1"}])  # type: ignore[arg-type]
    await tr.append({**key, "subpath": "subagents/a"}, [{"type": "user", "uuid": "u2"}])  # type: ignore[arg-type]
    assert await tr.load(key) == [{"type": "user", "uuid": "u1"}]  # type: ignore[arg-type]
    assert [s["session_id"] for s in await tr.list_sessions("-w")] == ["c1"]
    assert await tr.list_subkeys(key) == ["subagents/a"]  # type: ignore[arg-type]
    assert await tr.project_keys() == ["-w"] and await tr.find_project_key("c1") == "-w"
    assert await tr.copy_transcript("c1", "-w", "-v") == 1
    assert isinstance(await tr.list_session_summaries("-w"), list)
    await tr.delete({"project_key": "-v", "session_id": "c1"})  # type: ignore[arg-type]

    token = await store.mint_session_token("s8")
    admitted = await channel.admission("s8")
    assert admitted is not None
    view = await store.view("s8", ["fs:budget:team:2026-12"])
    assert view is not None
    assert await store.record_usage(
        "s8", MeteredUsage(input_tokens=10, cost_usd=0.01), [("fs:budget:team:2026-12", 60)]
    )
    await store.mark_budget_exceeded("s8", "team")
    assert await store.revoke_session_token("s8") and token is not None
    run_id, _uptime = await store.server_identity()
    assert len(run_id.split(",")) == (3 if store.cluster else 1)  # one run id per node
    await store.remove("s7")
    assert await store.get("s7") is None and "s7" not in await store.all_ids()
    assert await store.drop_from_index(["s10"]) == 0  # alive: put back
    assert "s10" in await store.all_ids()

    # The agent channel's store (the gateway's side of the agents): its reads and writes too.
    await channel.heartbeat("s10", "m-1", 30, "running")
    ids = await channel.append_events("s10", [SessionEvent(type="a"), SessionEvent(type="b")])
    assert len(ids) == 2 and (await channel.get("s10")) is not None
    await store.send_message("s10", "hello")
    await store.send_message("s11", "there")  # another slot
    newest = await channel.inbox_read_many({"s10": "0-0", "s11": "0-0", "s1": "0-0"}, block_ms=100)
    assert set(newest) == {"s10", "s11"}
    acked, message = await channel.inbox_peek("s10")
    assert message is not None and acked == "0-0"
    assert (await channel.inbox_next("s10")) is not None
    await channel.inbox_ack("s10", message.id)
    assert await channel.write_agent_report("s10", AgentReport(state="running"))
    await channel.append_event("s10", SessionEvent(type="c"))
    assert isinstance(channel.transcripts("s10"), RedisTranscriptStore) and await channel.ping()
    assert isinstance(channel.pool_stats(), list)

    # Artifacts (the gateway writes, the API reads) and live-file requests (both halves).
    limits = ArtifactLimits(1 << 20, 1 << 20, 5)
    assert await channel.put_artifact("s10", "a.bin", b"\x00\xff", "0" * 64, "x/y", limits) is None
    await channel.record_skipped("s10", [Skipped("b.bin", "too big", 9)])
    artifact = await store.get_artifact("s10", "a.bin")
    assert artifact is not None and [a.name for a in (await store.list_artifacts("s10"))[0]] == ["a.bin"]
    assert b"".join([c async for c in store.artifact_bytes(artifact)]) == b"\x00\xff"
    assert await store.agent_alive("s10")
    await store.request_file("s10", {"id": "r1", "path": "."})
    await store.request_file("s11", {"id": "r2", "path": "."})  # another slot
    moved = await channel.file_requests_read_many({"s10": "0-0", "s11": "0-0", "s1": "0-0"}, block_ms=100)
    assert set(moved) == {"s10", "s11"}
    [(stream_id, request)] = await channel.file_requests_after("s10", "0-0")
    await channel.answer_file_request("s10", stream_id, request["id"], {"type": "directory"})
    assert await store.await_reply("s10", "r1", 1.0) == {"type": "directory"}
    assert await channel.file_requests_after("s10", "0-0") == []


async def test_a_crash_after_the_index_write_leaves_an_entry_readers_skip_and_the_resync_drops(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.apply(store.new_session("live", chat()))
    await redis_client.zadd(keys.INDEX, {"ghost": 0})  # step 1 of a create, then the crash
    assert [s.id for s in (await store.list()).sessions] == ["live"]
    assert [s.id for s in await store.all_sessions()] == ["live"]  # the controller's resync read
    assert await store.all_ids() == ["live"]


async def test_a_create_racing_a_removal_of_the_same_id_stays_indexed(store: Store) -> None:
    """The removal drops the id after deleting the keys; a create that lands in between re-adds it."""
    await store.apply(store.new_session("again", chat()))
    await store.mark_deleted("again")
    # The removal's script has run; the create of the new session lands before its ZREM.
    await store.remove("again")
    assert (await store.create_or_get(store.new_session("again", chat()))).result == "created"
    await store.drop_from_index(["again"])  # what the removal's ZREM + EXISTS does, once more
    assert await store.all_ids() == ["again"]
    assert [s.id for s in await store.all_sessions()] == ["again"]


async def test_a_stale_fence_token_is_refused_once_a_newer_one_wrote_the_session(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """The per-session guarantee: even with the lease key reading the old token again (a lost
    write of the counter, a stale replica), the session's own hash refuses the older token."""
    await store.apply(store.new_session("f", chat()))
    await redis_client.set("fs:{shard:0}:fence", "8")
    assert (
        await store.write_status("f", SessionStatus(phase=Phase.RUNNING), fence=("fs:{shard:0}:fence", 8))
        == "written"
    )
    await redis_client.set("fs:{shard:0}:fence", "7")
    status = SessionStatus(phase=Phase.FAILED)
    assert await store.write_status("f", status, fence=("fs:{shard:0}:fence", 7)) == "fenced"
    assert (await store.get("f")).status.phase is Phase.RUNNING  # type: ignore[union-attr]


async def test_controller_store_alone_prunes_the_index(redis_url: str, redis_client: aioredis.Redis) -> None:
    controller = ControllerStore.from_url(redis_url)
    try:
        await redis_client.zadd(keys.INDEX, {"a": 0, "b": 0})
        await redis_client.hset(keys.session("b"), mapping={"meta": '{"name":"b"}', "spec": '{"prompt":"p"}'})
        assert await controller.drop_from_index(["a", "b"]) == 1
        assert await controller.all_ids() == ["b"]
    finally:
        await controller.close()
