"""The agent channel (``/agent/v1``): an agent's only way to its session's state, by its token.

A real gateway over the suite's real Redis; the client is the agent's own :class:`AgentChannel`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.testing import run_session_store_conformance

from agent.channel import AgentChannel
from agent.channel_transcripts import ChannelTranscripts
from api import keys
from api.models import AgentReport, Phase, SessionEvent, SessionStatus
from api.store_channel import CHANNEL_BLOCKING_POOL_SIZE, CHANNEL_POOL_SIZE
from api.store_errors import StoreAuthFailed, StoreUnavailable
from tests.gateway.conftest import GatewayRig, GatewayServer

_ids = itertools.count()


@pytest.fixture
def gateway(rig: GatewayRig) -> GatewayServer:
    return rig.gateway()


@pytest.fixture
async def channels(gateway: GatewayServer) -> AsyncIterator[list[AgentChannel]]:
    """Channels made by a test, closed at its end."""
    made: list[AgentChannel] = []
    yield made
    for channel in made:
        await channel.close()


async def open_channel(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel], session_id: str, **spec: Any
) -> AgentChannel:
    _, token = await rig.session(session_id, **spec)
    channel = AgentChannel(gateway.url, token.value, session_id, timeout=10)
    channels.append(channel)
    return channel


# -- authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-api-key": "sk-ant-not-a-session-token"}, {"x-api-key": "fst_s-1_" + "00" * 32}],
    ids=["missing", "malformed", "wrong-secret"],
)
async def test_a_request_without_a_valid_token_is_refused_with_401(
    rig: GatewayRig, gateway: GatewayServer, http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    await rig.session("s-1")
    response = await http.get(gateway.url + "/agent/v1/session", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


async def test_a_revoked_token_is_refused(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel]
) -> None:
    channel = await open_channel(rig, gateway, channels, "s-rev")
    assert (await channel.get("s-rev")) is not None
    await rig.store.revoke_session_token("s-rev")
    with pytest.raises(StoreAuthFailed):
        await channel.heartbeat("s-rev", "m-1", 10, "running")
    assert await rig.store._redis.get(keys.heartbeat("s-rev")) is None


async def test_a_new_launch_token_replaces_the_old_one(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel]
) -> None:
    old = await open_channel(rig, gateway, channels, "s-new")
    new_token = await rig.store.mint_session_token("s-new")
    new = AgentChannel(gateway.url, new_token.value, "s-new")
    channels.append(new)
    await new.heartbeat("s-new", "m-2", 10, "running")
    with pytest.raises(StoreAuthFailed):
        await old.heartbeat("s-new", "m-1", 10, "running")


async def test_a_deleted_session_reads_as_gone_and_refuses_writes(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel]
) -> None:
    channel = await open_channel(rig, gateway, channels, "s-del")
    await rig.store.mark_deleted("s-del")
    assert await channel.get("s-del") is None
    with pytest.raises(StoreAuthFailed):
        await channel.write_agent_report("s-del", AgentReport(state="running"))


async def test_a_session_the_controller_finished_refuses_its_token_but_a_final_report_does_not(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel]
) -> None:
    channel = await open_channel(rig, gateway, channels, "s-fin")
    # The agent's own final report does not shut its channel: its last events and beat follow it.
    assert await channel.write_agent_report("s-fin", AgentReport(state="done", resultText="ok"))
    await channel.append_event("s-fin", SessionEvent(type="agent_finished", source="agent"))
    # The controller finishing the session does.
    await rig.store.write_status("s-fin", SessionStatus(phase=Phase.SUCCEEDED))
    with pytest.raises(StoreAuthFailed):
        await channel.append_event("s-fin", SessionEvent(type="late", source="agent"))


# -- scoping ----------------------------------------------------------------------------------------


async def test_the_token_decides_the_session_whatever_the_agent_names(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel], http: httpx.AsyncClient
) -> None:
    mine = await open_channel(rig, gateway, channels, "mine")
    await rig.session("theirs", prompt="secret plans of theirs")
    await mine.heartbeat("mine", "m-1", 10, "running")
    await mine.write_agent_report("mine", AgentReport(state="running"))
    await mine.append_event("mine", SessionEvent(type="hello", source="agent"))
    # No route takes a session id: naming the other session goes nowhere.
    token = mine._client.headers["x-api-key"]
    for path in ("/agent/v1/sessions/theirs", "/agent/v1/session?id=theirs", "/agent/v1/theirs/session"):
        response = await http.get(gateway.url + path, headers={"x-api-key": token})
        assert "secret plans" not in response.text
        if "?" not in path:
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        else:  # the query is ignored: the token's own session
            assert response.status_code == 200 and response.json()["metadata"]["name"] == "mine"
    theirs = await rig.store.get("theirs")
    assert theirs is not None and theirs.agent is None
    assert await rig.store.read_events("theirs") == []
    assert await rig.store._redis.get(keys.heartbeat("theirs")) is None
    # And the client refuses to even try.
    with pytest.raises(ValueError):
        await mine.heartbeat("theirs", "m-1", 10, "running")


async def test_an_agent_cannot_forge_events_of_the_controller(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel], http: httpx.AsyncClient
) -> None:
    channel = await open_channel(rig, gateway, channels, "s-forge")
    body = {"events": [{"type": "phase_changed", "source": "controller"}]}
    response = await channel._client.post("/agent/v1/events", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "events.0.source"
    assert await rig.store.read_events("s-forge") == []


async def test_a_malformed_ack_names_the_field(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel]
) -> None:
    channel = await open_channel(rig, gateway, channels, "s-ack")
    response = await channel._client.post("/agent/v1/inbox/ack", json={"id": "not-an-id"})
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "id"


# -- state ------------------------------------------------------------------------------------------


async def test_events_are_appended_in_order_in_one_batch(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel]
) -> None:
    channel = await open_channel(rig, gateway, channels, "s-ev")
    events = [SessionEvent(type=f"e{i}", source="agent", data={"i": i}) for i in range(50)]
    ids = await channel.append_events("s-ev", events)
    stored = await rig.store.read_events("s-ev", count=100)
    assert [s.id for s in stored] == ids
    assert [s.event.type for s in stored] == [f"e{i}" for i in range(50)]


async def test_heartbeat_and_report_land_in_the_session(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel]
) -> None:
    channel = await open_channel(rig, gateway, channels, "s-hb")
    await channel.heartbeat("s-hb", "m-7", 12, "idle")
    beat = (await rig.store.heartbeats(["s-hb"])).get("s-hb")
    assert beat is not None and (beat.machineId, beat.state, beat.ttlSeconds) == ("m-7", "idle", 12)
    assert 0 < await rig.store._redis.ttl(keys.heartbeat("s-hb")) <= 12
    assert await channel.write_agent_report("s-hb", AgentReport(state="idle", turns=3))
    session = await rig.store.get("s-hb")
    assert session is not None and session.agent is not None and session.agent.turns == 3


# -- the inbox --------------------------------------------------------------------------------------


async def test_the_long_poll_returns_a_message_sent_while_waiting_and_repeats_it_until_acked(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel]
) -> None:
    channel = await open_channel(rig, gateway, channels, "c-1", mode="chat")
    assert await channel.inbox_next("c-1") is None
    waiting = asyncio.create_task(channel.inbox_next("c-1", block_ms=20_000))
    await asyncio.sleep(0.2)  # let it reach the hub (the result does not depend on it)
    sent = await rig.store.send_message("c-1", "hello")
    got = await asyncio.wait_for(waiting, 10)
    assert got is not None and (got.id, got.text) == (sent.id, "hello")
    again = await channel.inbox_next("c-1", block_ms=100)
    assert again is not None and again.id == sent.id
    second = await rig.store.send_message("c-1", "second")
    await channel.inbox_ack("c-1", sent.id)
    nxt = await channel.inbox_next("c-1", block_ms=100)
    assert nxt is not None and nxt.id == second.id
    await channel.inbox_ack("c-1", second.id)
    assert await channel.inbox_next("c-1", block_ms=50) is None


async def test_hundreds_of_waiting_agents_share_one_redis_reader(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel], redis_client: aioredis.Redis
) -> None:
    count = 200
    waiters = [await open_channel(rig, gateway, channels, f"w-{i}", mode="chat") for i in range(count)]
    before = len(await redis_client.client_list())
    tasks = [asyncio.create_task(w.inbox_next(f"w-{i}", block_ms=20_000)) for i, w in enumerate(waiters)]

    async def blocked_readers() -> int:
        clients = await redis_client.client_list()
        return sum(1 for c in clients if c.get("cmd") == "xread")

    deadline = asyncio.get_running_loop().time() + 10
    while await blocked_readers() == 0:
        assert asyncio.get_running_loop().time() < deadline, "nobody waits on the inbox"
        await asyncio.sleep(0.05)
    # All 200 wait, on one blocking read (a connection each would be 200 more clients); the
    # requests' own reads share the channel's bounded pool.
    assert await blocked_readers() == 1
    # Bounded by the channel store's pools (plus the gateway's own store, one connection at rest).
    bound = CHANNEL_POOL_SIZE + CHANNEL_BLOCKING_POOL_SIZE + 1
    assert len(await redis_client.client_list()) - before <= bound
    assert not any(t.done() for t in tasks)
    sent = await rig.store.send_message("w-123", "you")
    got = await asyncio.wait_for(tasks[123], 10)
    assert got is not None and got.id == sent.id
    assert not any(t.done() for i, t in enumerate(tasks) if i != 123)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- transcripts ------------------------------------------------------------------------------------


async def test_transcripts_pass_the_sdk_session_store_conformance_suite_over_http(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel], redis_client: aioredis.Redis
) -> None:
    stores: list[ChannelTranscripts] = []

    async def fresh_session() -> ChannelTranscripts:
        sid = f"conf-{next(_ids)}"
        channel = await open_channel(rig, gateway, channels, sid)
        return channel.transcripts(sid, fold=fold_session_summary)

    # The suite's factory is synchronous: sessions (and tokens) are made ahead, one per contract.
    for _ in range(40):
        stores.append(await fresh_session())
    pool = iter(stores)
    await run_session_store_conformance(lambda: next(pool))  # type: ignore[arg-type,return-value]
    written = [k async for k in redis_client.scan_iter(match="fs:{conf-*}:tr:*")]
    assert written


async def test_concurrent_writers_keep_one_summary_of_every_entry(
    rig: GatewayRig, gateway: GatewayServer, channels: list[AgentChannel]
) -> None:
    one = await open_channel(rig, gateway, channels, "s-tr")
    two = AgentChannel(gateway.url, one._client.headers["x-api-key"], "s-tr")
    channels.append(two)
    a, b = (
        one.transcripts("s-tr", fold=fold_session_summary),
        two.transcripts("s-tr", fold=fold_session_summary),
    )
    key: Any = {"project_key": "-work", "session_id": "claude-1"}
    entries = [
        {
            "type": "user",
            "uuid": f"u{i}",
            "timestamp": f"2026-01-01T00:00:{i:02d}Z",
            "message": {"role": "user", "content": f"prompt {i}"},
        }
        for i in range(6)
    ]
    # Writers alternate, each from a stale summary: every append after the first conflicts once.
    for i, entry in enumerate(entries):
        await (a if i % 2 == 0 else b).append(key, [entry])
    await a.append(key, entries[:2])  # a retried batch: nothing new, nothing folded twice
    assert await a.load(key) == entries
    expected = None
    for entry in entries:
        expected = fold_session_summary(expected, key, [entry])
    [summary] = await a.list_session_summaries("-work")
    assert summary["data"] == json.loads(json.dumps(expected))["data"]


# -- outages ----------------------------------------------------------------------------------------


async def test_an_unreachable_redis_is_a_503_the_agent_retries(
    rig: GatewayRig, channels: list[AgentChannel]
) -> None:
    _, token = await rig.session("s-down")
    dead = rig.gateway(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.5)
    channel = AgentChannel(dead.url, token.value, "s-down", timeout=5)
    channels.append(channel)
    with pytest.raises(StoreUnavailable) as caught:
        await channel.heartbeat("s-down", "m-1", 10, "running")
    assert not isinstance(caught.value, StoreAuthFailed)
    assert "503" in str(caught.value)


async def test_an_unreachable_control_plane_is_store_unavailable(channels: list[AgentChannel]) -> None:
    channel = AgentChannel("http://127.0.0.1:1", "fst_x_" + "00" * 32, "x", timeout=1)
    channels.append(channel)
    with pytest.raises(StoreUnavailable):
        await channel.inbox_next("x", block_ms=10)
