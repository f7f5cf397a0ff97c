"""Fly volumes in the emulator: a real directory on disk per volume, mounted into machines.

What the official OpenAPI document (``Volumes_*``) and the reference notes give, and nothing more:

* ``POST /v1/apps/{app}/volumes`` (``CreateVolumeRequest``: ``name``, ``region``, ``size_gb``
  required; ``encrypted``, ``fstype``, ``auto_backup_enabled``, ``snapshot_retention`` echoed) →
  200 ``Volume`` in state ``created`` with a ``zone`` (the host) of its region. Names are Fly's:
  lowercase letters, digits and underscores, at most 30 characters, and **not unique** (Fly allows
  several volumes with one name; that is how ``fly scale count`` clones them). Sizes 1..500 GB.
  Region out of capacity (fault ``capacity_regions``) → 400 ``status: volume_placement_capacity``.
* ``GET …/volumes`` (every live volume of the app), ``GET …/volumes/{id}``, ``PUT …/volumes/{id}``
  (``UpdateVolumeRequest``), ``PUT …/volumes/{id}/extend`` (grow only; ``{volume, needs_restart}``),
  ``DELETE …/volumes/{id}`` (refused with 412 while a live machine mounts it; answers the volume in
  state ``pending_destroy``, after which it is gone: ``GET`` 404 ``volume not found``, files removed).
* ``attached_machine_id`` is the live (not destroyed) machine whose ``config.mounts`` names the
  volume; a machine create (or update) checks its one mount against the app's volumes: unknown →
  400 ``volume … not found``, other region → 400, attached to another live machine → 412
  ``failed_precondition``, a host that is full (fault ``full_volumes``) → 412 ``insufficient
  resources to create new machine with existing volume`` (the text the reference lists).
* The volume's files live in ``<work_root>/volumes/<id>/``. There is no chroot, so a machine's
  process cannot see that directory at the mount path: the emulator rewrites every environment value
  that is the mount path or starts with it (``FLYSWARM_VOLUME_ROOT=/data`` →
  ``<work_root>/volumes/<id>``), which is how a process finds a path on Fly too (it is told it).

Snapshots are not served: flyswarm does not use them (a lost host is answered with a new, empty
volume, see the README's Persistence section).
"""

from __future__ import annotations

import hashlib
import re
import secrets as secrets_mod
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from local.emulator_errors import FlyError, invalid

NAME_RE = re.compile(r"^[a-z0-9_]{1,30}$")
MAX_SIZE_GB = 500
_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
#: Hosts per region: a volume is placed on one of them (its ``zone``).
_ZONES_PER_REGION = 4


@dataclass(eq=False)
class Volume:
    id: str
    app: str
    name: str
    region: str
    zone: str
    size_gb: int
    created_at: float
    path: Path
    encrypted: bool = True
    fstype: str = "ext4"
    auto_backup_enabled: bool = True
    snapshot_retention: int = 5
    state: str = "created"


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def _zone(region: str, index: int) -> str:
    return hashlib.sha256(f"{region}/{index}".encode()).hexdigest()[:4]


def _int_field(body: Mapping[str, Any], name: str, *, required: bool = False) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer")
    return value


class VolumeRegistry:
    """The volumes of every app; ``attached`` tells which live machine mounts a volume."""

    def __init__(
        self,
        root: Path,
        *,
        attached: Callable[[str], str | None],
        regions: Iterable[str] = (),
    ) -> None:
        self.root = root
        self.attached = attached
        self.regions = frozenset(regions)
        self.volumes: dict[str, Volume] = {}

    # -- API operations --------------------------------------------------------------------------

    def create(self, app: str, body: Any, *, region_full: Callable[[str], bool]) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise invalid("name: must be 1-30 lowercase letters, digits or underscores")
        region = body.get("region")
        if not isinstance(region, str) or not region:
            raise invalid("region is required")
        if self.regions and region not in self.regions:
            raise FlyError(422, f"invalid_argument: region {region!r} not found")
        size = _int_field(body, "size_gb", required=True)
        assert size is not None
        if not 1 <= size <= MAX_SIZE_GB:
            raise invalid(f"size_gb: must be between 1 and {MAX_SIZE_GB}, got {size}")
        if body.get("snapshot_id") or body.get("source_volume_id"):
            raise invalid("snapshot_id/source_volume_id: restoring and forking are not emulated")
        if region_full(region):
            raise FlyError(
                400,
                f"failed to create volume: no capacity available in {region}",
                "volume_placement_capacity",
            )
        vid = self._new_id()
        path = self.root / vid
        path.mkdir(parents=True, exist_ok=False)
        volume = Volume(
            id=vid,
            app=app,
            name=name,
            region=region,
            zone=_zone(region, secrets_mod.randbelow(_ZONES_PER_REGION)),
            size_gb=size,
            created_at=time.time(),
            path=path,
            encrypted=bool(body.get("encrypted", True)),
            fstype=str(body.get("fstype") or "ext4"),
            auto_backup_enabled=bool(body.get("auto_backup_enabled", True)),
            snapshot_retention=_int_field(body, "snapshot_retention") or 5,
        )
        self.volumes[vid] = volume
        return self.view(volume)

    def list_volumes(self, app: str) -> list[dict[str, Any]]:
        found = sorted((v for v in self.volumes.values() if v.app == app), key=lambda v: v.created_at)
        return [self.view(v) for v in found]

    def get(self, app: str, volume_id: str) -> Volume:
        volume = self.volumes.get(volume_id)
        if volume is None or volume.app != app:
            raise FlyError(404, "volume not found")
        return volume

    def update(self, app: str, volume_id: str, body: Any) -> dict[str, Any]:
        volume = self.get(app, volume_id)
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        if body.get("auto_backup_enabled") is not None:
            volume.auto_backup_enabled = bool(body["auto_backup_enabled"])
        retention = _int_field(body, "snapshot_retention")
        if retention is not None:
            volume.snapshot_retention = retention
        return self.view(volume)

    def extend(self, app: str, volume_id: str, body: Any) -> dict[str, Any]:
        volume = self.get(app, volume_id)
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        size = _int_field(body, "size_gb", required=True)
        assert size is not None
        if size <= volume.size_gb:
            raise invalid(f"size_gb: a volume can only grow (it has {volume.size_gb} GB, asked {size})")
        if size > MAX_SIZE_GB:
            raise invalid(f"size_gb: at most {MAX_SIZE_GB}")
        volume.size_gb = size
        return {"volume": self.view(volume), "needs_restart": False}

    def delete(self, app: str, volume_id: str) -> dict[str, Any]:
        volume = self.get(app, volume_id)
        machine_id = self.attached(volume_id)
        if machine_id is not None:
            raise FlyError(
                412, f"failed_precondition: volume {volume_id} is attached to machine {machine_id}"
            )
        del self.volumes[volume_id]
        shutil.rmtree(volume.path, ignore_errors=True)
        volume.state = "pending_destroy"
        return self.view(volume)

    # -- mounts ------------------------------------------------------------------------------------

    def check_mount(
        self,
        app: str,
        region: str,
        mounts: list[dict[str, Any]] | None,
        *,
        machine_id: str | None,
        host_full: Callable[[str], bool],
    ) -> Volume | None:
        """The volume a machine (``machine_id``: None for a new one) in ``region`` may mount, or the
        error Fly gives. Shape (one mount, absolute path) is checked by ``emulator_config``."""
        if not mounts:
            return None
        volume_id = str(mounts[0]["volume"])
        volume = self.volumes.get(volume_id)
        if volume is None or volume.app != app:
            raise invalid(f"config.mounts[0].volume: volume {volume_id!r} not found")
        if volume.region != region:
            raise invalid(
                f"config.mounts[0].volume: volume {volume_id} is in region {volume.region}, "
                f"the machine in {region}"
            )
        holder = self.attached(volume_id)
        if holder is not None and holder != machine_id:
            raise FlyError(
                412, f"failed_precondition: volume {volume_id} is already attached to machine {holder}"
            )
        if host_full(volume_id):
            raise FlyError(412, "insufficient resources to create new machine with existing volume")
        return volume

    def guest_env(self, env: Mapping[str, str], mounts: list[dict[str, Any]] | None) -> dict[str, str]:
        """``env`` with the mount path replaced by the volume's directory (there is no chroot)."""
        out = dict(env)
        for mount in mounts or []:
            volume = self.volumes.get(str(mount.get("volume")))
            guest = str(mount.get("path") or "").rstrip("/")
            if volume is None or not guest:
                continue
            for key, value in out.items():
                if value == guest or value.startswith(guest + "/"):
                    out[key] = str(volume.path) + value[len(guest) :]
        return out

    # -- views -------------------------------------------------------------------------------------

    def view(self, volume: Volume) -> dict[str, Any]:
        block_size = 4096
        blocks = volume.size_gb * (1 << 30) // block_size
        used = _bytes_used(volume.path)
        free = max(blocks - used // block_size, 0)
        holder = self.attached(volume.id) if volume.state == "created" else None
        # Absent rather than null when unattached: the spec's Volume has no nullable fields.
        attached = {"attached_machine_id": holder, "attached_alloc_id": holder} if holder else {}
        return {
            **attached,
            "id": volume.id,
            "name": volume.name,
            "state": volume.state,
            "region": volume.region,
            "zone": volume.zone,
            "size_gb": volume.size_gb,
            "encrypted": volume.encrypted,
            "fstype": volume.fstype,
            "type": "local",
            "created_at": _rfc3339(volume.created_at),
            "auto_backup_enabled": volume.auto_backup_enabled,
            "snapshot_retention": volume.snapshot_retention,
            "host_status": "ok",
            "block_size": block_size,
            "blocks": blocks,
            "blocks_free": free,
            "blocks_avail": free,
            "bytes_total": blocks * block_size,
            "bytes_used": used,
            "host_features": [],
            "required_host_features": [],
        }

    def clear(self) -> None:
        for volume in self.volumes.values():
            shutil.rmtree(volume.path, ignore_errors=True)
        self.volumes.clear()

    def _new_id(self) -> str:
        while True:
            vid = "vol_" + "".join(secrets_mod.choice(_ID_ALPHABET) for _ in range(16))
            if vid not in self.volumes:
                return vid


def _bytes_used(path: Path) -> int:
    total = 0
    try:
        for child in path.rglob("*"):
            if child.is_file() and not child.is_symlink():
                total += child.stat().st_size
    except OSError:  # a file went away while we counted: a size, not an inventory
        pass
    return total
