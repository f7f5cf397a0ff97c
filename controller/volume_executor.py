"""Applies the volume actions (:class:`CreateVolume`, :class:`DestroyVolume`): one Fly call each.

Part of the executor (:mod:`controller.executor` hands these two actions here). The rules are those
of machines:

* **Safe creates.** A volume create is not idempotent and Fly volumes have no metadata, so the
  session's volume is found by its name (``fs_<hash>``) first: one that exists already (an
  ambiguous create that did happen, or a controller that died before writing the record) is adopted
  instead of made again. Only then is one created; the answer's id goes to the session's record.
  An ambiguous answer is a transient failure: the next pass looks it up by name.
* **Clear failures.** A refused create (no capacity for a volume in the region, quota, bad size)
  becomes the session's create failure (status reason ``NoCapacity``/``CreateFailed``, message
  saying it was the volume) and a ``VolumeCreateFailed`` warning event; the plan retries it on the
  key's backoff.
* **Destroy is idempotent**: a 404 is done. Fly refuses to delete a volume a machine still mounts
  (412, e.g. while that machine is being destroyed): a requeue, like any 412.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from api.models import Reason, SessionEvent
from api.store_controller import ControllerStore
from controller import fly_errors
from controller.actions import CreateVolume, DestroyVolume, Done, Outcome, Requeue, Transient
from controller.fly_volumes import FlyVolumes, Volume
from controller.volume_plan import LIVE_VOLUME_STATES, VolumeRecord


class VolumeExecutor:
    """The executor's volume half; ``deadline`` is the executor's per-call deadline."""

    def __init__(self, *, store: ControllerStore, volumes: FlyVolumes, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.volumes = volumes
        self._now = clock

    async def apply(self, action: CreateVolume | DestroyVolume, *, log: Any, deadline: float) -> Outcome:
        if isinstance(action, CreateVolume):
            return await self._create(action, log, deadline)
        return await self._destroy(action, log, deadline)

    async def _create(self, action: CreateVolume, log: Any, deadline: float) -> Outcome:
        log = log.bind(volume_name=action.name, region=action.region)
        found = await self._find(action, deadline)
        if found is not None:
            await self._record(action, found)
            log.info("volume_adopted", volume_id=found.id)
            return Requeue(0.0)
        try:
            volume = await self.volumes.create(
                action.name, region=action.region, size_gb=action.size_gb, deadline=deadline
            )
        except fly_errors.AmbiguousCreate as err:
            log.warning("volume_create_ambiguous", error=err.message)
            return Transient(f"volume create may have happened ({err.message}); looking it up by name next")
        except fly_errors.FlyError as err:
            reason = Reason.NO_CAPACITY if isinstance(err, fly_errors.Capacity) else Reason.CREATE_FAILED
            message = f"could not create the session's volume: {err}"
            await self.store.record_create_failure(action.session_id, reason, message)
            await self.store.append_event(
                action.session_id,
                SessionEvent(type="warning", reason=Reason.VOLUME_CREATE_FAILED, message=message),
            )
            log.warning("volume_create_failed", error=err.message, capacity=reason == Reason.NO_CAPACITY)
            raise
        await self._record(action, volume)
        log.info("volume_created", volume_id=volume.id, size_gb=action.size_gb)
        # The machine follows at once: it is the next pass's CreateMachine, now with the volume.
        return Requeue(0.0)

    async def _find(self, action: CreateVolume, deadline: float) -> Volume | None:
        """The session's volume if one exists already (oldest first; ties by id)."""
        mine = [
            v
            for v in await self.volumes.list_volumes(deadline=deadline)
            if v.name == action.name
            and (v.state or "created") in LIVE_VOLUME_STATES
            and v.region == action.region
        ]
        mine.sort(key=lambda v: (v.created_at or "", v.id))
        return mine[0] if mine else None

    async def _record(self, action: CreateVolume, volume: Volume) -> None:
        record = VolumeRecord(
            id=volume.id,
            name=action.name,
            region=volume.region or action.region,
            size_gb=volume.size_gb or action.size_gb,
        )
        await self.store.record_volume(action.session_id, record.fields(self._now()))

    async def _destroy(self, action: DestroyVolume, log: Any, deadline: float) -> Outcome:
        log = log.bind(volume_id=action.volume_id)
        deleted = await self.volumes.delete(action.volume_id, deadline=deadline)
        log.info("volume_destroyed", already_gone=not deleted)
        return Done()

    async def volume_lost(self, session_id: str, volume_id: str, error: str, log: Any) -> None:
        """A machine create named the session's volume and Fly does not know it (host lost, deleted
        behind our back): forget it, so the next launch makes a new, empty one; say so."""
        await self.store.clear_volume(session_id)
        await self.store.append_event(
            session_id,
            SessionEvent(
                type="warning",
                reason=Reason.VOLUME_LOST,
                message=f"volume {volume_id} is gone ({error}); the next launch gets a new, empty volume",
            ),
        )
        log.warning("volume_lost", volume_id=volume_id, error=error)
