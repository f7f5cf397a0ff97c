"""The agent channel's pool routes: a slot token opens its own slot's booted mark and assignment only.

A real gateway over the suite's real Redis; the controller's side is the real store
(:class:`api.store_pool_handoff.PoolHandoff`), the agent's side plain HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from api import keys
from tests.gateway.conftest import GatewayRig, GatewayServer, agent_headers, messages_body

POOL = "/agent/v1/pool"


@pytest.fixture
def gateway(rig: GatewayRig) -> GatewayServer:
    return rig.gateway()


async def test_a_slot_token_opens_only_its_pool_routes_and_a_session_token_none_of_them(
    rig: GatewayRig, gateway: GatewayServer, http: httpx.AsyncClient
) -> None:
    _, session_token = await rig.session("s-pool-scope")
    slot_token = await rig.store.mint_pool_token("web", "a1")
    slot = {"x-api-key": slot_token}

    # The slot token on every session route and on the model proxy: 401, nothing served or written.
    for method, path in [
        ("GET", "/agent/v1/session"),
        ("PUT", "/agent/v1/heartbeat"),
        ("GET", "/agent/v1/inbox/next"),
        ("GET", "/agent/v1/transcripts/projects"),
    ]:
        response = await http.request(method, gateway.url + path, headers=slot, json={})
        assert response.status_code == 401, path
    proxied = await http.post(
        gateway.url + "/v1/messages", headers=agent_headers(slot_token), json=messages_body()
    )
    assert proxied.status_code == 401

    # A session token, a forged slot token, no token: 401 on the pool routes.
    forged = slot_token[:-4] + ("0000" if not slot_token.endswith("0000") else "1111")
    for headers in ({"x-api-key": session_token.value}, {"x-api-key": forged}, {}):
        for method, path in [("POST", POOL + "/booted"), ("GET", POOL + "/assignment")]:
            response = await http.request(method, gateway.url + path, headers=headers)
            assert response.status_code == 401, (path, headers.keys())
            assert response.json()["error"]["code"] == "unauthorized"
    assert await rig.store._redis.exists(keys.pool_booted("web")) == 0

    # Its own routes: booted is recorded for its slot; a bad waitMs names the field.
    booted = await http.post(
        gateway.url + POOL + "/booted", headers={"authorization": f"Bearer {slot_token}"}
    )
    assert booted.status_code == 204
    assert set(await rig.store._redis.hkeys(keys.pool_booted("web"))) == {"a1"}
    bad = await http.get(gateway.url + POOL + "/assignment", params={"waitMs": 999_999}, headers=slot)
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "waitMs"


async def test_the_long_poll_ends_at_its_timeout_wakes_on_assignment_and_the_assignment_is_taken_once(
    rig: GatewayRig, gateway: GatewayServer, http: httpx.AsyncClient
) -> None:
    slot_token = await rig.store.mint_pool_token("web", "b2")
    slot = {"x-api-key": slot_token}
    url = gateway.url + POOL + "/assignment"

    # Nothing assigned: 204 at once, and 204 when a short wait runs out.
    assert (await http.get(url, headers=slot)).status_code == 204
    assert (await http.get(url, params={"waitMs": 50}, headers=slot)).status_code == 204

    # A long wait ends (204: look again) as soon as the slot is assigned, far before its 30 s.
    waiting = asyncio.create_task(http.get(url, params={"waitMs": 30_000}, headers=slot))
    await _until_waiting(rig, gateway)
    await rig.store.assign_pool_slot("web", "b2", "s-claim", "fst_s-claim_" + "ab" * 32, {"TASK": "x"})
    woken = await asyncio.wait_for(waiting, 15)
    # 204 (look again) when it was already waiting; 200 if the assignment beat its first look.
    assert woken.status_code in (200, 204)

    # The agent asks again: the assignment, once; then its slot token is spent.
    got = woken if woken.status_code == 200 else await http.get(url, params={"waitMs": 30_000}, headers=slot)
    assert got.status_code == 200
    assert got.json() == {
        "sessionId": "s-claim",
        "sessionToken": "fst_s-claim_" + "ab" * 32,
        "env": {"TASK": "x"},
    }
    assert got.headers["cache-control"] == "no-store"
    again = await http.get(url, headers=slot)
    assert again.status_code == 401
    assert (
        await rig.store._redis.exists(keys.pool_assignment("web", "b2"), keys.pool_slot_token("web", "b2"))
        == 0
    )


async def test_a_waiter_that_hangs_up_is_let_go(rig: GatewayRig, gateway: GatewayServer) -> None:
    slot_token = await rig.store.mint_pool_token("web", "c3")
    async with httpx.AsyncClient(timeout=40) as agent:
        waiting = asyncio.create_task(
            agent.get(
                gateway.url + POOL + "/assignment",
                params={"waitMs": 30_000},
                headers={"x-api-key": slot_token},
            )
        )
        await _until_waiting(rig, gateway)
        waiting.cancel()  # the machine is destroyed: its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    # The request ends with the connection, long before its 30 s: nobody waits, the subscription goes.
    await _until_waiting(rig, gateway, subscriptions=0)


async def _until_waiting(rig: GatewayRig, gateway: GatewayServer, subscriptions: int = 1) -> None:
    """Until the gateway's hub holds (or no longer holds) its subscription (Redis counts it)."""
    deadline = asyncio.get_running_loop().time() + 15
    while await rig.store._redis.pubsub_numpat() != subscriptions:
        assert asyncio.get_running_loop().time() < deadline, (
            f"pattern subscriptions never became {subscriptions}"
        )
        await asyncio.sleep(0.02)
