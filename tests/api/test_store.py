"""The store against a real redis-server: atomicity, generations, status rules, paging, streams."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import AgentReport, Phase, SessionEvent, SessionSpec, SessionStatus
from api.selector import parse_selector
from api.store import InvalidCursor, decode_cursor
from api.store_base import StoreUnavailable
from tests.store import Store

REDIS_MODES = ("single", "cluster")


@pytest.fixture
async def store(redis_client: aioredis.Redis, redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    yield s  # type: ignore[misc]
    await s.close()


def task(prompt: str = "do it", **kw: object) -> SessionSpec:
    return SessionSpec.model_validate({"prompt": prompt, **kw})


async def test_fifty_racing_creates_of_one_id_yield_one_session(
    store: Store, redis_client: aioredis.Redis, redis_url: str
) -> None:
    # Ten API processes' worth of connections, five racing creates on each: the race is the same as
    # with fifty clients, without fifty Redis Cluster discoveries at once on a loaded machine.
    clients = [Store.from_url(redis_url) for _ in range(10)]
    for client in clients:
        await client.learn_topology()  # a serving API process has learnt the topology before the race

    async def create(i: int) -> str:
        own = clients[i % len(clients)]
        outcome = await own.create_or_get(own.new_session("race", task(f"prompt {i}")))
        return outcome.result

    try:
        async with asyncio.TaskGroup() as group:
            racing = [group.create_task(create(i)) for i in range(50)]
    finally:
        for client in clients:
            await client.close()
    results = [t.result() for t in racing]
    assert results.count("created") == 1
    assert results.count("exists") == 49
    assert await redis_client.zcard(keys.INDEX) == 1
    stored = await store.get("race")
    assert stored is not None and stored.metadata.generation == 1
    changes = await store.read_changes("0-0")
    assert [c.kind for c in changes] == ["created"]


async def test_generation_moves_only_when_the_spec_really_changes(store: Store) -> None:
    first = await store.apply(store.new_session("gen", task("a", machine={"env": {"A": "1", "B": "2"}})))
    assert first.result == "created" and first.session and first.session.metadata.generation == 1
    # Same spec with map keys in another order: unchanged.
    same = await store.apply(store.new_session("gen", task("a", machine={"env": {"B": "2", "A": "1"}})))
    assert same.result == "unchanged" and same.session and same.session.metadata.generation == 1
    # Labels change: configured, but the generation stays (it tracks the spec only).
    relabeled = await store.apply(
        store.new_session("gen", task("a", machine={"env": {"A": "1", "B": "2"}}), labels={"team": "ios"})
    )
    assert relabeled.result == "configured" and relabeled.session
    assert relabeled.session.metadata.generation == 1 and relabeled.session.metadata.labels == {"team": "ios"}
    changed = await store.apply(store.new_session("gen", task("b"), labels={"team": "ios"}))
    assert changed.result == "configured" and changed.session and changed.session.metadata.generation == 2
    assert changed.session.spec.prompt == "b"


async def test_status_and_agent_writes_never_clobber_the_spec(store: Store) -> None:
    await store.apply(store.new_session("sep", task("keep me")))
    await asyncio.gather(
        store.write_status("sep", SessionStatus(phase=Phase.RUNNING, machineId="m1")),
        store.write_agent_report("sep", AgentReport(state="running", turns=3)),
        store.apply(store.new_session("sep", task("keep me"))),
    )
    got = await store.get("sep")
    assert got is not None
    assert got.spec.prompt == "keep me"
    assert got.status.phase is Phase.RUNNING and got.status.machineId == "m1"
    assert got.agent is not None and got.agent.turns == 3


async def test_a_finished_session_never_flips_back_to_a_live_phase(store: Store) -> None:
    await store.apply(store.new_session("fin", task()))
    assert await store.write_status("fin", SessionStatus(phase=Phase.SUCCEEDED)) == "written"
    assert await store.write_status("fin", SessionStatus(phase=Phase.RUNNING)) == "refused"
    assert await store.write_status("fin", SessionStatus(phase=Phase.FAILED)) == "refused"
    got = await store.get("fin")
    assert got is not None and got.status.phase is Phase.SUCCEEDED


async def test_agent_report_of_done_is_never_shown_as_running(store: Store) -> None:
    await store.apply(store.new_session("done", task()))
    await store.write_status("done", SessionStatus(phase=Phase.RUNNING))
    await store.write_agent_report("done", AgentReport(state="done", resultText="ok"))
    got = await store.get("done")
    assert got is not None and got.effective_phase() is Phase.SUCCEEDED


async def test_status_write_does_not_resurrect_a_removed_session(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.apply(store.new_session("gone", task()))
    await store.remove("gone")
    assert await store.write_status("gone", SessionStatus(phase=Phase.RUNNING)) == "missing"
    assert not await store.write_agent_report("gone", AgentReport(state="running"))
    assert await redis_client.exists(keys.session("gone")) == 0


async def test_fenced_status_write_is_refused_after_leadership_moves(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.apply(store.new_session("fence", task()))
    await redis_client.set("fence-key", "7")
    assert (
        await store.write_status("fence", SessionStatus(phase=Phase.RUNNING), fence=("fence-key", 7))
        == "written"
    )
    await redis_client.set("fence-key", "8")
    assert (
        await store.write_status("fence", SessionStatus(phase=Phase.FAILED), fence=("fence-key", 7))
        == "fenced"
    )


async def test_delete_sets_deletion_timestamp_and_appends_change(store: Store) -> None:
    await store.apply(store.new_session("del", task()))
    marked = await store.mark_deleted("del")
    assert marked is not None and marked.metadata.deletionTimestamp is not None
    again = await store.apply(store.new_session("del", task("other")))
    assert again.result == "deleting"
    kinds = [c.kind for c in await store.read_changes("0-0")]
    assert kinds == ["created", "deleted"]
    assert await store.mark_deleted("nope") is None


async def test_change_feed_resumes_from_last_seen_id(store: Store) -> None:
    for i in range(5):
        await store.apply(store.new_session(f"c{i}", task()))
    first = await store.read_changes("0-0", count=2)
    assert [c.session_id for c in first] == ["c0", "c1"]
    rest = await store.read_changes(first[-1].entry_id)
    assert [c.session_id for c in rest] == ["c2", "c3", "c4"]
    assert await store.last_change_id() == rest[-1].entry_id


async def test_list_filters_by_selector_and_phase_and_pages_with_a_cursor(store: Store) -> None:
    for i in range(12):
        labels = {"team": "ios" if i % 2 == 0 else "web", "tier": "free" if i % 3 == 0 else "pro"}
        await store.apply(store.new_session(f"l{i:02d}", task(), labels=labels))
    await store.write_status("l02", SessionStatus(phase=Phase.RUNNING))
    selector = parse_selector("team=ios,tier!=free")
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list(selector=selector, limit=2, cursor=cursor)
        seen += [s.id for s in page.sessions]
        if page.cursor is None:
            break
        cursor = page.cursor
    assert seen == ["l02", "l04", "l08", "l10"]
    running = await store.list(phase=Phase.RUNNING)
    assert [s.id for s in running.sessions] == ["l02"]


async def test_bad_cursor_is_rejected(store: Store) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor("!!!not-a-cursor")
    with pytest.raises(InvalidCursor):
        await store.list(cursor="Zm9v")


async def test_heartbeat_expires_with_its_ttl(store: Store, redis_client: aioredis.Redis) -> None:
    await store.apply(store.new_session("hb", task()))
    await store.heartbeat("hb", "m1", 1, "running")
    beat = await store.get_heartbeat("hb")
    assert beat is not None and beat.machineId == "m1"
    assert 0 < await redis_client.pttl(keys.heartbeat("hb")) <= 1000
    for _ in range(100):
        if await store.get_heartbeat("hb") is None:
            break
        await asyncio.sleep(0.05)
    assert await store.get_heartbeat("hb") is None
    assert await store.heartbeats(["hb"]) == {}


async def test_event_stream_is_capped_and_replayable_from_an_id(redis_client: aioredis.Redis) -> None:
    small = Store(redis_client, events_maxlen=10)
    ids = [await small.append_event("ev", SessionEvent(type="tick", data={"i": i})) for i in range(200)]
    everything = await small.read_events("ev", count=1000)
    assert len(everything) < 200  # capped (approximately, as Redis trims whole nodes)
    after = await small.read_events("ev", ids[-3])
    assert [e.event.data["i"] for e in after] == [198, 199]


async def test_inbox_replays_unacked_message_until_acked(store: Store) -> None:
    await store.apply(store.new_session("chat", task(mode="chat")))
    m1 = await store.send_message("chat", "one")
    m2 = await store.send_message("chat", "two")
    assert await store.inbox_pending("chat") == 2
    first = await store.inbox_next("chat")
    again = await store.inbox_next("chat")
    assert first is not None and again is not None and first.id == again.id == m1.id
    await store.inbox_ack("chat", m1.id)
    nxt = await store.inbox_next("chat")
    assert nxt is not None and nxt.id == m2.id and nxt.text == "two"
    await store.inbox_ack("chat", m2.id)
    assert await store.inbox_pending("chat") == 0
    assert await store.inbox_pending_many(["chat"]) == {"chat": 0}
    assert await store.inbox_next("chat", block_ms=50) is None


async def test_unreachable_redis_raises_store_unavailable() -> None:
    from local.redis_server import free_port

    dead = Store.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StoreUnavailable):
            await dead.get("x")
    finally:
        await dead.close()


async def test_apply_refuses_mode_change_and_finished_spec_change_atomically(store: Store) -> None:
    await store.apply(store.new_session("imm", task("a")))
    changed_mode = await store.apply(store.new_session("imm", task("a", mode="chat")))
    assert changed_mode.result == "mode_conflict"
    await store.write_status("imm", SessionStatus(phase=Phase.SUCCEEDED))
    finished = await store.apply(store.new_session("imm", task("b")))
    assert finished.result == "finished"
    got = await store.get("imm")
    assert got is not None and got.spec.prompt == "a" and got.spec.mode == "task"
    assert got.metadata.generation == 1
    # Re-applying the identical spec of a finished session is still fine.
    assert (await store.apply(store.new_session("imm", task("a")))).result == "unchanged"


async def test_created_session_returned_equals_what_a_read_returns(store: Store) -> None:
    outcome = await store.create_or_get(
        store.new_session("same", task(machine={"env": {"B": "1", "A": "2"}}))
    )
    assert outcome.result == "created" and outcome.session is not None
    assert outcome.session == await store.get("same")
