"""What the plan asks for, and what came of it: both are plain values.

``plan()`` returns a list of :data:`Action`; the executor applies them in order and turns each into
an :data:`Outcome`. Keeping both as frozen dataclasses means the plan is tested by comparing
values, the executor by the state it leaves behind, and neither needs the other to be tested.

Every action names its session (``session_id``; None only for a destroy of an orphan whose
session no longer exists), a machine-readable ``reason`` (``HeartbeatLost``, ``Idle``, ...) and a
human ``message``. ``kind`` is a fixed snake_case name for logs and metric labels.

Outcomes follow controller-runtime and kopf: :class:`Done`; :class:`Requeue` ("look again in N s",
not an error); :class:`Transient` (retry with per-key exponential backoff and jitter);
:class:`Permanent` (log and count, do not retry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from api.models import SessionEvent, SessionStatus

#: A webhook notice a status write enqueues once per session: (event type, its data).
Notice = tuple[str, dict[str, Any]]

# -- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateMachine:
    """Create the session's machine, tagged with ``launch_id`` (recorded in Redis before the call)."""

    kind: ClassVar[str] = "create"
    session_id: str
    launch_id: str
    region: str
    reason: str = "Create"
    message: str = ""
    #: The session's volume, mounted at the agent's work root (``spec.persistence``; volume_plan.py).
    volume_id: str | None = None


@dataclass(frozen=True)
class StartMachine:
    """Start a stopped, suspended, created or failed machine (wake, or restart in place)."""

    kind: ClassVar[str] = "start"
    session_id: str
    machine_id: str
    reason: str = "Start"
    message: str = ""
    #: A claimed pool machine that would boot its agent afresh (not a resume): its config is the
    #: pool's, whose slot token is spent, so the executor first gives it the session's config.
    pool_machine: bool = False


@dataclass(frozen=True)
class StopMachine:
    """Stop a machine gracefully (SIGTERM, then SIGKILL after the stop grace)."""

    kind: ClassVar[str] = "stop"
    session_id: str
    machine_id: str
    reason: str = "Stop"
    message: str = ""


@dataclass(frozen=True)
class SuspendMachine:
    """Suspend a started machine (memory kept; wakes faster than a stopped one)."""

    kind: ClassVar[str] = "suspend"
    session_id: str
    machine_id: str
    reason: str = "Suspend"
    message: str = ""


@dataclass(frozen=True)
class RestartMachine:
    """Fly restart of a started machine (the agent process is started again on the same machine)."""

    kind: ClassVar[str] = "restart"
    session_id: str
    machine_id: str
    reason: str = "Restart"
    message: str = ""
    #: As for :class:`StartMachine`: a claimed pool machine gets the session's config first.
    pool_machine: bool = False


@dataclass(frozen=True)
class DestroyMachine:
    """Destroy a machine; ``force`` kills a running one, otherwise Fly requires it to be at rest."""

    kind: ClassVar[str] = "destroy"
    session_id: str | None
    machine_id: str
    force: bool = False
    reason: str = "Destroy"
    message: str = ""


@dataclass(frozen=True)
class CreateVolume:
    """Create (or adopt, found by ``name``) the session's Fly volume before its first machine."""

    kind: ClassVar[str] = "create_volume"
    session_id: str
    name: str
    region: str
    size_gb: int
    reason: str = "CreateVolume"
    message: str = ""


@dataclass(frozen=True)
class DestroyVolume:
    """Delete a volume: the removed session's, or an orphan's (``session_id`` None if unknown)."""

    kind: ClassVar[str] = "destroy_volume"
    session_id: str | None
    volume_id: str
    reason: str = "DestroyVolume"
    message: str = ""


@dataclass(frozen=True)
class SetStatus:
    """Write the controller-owned status and append ``events`` to the session's event stream."""

    kind: ClassVar[str] = "set_status"
    session_id: str
    status: SessionStatus
    events: tuple[SessionEvent, ...] = ()
    #: Webhook notices (event type, data) enqueued once per session with the status (api/store_controller.py).
    notices: tuple[Notice, ...] = ()
    reason: str = "Status"
    message: str = ""


@dataclass(frozen=True)
class RemoveSession:
    """Finalize: delete the record and every key of the session."""

    kind: ClassVar[str] = "remove"
    session_id: str
    reason: str = "Remove"
    message: str = ""


@dataclass(frozen=True)
class RequeueAfter:
    """Look at the session again in ``seconds`` (a deadline the plan knows is coming)."""

    kind: ClassVar[str] = "requeue"
    session_id: str
    seconds: float
    reason: str = "Requeue"
    message: str = ""


Action = (
    CreateMachine
    | StartMachine
    | StopMachine
    | SuspendMachine
    | RestartMachine
    | DestroyMachine
    | CreateVolume
    | DestroyVolume
    | SetStatus
    | RemoveSession
    | RequeueAfter
)

#: Actions that call the Fly Machines API on an existing machine.
MachineAction = StartMachine | StopMachine | SuspendMachine | RestartMachine | DestroyMachine

ACTION_TYPES: tuple[type[Action], ...] = (
    CreateMachine,
    StartMachine,
    StopMachine,
    SuspendMachine,
    RestartMachine,
    DestroyMachine,
    CreateVolume,
    DestroyVolume,
    SetStatus,
    RemoveSession,
    RequeueAfter,
)
ACTION_KINDS: tuple[str, ...] = tuple(t.kind for t in ACTION_TYPES)


def is_destroy(action: Action) -> bool:
    return isinstance(action, DestroyMachine)


def is_fly_call(action: Action) -> bool:
    """True when applying the action calls Fly (it spends rate-limit tokens)."""
    return isinstance(
        action,
        CreateMachine
        | StartMachine
        | StopMachine
        | SuspendMachine
        | RestartMachine
        | DestroyMachine
        | CreateVolume
        | DestroyVolume,
    )


def machine_id_of(action: Action) -> str | None:
    """The machine an action touches, if any (for log binding and per-machine leases)."""
    if isinstance(action, StartMachine | StopMachine | SuspendMachine | RestartMachine | DestroyMachine):
        return action.machine_id
    return None


def requeue_seconds(actions: list[Action]) -> float | None:
    """The soonest requeue asked for, or None."""
    delays = [a.seconds for a in actions if isinstance(a, RequeueAfter)]
    return min(delays) if delays else None


# -- outcomes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """The action was applied (or was already true: e.g. destroying a machine that is gone)."""

    kind: ClassVar[str] = "done"


@dataclass(frozen=True)
class Requeue:
    """Not an error: look again after ``seconds`` (e.g. a 412 while the machine is in transition)."""

    kind: ClassVar[str] = "requeue"
    seconds: float


@dataclass(frozen=True)
class Transient:
    """Failed for a reason that may pass (429, 408, 5xx, Redis blip): retry with backoff."""

    kind: ClassVar[str] = "transient"
    error: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Permanent:
    """Failed for a reason retrying will not fix (400, 401, bad config): count it, do not retry."""

    kind: ClassVar[str] = "permanent"
    error: str
    details: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


Outcome = Done | Requeue | Transient | Permanent
