"""Pool slots, the controller's half of the handoff: slot tokens and the assignment of a claimed slot.

Mixed into :class:`api.store_controller.ControllerStore`. A pool machine's agent waits at the gateway
with its slot token (:mod:`api.pool_token`) until the controller assigns its slot to a session:

1. :meth:`PoolHandoff.mint_pool_token` before creating the slot's machine (its digest at
   ``keys.pool_slot_token``; a new mint replaces the old);
2. :meth:`PoolHandoff.assign_pool_slot` at claim time: the session's id, its freshly minted session
   token and its env, as JSON at ``keys.pool_assignment`` with a TTL, then a publish on
   ``keys.pool_assigned_channel`` that wakes the agent's long-poll on whichever gateway replica
   holds it. The gateway takes the assignment once (and revokes the slot token in the same step:
   from then on the machine acts only with its session token), so the session token crosses Redis
   once and briefly, and never enters the Fly machine config;
3. :meth:`PoolHandoff.revoke_pool_token` when the slot's machine is destroyed or its pool removed
   (it drops an untaken assignment too). Not needed after a claim: the take revokes the token.

Both keys carry the pool's hash tag, so the gateway's take (one script) stays in one cluster slot.
"""

from __future__ import annotations

import json

from api import keys
from api.pool_token import mint
from api.store_base import StoreBase, unavailable_on_redis_error

#: How long an untaken assignment (it holds a session token) stays in Redis. Long enough for a
#: resume, or a cold boot when Fly cannot resume the snapshot; the controller's boot grace covers
#: an agent that never takes it.
ASSIGNMENT_TTL_SECONDS = 300


class PoolHandoff(StoreBase):
    """Mint and revoke pool slot tokens, assign a claimed slot to its session (controller only)."""

    @unavailable_on_redis_error
    async def mint_pool_token(self, pool: str, slot: str) -> str:
        """A fresh slot token for the slot's machine config; the slot's previous token stops working."""
        token = mint(pool, slot)
        await self._redis.set(keys.pool_slot_token(pool, slot), token.digest)
        return token.value

    @unavailable_on_redis_error
    async def assign_pool_slot(
        self,
        pool: str,
        slot: str,
        session_id: str,
        session_token: str,
        env: dict[str, str],
        *,
        ttl_seconds: int = ASSIGNMENT_TTL_SECONDS,
    ) -> None:
        """Hand the slot to ``session_id``: what its waiting agent becomes, taken once by the gateway.

        Writing again (a controller completing a claim another one began) replaces the assignment
        with the newer token, which is the one the session's token key now holds.
        """
        body = json.dumps({"sessionId": session_id, "sessionToken": session_token, "env": env})
        await self._redis.set(keys.pool_assignment(pool, slot), body, ex=ttl_seconds)
        await self._redis.publish(keys.pool_assigned_channel(pool, slot), "assigned")

    @unavailable_on_redis_error
    async def revoke_pool_token(self, pool: str, slot: str) -> bool:
        """Forget the slot's token and any untaken assignment; True if the token was still there."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.pool_slot_token(pool, slot))
            pipe.delete(keys.pool_assignment(pool, slot))
            deleted, _ = await pipe.execute()
        return bool(deleted)
