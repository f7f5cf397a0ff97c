"""The pool slot handoff in Redis: slot tokens, the booted mark, the assignment taken once, revocation.

The controller's half (:class:`api.store_pool_handoff.PoolHandoff`) and the gateway's half
(:class:`api.store_pool_slots.PoolSlots`) against a real Redis, on one node and on a cluster (every
key of a slot shares the pool's hash tag, so each script stays in one cluster slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from api import keys, pool_token, session_token
from api.session_token import token_digest
from api.store_channel import ChannelStore
from api.store_pool_slots import SlotRevoked
from tests.store import Store

REDIS_MODES = ("single", "cluster")


@pytest.fixture
async def stores(redis_client: aioredis.Redis, redis_url: str) -> AsyncIterator[tuple[Store, ChannelStore]]:
    controller, channel = Store.from_url(redis_url), ChannelStore.connect(redis_url)
    yield controller, channel
    await channel.close()
    await controller.close()


async def test_a_slot_is_minted_assigned_taken_once_and_its_token_then_opens_nothing(
    stores: tuple[Store, ChannelStore], redis_client: aioredis.Redis
) -> None:
    controller, channel = stores
    value = await controller.mint_pool_token("web", "a1b2")
    token = pool_token.parse(value)
    assert token is not None and (token.pool, token.slot) == ("web", "a1b2")
    # Only the digest is stored.
    assert await redis_client.get(keys.pool_slot_token("web", "a1b2")) == token_digest(value)
    assert await channel.pool_slot_digest("web", "a1b2") == token_digest(value)

    assert await channel.mark_pool_booted("web", "a1b2") is True
    assert set(await redis_client.hkeys(keys.pool_booted("web"))) == {"a1b2"}
    assert await channel.take_pool_assignment("web", "a1b2", token_digest(value)) is None

    wakes = channel.pool_assignment_wakes()
    assert await anext(wakes) is None  # subscribed
    try:
        await controller.assign_pool_slot("web", "a1b2", "s1", "fst_s1_secret", {"A": "1"})
        while (wake := await asyncio.wait_for(anext(wakes), 10)) is None:
            pass
        assert wake == ("web", "a1b2")
    finally:
        await wakes.aclose()
    ttl = await redis_client.ttl(keys.pool_assignment("web", "a1b2"))
    assert 0 < ttl <= 300

    with pytest.raises(SlotRevoked):  # a forged or replaced token takes nothing
        await channel.take_pool_assignment("web", "a1b2", token_digest(value + "x"))
    taken = await channel.take_pool_assignment("web", "a1b2", token_digest(value))
    assert taken is not None
    assert (taken.session_id, taken.session_token, taken.env) == ("s1", "fst_s1_secret", {"A": "1"})
    assert "fst_s1_secret" not in repr(taken)
    # Taken once: the assignment is gone and the slot token with it.
    assert (
        await redis_client.exists(keys.pool_assignment("web", "a1b2"), keys.pool_slot_token("web", "a1b2"))
        == 0
    )
    with pytest.raises(SlotRevoked):
        await channel.take_pool_assignment("web", "a1b2", token_digest(value))
    assert await channel.mark_pool_booted("web", "a1b2") is False


async def test_revoking_a_slot_drops_its_token_and_untaken_assignment_and_recreates_no_key(
    stores: tuple[Store, ChannelStore], redis_client: aioredis.Redis
) -> None:
    controller, channel = stores
    first = await controller.mint_pool_token("web", "c3")
    second = await controller.mint_pool_token("web", "c3")  # a re-mint replaces the old token
    with pytest.raises(SlotRevoked):
        await channel.take_pool_assignment("web", "c3", token_digest(first))
    await controller.assign_pool_slot("web", "c3", "s2", "fst_s2_secret", {})
    assert await controller.revoke_pool_token("web", "c3") is True
    assert await controller.revoke_pool_token("web", "c3") is False
    with pytest.raises(SlotRevoked):
        await channel.take_pool_assignment("web", "c3", token_digest(second))
    # A late booted mark of a revoked slot writes nothing: no key of the pool is left behind.
    assert await channel.mark_pool_booted("web", "c3") is False
    assert [k async for k in redis_client.scan_iter(match=keys.pool_key_pattern("web"))] == []


def test_a_pool_token_is_not_a_session_token_and_hides_its_secret() -> None:
    token = pool_token.mint("web", "a1b2")
    assert token.value.startswith("fpt_web_a1b2_") and token.value not in repr(token)
    assert pool_token.parse(token.value) == token
    assert session_token.parse(token.value) is None
    for bad in (
        "fpt_web_a1b2",
        "fpt_Web_a1b2_" + "0" * 64,
        "fpt_web_a_b_" + "0" * 64,
        "fpt_web_a1_" + "g" * 64,
    ):
        assert pool_token.parse(bad) is None
    with pytest.raises(ValueError):
        pool_token.mint("web", "a_b")
