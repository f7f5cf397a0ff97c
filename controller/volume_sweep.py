"""Orphan volumes: the leader destroys volumes of ours that no session owns (rule 9).

The reconciler runs a sweep every ``interval`` seconds in its own task, beside the resync, while
it holds the leader lease and its last pass succeeded: one ``Volumes_list`` per sweep (volumes
change rarely, and the list spends a token of Fly's per-app bucket). The decisions are
:mod:`controller.volume_plan`'s; this module adds the care the machine orphans get: the session ids
are read from Redis *after* the list (a session created meanwhile is known; a Redis error ends the
sweep: unknown, never dead), a twin is destroyed only if the session's record names another volume,
and the destroys go through the executor (leader authority, one Fly call each).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from api.store_base import StoreUnavailable
from api.store_controller import ControllerStore
from controller import fly_errors
from controller.actions import DestroyVolume, Done, Outcome
from controller.fly_volumes import FlyVolumes
from controller.volume_plan import (
    VolumeRecord,
    observed_volume,
    plan_orphan_volumes,
    twins_to_destroy,
)


class VolumeSweeper:
    def __init__(
        self,
        *,
        store: ControllerStore,
        volumes: FlyVolumes,
        grace_seconds: float,
        interval_seconds: float,
        call_timeout_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.volumes = volumes
        self.grace_seconds = grace_seconds
        self.interval_seconds = interval_seconds
        self.call_timeout_seconds = call_timeout_seconds
        self._clock = clock
        self._last: float | None = None

    def due(self) -> bool:
        return self._last is None or self._clock() - self._last >= self.interval_seconds

    async def sweep(
        self, now: datetime, apply: Callable[[DestroyVolume], Awaitable[Outcome]], log: Any
    ) -> int:
        """Destroy orphan and twin volumes; the number destroyed. Never raises for Fly or Redis."""
        if not self.due():
            return 0
        self._last = self._clock()
        try:
            listed = await self.volumes.list_volumes(deadline=self.call_timeout_seconds)
            # Read after the list: a session created meanwhile is known, so its volume is not taken
            # for an orphan (its create is also younger than the grace).
            known = await self.store.all_ids()
        except fly_errors.FlyError as err:
            log.info("volume_list_failed", error=str(err))
            return 0
        except StoreUnavailable as err:
            log.info("volume_sweep_skipped", error=str(err))
            return 0
        observed = [
            observed_volume(v.id, v.name, v.state, v.attached_machine_id, v.created_at) for v in listed
        ]
        orphans, crowded = plan_orphan_volumes(observed, known, now, self.grace_seconds)
        actions = list(orphans)
        try:
            for session_id, candidates in crowded.items():
                record = VolumeRecord.from_fields(await self.store.get_volume(session_id))
                actions += twins_to_destroy(session_id, candidates, record.id if record else None)
        except StoreUnavailable as err:
            log.info("volume_sweep_stopped", error=str(err))
        destroyed = 0
        for action in actions:
            if isinstance(await apply(action), Done):
                destroyed += 1
        return destroyed
