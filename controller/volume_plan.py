"""The pure rules for a session's Fly volume (``spec.persistence``), next to ``plan()``, not in it.

``plan()`` decides about machines and knows nothing of volumes. :func:`with_volume` takes its
actions and the session's volume record and adjusts them, so a session with ``spec.persistence``:

* **gets its volume before its first machine**: a ``CreateMachine`` without a recorded volume
  becomes a :class:`CreateVolume` (the machine follows on the next pass, which the executor
  requests at once); with one, the ``CreateMachine`` carries its id (mounted at the agent's work
  root) and the volume's region: a volume pins its machines to its region and host, so every wake
  and replacement mounts the same files.
* **keeps it while it lives**: nothing here destroys a volume except in front of a
  ``RemoveSession``, which ``plan()`` emits only once the session is deleted (or past its TTL) and
  every machine is gone. The executor applies in order and stops at the first failure, so the
  record is only removed once the volume is.

:func:`plan_orphan_volumes` is rule 9 for volumes. Volumes carry no metadata on Fly, so ownership is
the name: ``fs_`` and 24 hex digits of the session id's SHA-256 (:func:`volume_name`; Fly allows 30
lowercase characters, digits and underscores, and session ids are longer). A volume so named whose
session does not exist is destroyed once older than the orphan grace and no machine mounts it;
of several volumes of one live session, those that are not the recorded one are destroyed the same
way (twins of an ambiguous create). Volumes with any other name are never touched.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from api.models import Reason, Session, parse_timestamp
from controller.actions import Action, CreateMachine, CreateVolume, DestroyVolume, RemoveSession

VOLUME_NAME_PREFIX = "fs_"
_NAME_RE = re.compile(r"^fs_[0-9a-f]{24}$")
#: Volume states in which a volume is (or is becoming) usable; others are on their way out.
LIVE_VOLUME_STATES = frozenset({"created", "hydrating", "restoring", "extending", "enabling_remote_export"})


def volume_name(session_id: str) -> str:
    """``fs_<24 hex>``: the name of a session's volume (27 characters; Fly allows 30)."""
    return VOLUME_NAME_PREFIX + hashlib.sha256(session_id.encode()).hexdigest()[:24]


def is_ours(name: str | None) -> bool:
    return bool(name) and _NAME_RE.match(name or "") is not None


@dataclass(frozen=True)
class VolumeRecord:
    """What the store keeps of a session's volume (``api.store_volumes``)."""

    id: str
    name: str
    region: str
    size_gb: int

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> VolumeRecord | None:
        if not fields.get("id"):
            return None
        return cls(
            id=fields["id"],
            name=fields.get("name", ""),
            region=fields.get("region", ""),
            size_gb=int(fields.get("sizeGb") or 1),
        )

    def fields(self, created_at: datetime) -> dict[str, str]:
        return {
            "id": self.id,
            "name": self.name,
            "region": self.region,
            "sizeGb": str(self.size_gb),
            "createdAt": created_at.isoformat(),
        }


@dataclass(frozen=True)
class ObservedVolume:
    """A volume as Fly lists it, reduced to what the rules read."""

    id: str
    name: str
    state: str
    attached_machine_id: str | None
    created_at: datetime | None


def needs_record(session: Session, actions: Sequence[Action]) -> bool:
    """Whether :func:`with_volume` needs the session's record to adjust ``actions`` (one Redis read)."""
    return any(
        (isinstance(a, CreateMachine) and session.spec.persistence is not None)
        or isinstance(a, RemoveSession)
        for a in actions
    )


def with_volume(session: Session, actions: Sequence[Action], record: VolumeRecord | None) -> list[Action]:
    """``plan()``'s actions for ``session`` with its volume taken into account (module docstring)."""
    persistence = session.spec.persistence
    out: list[Action] = []
    for action in actions:
        if isinstance(action, CreateMachine) and persistence is not None:
            if record is None:
                out.append(
                    CreateVolume(
                        session.id,
                        volume_name(session.id),
                        action.region,
                        persistence.sizeGb,
                        reason=action.reason,
                        message="creating the session's volume before its machine",
                    )
                )
            else:
                out.append(replace(action, region=record.region or action.region, volume_id=record.id))
        elif isinstance(action, RemoveSession) and record is not None:
            out.append(
                DestroyVolume(
                    session.id,
                    record.id,
                    reason=action.reason,
                    message=f"session removed; destroying its volume {record.id}",
                )
            )
            out.append(action)
        else:
            out.append(action)
    return out


def observed_volume(
    volume_id: str, name: str | None, state: str | None, attached: str | None, created_at: str | None
) -> ObservedVolume:
    return ObservedVolume(
        id=volume_id,
        name=name or "",
        state=state or "",
        attached_machine_id=attached or None,
        created_at=parse_timestamp(created_at) if created_at else None,
    )


def plan_orphan_volumes(
    volumes: Iterable[ObservedVolume],
    known_session_ids: Iterable[str],
    now: datetime,
    grace_seconds: float,
) -> tuple[list[DestroyVolume], dict[str, list[ObservedVolume]]]:
    """Orphans to destroy, and the live sessions that have several volumes (name -> volumes): the
    caller keeps the recorded one of those and destroys the rest (:func:`twins_to_destroy`)."""
    by_name = {volume_name(sid): sid for sid in known_session_ids}
    orphans: list[DestroyVolume] = []
    crowded: dict[str, list[ObservedVolume]] = {}
    for v in sorted(volumes, key=lambda v: v.id):
        if not is_ours(v.name) or not _may_destroy(v, now, grace_seconds):
            continue
        session_id = by_name.get(v.name)
        if session_id is None:
            orphans.append(
                DestroyVolume(
                    None,
                    v.id,
                    reason=Reason.ORPHAN_VOLUME,
                    message=f"volume {v.id} ({v.name}) belongs to no existing session",
                )
            )
        else:
            crowded.setdefault(session_id, []).append(v)
    all_named: dict[str, int] = {}
    for v in volumes:
        all_named[v.name] = all_named.get(v.name, 0) + 1
    twins = {sid: vs for sid, vs in crowded.items() if all_named.get(volume_name(sid), 0) > 1}
    return orphans, twins


def twins_to_destroy(
    session_id: str, candidates: Sequence[ObservedVolume], recorded_id: str | None
) -> list[DestroyVolume]:
    """Of a live session's unattached volumes past the grace, all but the recorded one. Without a
    record nothing is destroyed: the next create adopts one of them by name."""
    if recorded_id is None:
        return []
    return [
        DestroyVolume(
            session_id,
            v.id,
            reason=Reason.ORPHAN_VOLUME,
            message=f"volume {v.id} is a twin of the session's volume {recorded_id}",
        )
        for v in candidates
        if v.id != recorded_id
    ]


def _may_destroy(v: ObservedVolume, now: datetime, grace_seconds: float) -> bool:
    if v.attached_machine_id or v.state not in LIVE_VOLUME_STATES:
        return False
    # A volume without a creation time is as good as new: wait (unknown, never dead).
    return v.created_at is not None and (now - v.created_at).total_seconds() >= grace_seconds
