"""The record of a session's Fly volume: the controller's half of ``spec.persistence``.

Mixed into :class:`api.store_controller.ControllerStore`. Fly volumes carry no metadata, so the
session's volume id lives here, in the session's own hash (:func:`api.keys.volume`, one of its
fixed keys: a removal deletes it with the rest). The controller writes it once the create (or the
adoption of a volume found by name) is answered, reads it before every launch, and clears it when
the volume turns out to be gone, so the next launch makes a new one.
"""

from __future__ import annotations

from collections.abc import Mapping

from api import keys
from api.store_base import StoreBase, unavailable_on_redis_error


class SessionVolumes(StoreBase):
    """Read and write the session's volume record (controller only)."""

    @unavailable_on_redis_error
    async def get_volume(self, session_id: str) -> dict[str, str]:
        """The record (``id``, ``name``, ``region``, ``sizeGb``, ``createdAt``), or {} if none."""
        return dict(await self._redis.hgetall(keys.volume(session_id)))

    @unavailable_on_redis_error
    async def record_volume(self, session_id: str, fields: Mapping[str, str]) -> None:
        """Replace the record whole (a new volume never inherits an old one's fields)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.volume(session_id))
            pipe.hset(keys.volume(session_id), mapping=dict(fields))
            await pipe.execute()

    @unavailable_on_redis_error
    async def clear_volume(self, session_id: str) -> None:
        await self._redis.delete(keys.volume(session_id))
