"""Fly volumes through the controller's Fly client: typed calls, Fly's rate limits, Fly's errors.

:class:`FlyVolumes` wraps a :class:`~controller.fly.FlyClient` (one HTTP pool, one token bucket
set, one error mapping) and adds the ``Volumes_*`` operations of the official OpenAPI document
that flyswarm uses: create, list, get, extend and delete. Each kind of call has its own bucket at
Fly's per-action rate (1 req/s, burst 3: shared/reference §5), per app for create and list, per
volume for the rest, exactly as for machines.

A volume create is not idempotent either, and Fly volumes have no metadata to find one by; the
caller names its volumes (``fs_<hash of the session id>``) and, after an ambiguous create
(:class:`~controller.fly_errors.AmbiguousCreate`), lists them by that name before creating again.
"""

from __future__ import annotations

from urllib.parse import quote

from controller.fly import FlyClient, _json, _Op
from controller.fly_errors import NotFound
from controller.fly_types import FlyModel

_VOLUME_LIST = _Op("volume_list", "volume_list", per_machine=False)
_VOLUME_CREATE = _Op("volume_create", "volume_create", per_machine=False)
_VOLUME_GET = _Op("volume_get", "volume_get")
_VOLUME_EXTEND = _Op("volume_extend", "volume_extend")
_VOLUME_DELETE = _Op("volume_delete", "volume_delete")


class Volume(FlyModel):
    """``Volume``: the fields flyswarm reads are typed; the rest is kept as is."""

    id: str
    name: str | None = None
    state: str | None = None
    region: str | None = None
    zone: str | None = None
    size_gb: int | None = None
    attached_machine_id: str | None = None
    created_at: str | None = None


class CreateVolumeRequest(FlyModel):
    name: str
    region: str
    size_gb: int
    encrypted: bool | None = None
    auto_backup_enabled: bool | None = None
    require_unique_zone: bool | None = None


class FlyVolumes:
    """The volumes of the client's app."""

    def __init__(self, fly: FlyClient) -> None:
        self.fly = fly
        # Volumes live in the client's default app (a persistent session's machines are created
        # there too: a machine mounts only a volume of its own app). The client prefixes the app.
        self.app = fly.config.app_name
        self._path = "/volumes"

    async def create(
        self,
        name: str,
        *,
        region: str,
        size_gb: int,
        auto_backup_enabled: bool | None = None,
        deadline: float | None = None,
    ) -> Volume:
        """Create a volume. NOT idempotent: an ambiguous failure raises ``AmbiguousCreate``."""
        request = CreateVolumeRequest(
            name=name,
            region=region,
            size_gb=size_gb,
            auto_backup_enabled=auto_backup_enabled,
            # One session, one volume: no zone to spread over, and a unique-zone rule would only
            # refuse a second try after an ambiguous create.
            require_unique_zone=False,
        )
        response = await self.fly._call(
            _VOLUME_CREATE,
            "POST",
            self._path,
            json=request.to_api(),
            deadline=deadline,
            create_metadata={},
            app=self.app,
        )
        return Volume.model_validate(_json(response, _VOLUME_CREATE, create_metadata={}))

    async def list_volumes(self, *, deadline: float | None = None) -> list[Volume]:
        """Every volume of the app (Fly answers them at once)."""
        response = await self.fly._call(_VOLUME_LIST, "GET", self._path, deadline=deadline, app=self.app)
        return [Volume.model_validate(item) for item in _json(response, _VOLUME_LIST) or []]

    async def get(self, volume_id: str, *, deadline: float | None = None) -> Volume:
        response = await self.fly._call(
            _VOLUME_GET,
            "GET",
            self._volume_path(volume_id),
            machine_id=volume_id,
            deadline=deadline,
            app=self.app,
        )
        return Volume.model_validate(_json(response, _VOLUME_GET, machine_id=volume_id))

    async def extend(self, volume_id: str, size_gb: int, *, deadline: float | None = None) -> Volume:
        response = await self.fly._call(
            _VOLUME_EXTEND,
            "PUT",
            self._volume_path(volume_id, "extend"),
            machine_id=volume_id,
            app=self.app,
            json={"size_gb": size_gb},
            deadline=deadline,
        )
        body = _json(response, _VOLUME_EXTEND, machine_id=volume_id) or {}
        return Volume.model_validate(body.get("volume") or {"id": volume_id})

    async def delete(self, volume_id: str, *, deadline: float | None = None) -> bool:
        """Delete; True if this call deleted it, False if it was already gone (404 is success).

        Fly refuses a volume a live machine mounts (``PreconditionFailed``)."""
        try:
            await self.fly._call(
                _VOLUME_DELETE,
                "DELETE",
                self._volume_path(volume_id),
                machine_id=volume_id,
                app=self.app,
                deadline=deadline,
            )
        except NotFound:
            return False
        return True

    def _volume_path(self, volume_id: str, *rest: str) -> str:
        parts = [quote(volume_id, safe="")] + [quote(p, safe="") for p in rest]
        return f"{self._path}/" + "/".join(parts)
