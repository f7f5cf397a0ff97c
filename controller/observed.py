"""What the controller observed, as plain frozen values the pure plan can read.

The Fly client speaks pydantic edge models (``controller/fly_types.py``); the plan never sees them.
The runtime converts each listed machine into an :class:`ObservedMachine` and each Redis launch
record into a :class:`LaunchRecord`, so ``plan()`` depends on neither httpx nor Redis, and tests
build observations with one constructor call.

Identity lives in Fly metadata: every machine we create carries ``flyswarm_managed=true``,
``flyswarm_session=<id>`` and ``flyswarm_launch=<launch id>``. A machine without
``flyswarm_managed=true`` is not ours and is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

TAG_MANAGED = "flyswarm_managed"
TAG_SESSION = "flyswarm_session"
TAG_LAUNCH = "flyswarm_launch"
#: Pool machines (controller/pool_plan.py) carry their pool, slot and template digest, no session
#: until a claim tags them with the claiming session's id and launch.
TAG_POOL = "flyswarm_pool"
TAG_POOL_SLOT = "flyswarm_pool_slot"
TAG_POOL_TEMPLATE = "flyswarm_pool_template"
MANAGED_VALUE = "true"


@dataclass(frozen=True)
class ObservedMachine:
    """One Fly machine as the last ``list`` showed it."""

    id: str
    state: str
    region: str | None
    session_id: str | None
    launch_id: str | None
    managed: bool
    created_at: datetime
    updated_at: datetime | None = None
    instance_id: str | None = None
    last_exit_code: int | None = None
    last_exit_oom: bool = False
    host_status: str = "ok"
    #: True when the newest exit was asked for (a stop we or Fly requested), not a crash.
    last_exit_requested: bool = False
    #: The pool that created it (a claimed machine keeps it, beside its session tag).
    pool: str | None = None
    pool_slot: str | None = None
    pool_template: str | None = None

    @property
    def unclaimed_pool_machine(self) -> bool:
        """A pool's own machine: the pool controller's, never the session orphan rule's."""
        return self.pool is not None and self.session_id is None

    @property
    def last_change(self) -> datetime:
        """When the machine last changed state, as far as we can tell (for wedge detection)."""
        return self.updated_at or self.created_at


@dataclass(frozen=True)
class LaunchRecord:
    """The launch id recorded in Redis *before* a create call (the "expectation")."""

    launch_id: str
    requested_at: datetime
    machine_id: str | None = None
    #: The agent app the machine was created in (None: recorded before apps were, the default app).
    app: str | None = None

    @classmethod
    def from_store(cls, raw: Mapping[str, str]) -> LaunchRecord | None:
        """Parse the hash ``record_launch`` writes (``launchId``, ``requestedAt``, ``machineId``, ``app``).

        Returns None for an empty or unreadable record: an unreadable expectation must not block
        creates forever, and the duplicate rule cleans up if a create did slip through.
        """
        launch_id = raw.get("launchId")
        requested = raw.get("requestedAt")
        if not launch_id or not requested:
            return None
        try:
            requested_at = datetime.fromisoformat(requested)
        except ValueError:
            return None
        return cls(
            launch_id=launch_id,
            requested_at=requested_at,
            machine_id=raw.get("machineId") or None,
            app=raw.get("app") or None,
        )


@dataclass(frozen=True)
class CreateFailure:
    """Why Fly refused the last create (nothing was created): shown in the session's status."""

    reason: str  #: ``NoCapacity`` or ``CreateFailed``
    message: str
    failed_at: datetime

    @classmethod
    def from_store(cls, raw: Mapping[str, str]) -> CreateFailure | None:
        """Parse the failure fields ``ControllerStore.record_create_failure`` leaves in the launch record."""
        reason, failed = raw.get("failureReason"), raw.get("failedAt")
        if not reason or not failed or raw.get("launchId"):
            return None
        try:
            failed_at = datetime.fromisoformat(failed)
        except ValueError:
            return None
        return cls(reason=reason, message=raw.get("failureMessage", ""), failed_at=failed_at)


def parse_tags(metadata: Mapping[str, str] | None) -> tuple[bool, str | None, str | None]:
    """``(managed, session_id, launch_id)`` from a machine's ``config.metadata``."""
    meta = metadata or {}
    managed = meta.get(TAG_MANAGED) == MANAGED_VALUE
    return managed, meta.get(TAG_SESSION) or None, meta.get(TAG_LAUNCH) or None


def pool_tags(metadata: Mapping[str, str] | None) -> tuple[str | None, str | None, str | None]:
    """``(pool, slot, template digest)`` from a machine's ``config.metadata``."""
    meta = metadata or {}
    return meta.get(TAG_POOL) or None, meta.get(TAG_POOL_SLOT) or None, meta.get(TAG_POOL_TEMPLATE) or None


def pool_machine_tags(pool: str, slot: str, template: str) -> dict[str, str]:
    """The metadata of a pool machine: ours, its pool and slot, and no session."""
    return {TAG_MANAGED: MANAGED_VALUE, TAG_POOL: pool, TAG_POOL_SLOT: slot, TAG_POOL_TEMPLATE: template}


def machine_tags(session_id: str, launch_id: str) -> dict[str, str]:
    """The metadata every machine we create carries."""
    return {TAG_MANAGED: MANAGED_VALUE, TAG_SESSION: session_id, TAG_LAUNCH: launch_id}
