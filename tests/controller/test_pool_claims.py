"""The claim script on a real Redis: every ready machine serves one session at most, under races."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import redis.asyncio as aioredis

from api import keys
from api.models import utcnow
from api.store_controller import PoolMachineRecord
from tests.store import Store


def ready_record(mid: str) -> PoolMachineRecord:
    return PoolMachineRecord(machine_id=mid, slot=f"s{mid}", state="ready", template="t", created_at=utcnow())


async def test_racing_claims_hand_each_machine_to_one_session_and_repeat_claims_get_the_same(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    stores = [Store.from_url(redis_url) for _ in range(3)]  # three controllers' connections
    try:
        for mid in ("m1", "m2", "m3", "m4", "m5"):
            await stores[0].mark_pool_machine_ready("warm", ready_record(mid))
        now = utcnow()
        sessions = [f"s{i}" for i in range(12)]
        results = await asyncio.gather(
            *(stores[i % 3].claim_pool_machine("warm", sid, now) for i, sid in enumerate(sessions))
        )
        won = {sid: r[0] for sid, r in zip(sessions, results, strict=True) if isinstance(r, tuple)}
        assert len(won) == 5 and sorted(won.values()) == ["m1", "m2", "m3", "m4", "m5"]
        assert [r for r in results if not isinstance(r, tuple)] == [None] * 7
        state = await stores[0].pool_state("warm")
        assert state.ready == frozenset() and state.claims == won
        assert all(
            state.records[m].state == "claimed" and state.records[m].session == s for s, m in won.items()
        )
        # A controller that died mid-claim and comes back for the same session gets the same machine.
        winner, machine = next(iter(won.items()))
        again = await stores[1].claim_pool_machine("warm", winner, now + timedelta(seconds=1))
        assert isinstance(again, tuple) and again[0] == machine
        # Handed over: the machine is the session's, the pool forgets it.
        await stores[0].finish_pool_claim("warm", winner, machine, f"s{machine}")
        state = await stores[0].pool_state("warm")
        assert winner not in state.claims and machine not in state.records
    finally:
        for store in stores:
            await store.close()


async def test_a_claim_from_an_older_shard_term_is_fenced_and_a_withdrawn_machine_is_never_claimed(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    store = Store.from_url(redis_url)
    try:
        fence_key = keys.shard_fence(0)
        await redis_client.set(fence_key, "2")
        for mid in ("m1", "m2"):
            await store.mark_pool_machine_ready("warm", ready_record(mid))
        assert await store.claim_pool_machine("warm", "old", utcnow(), fence=(fence_key, 1)) == "fenced"
        got = await store.claim_pool_machine("warm", "new", utcnow(), fence=(fence_key, 2))
        assert isinstance(got, tuple)
        # The holder of term 2 wrote this pool: a stale term-1 holder is refused even if the key lags.
        await redis_client.set(fence_key, "1")
        assert await store.claim_pool_machine("warm", "old", utcnow(), fence=(fence_key, 1)) == "fenced"
        # The pool shrinks: the other machine is withdrawn; a claim then finds nothing, and a
        # withdraw of the machine already claimed reports that the claim won.
        other = "m2" if got[0] == "m1" else "m1"
        assert await store.withdraw_pool_machine("warm", other) is True
        assert await store.claim_pool_machine("warm", "late", utcnow()) is None
        assert await store.withdraw_pool_machine("warm", got[0]) is False
        assert (await store.pool_state("warm")).records[got[0]].session == "new"
    finally:
        await store.close()
