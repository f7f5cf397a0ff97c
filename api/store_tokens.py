"""Per-session gateway tokens: the controller's half (mint at each launch, revoke at the end).

Mixed into :class:`api.store_controller.ControllerStore`. Only the token's SHA-256 is stored, in
the session's own key (:func:`api.keys.session_token`, one of its fixed keys, so a removal deletes
it with the rest); the token itself goes into the machine's environment and nowhere else. Minting
replaces the previous digest: the token of a replaced machine stops working at once. The gateway
verifies (:class:`api.store_gateway.GatewayStore`).
"""

from __future__ import annotations

from api import keys
from api.session_token import SessionToken, mint
from api.store_base import StoreBase, unavailable_on_redis_error


class SessionTokens(StoreBase):
    """Mint and revoke the per-session token (controller only)."""

    @unavailable_on_redis_error
    async def mint_session_token(self, session_id: str) -> SessionToken:
        """A fresh token for the session's next launch; the previous one stops working."""
        token = mint(session_id)
        await self._redis.set(keys.session_token(session_id), token.digest)
        return token

    @unavailable_on_redis_error
    async def revoke_session_token(self, session_id: str) -> bool:
        """Forget the session's token (finished or removed session); True if there was one."""
        return bool(await self._redis.delete(keys.session_token(session_id)))
