"""Every machine-readable reason flyswarm writes, in one enum (the README's reasons table lists them).

``status.reason`` is always one of these (the status model refuses anything else), and so are the
reasons of the controller's requeues and the agent's outcomes. The agent's own report keeps its
``reason`` as the agent wrote it (a machine's report is input, read leniently); the controller maps
an agent reason outside this set to ``AgentError`` when it finishes a session.

The values are CamelCase strings on the wire; ``Reason`` is a ``StrEnum``, so a member compares
equal to its string and serializes as it.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # progress
    CREATE_REQUESTED = "CreateRequested"
    CREATE_FAILED = "CreateFailed"  # Fly refused the last create (bad image, bad config, quota)
    NO_CAPACITY = "NoCapacity"  # Fly had no capacity in the region for the last create
    MACHINE_STARTING = "MachineStarting"
    AGENT_READY = "AgentReady"
    IDLE = "Idle"
    WAKE = "Wake"
    NOT_STARTED = "NotStarted"
    DELETED = "Deleted"
    # finished
    COMPLETED = "Completed"
    AGENT_ERROR = "AgentError"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BUDGET_EXCEEDED = "BudgetExceeded"
    MAX_TURNS_EXCEEDED = "MaxTurnsExceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    # reported by the agent (agent/outcome.py); passed through to status.reason
    API_ERROR = "ApiError"
    MAX_TURNS = "MaxTurns"
    EXECUTION_ERROR = "ExecutionError"
    CLI_CRASHED = "CliCrashed"
    CLI_UNAVAILABLE = "CliUnavailable"
    SIGNAL = "Signal"
    SPEC_INVALID = "SpecInvalid"
    WORKSPACE_FAILED = "WorkspaceFailed"  # a clone, a file or a push of spec.workspace failed
    # failure causes (restartable)
    HEARTBEAT_LOST = "HeartbeatLost"
    MACHINE_LOST = "MachineLost"
    MACHINE_FAILED = "MachineFailed"
    CRASHED = "Crashed"
    OOM_KILLED = "OOMKilled"
    MACHINE_STOPPED = "MachineStopped"
    MACHINE_SUSPENDED = "MachineSuspended"
    MACHINE_WEDGED = "MachineWedged"
    HOST_UNREACHABLE = "HostUnreachable"
    # machine housekeeping
    DUPLICATE_MACHINE = "DuplicateMachine"
    ORPHAN_MACHINE = "OrphanMachine"
    # volumes (spec.persistence)
    VOLUME_CREATE_FAILED = "VolumeCreateFailed"  # Fly refused the session's volume (capacity, quota)
    VOLUME_LOST = "VolumeLost"  # the session's volume is gone (host lost): a new, empty one is made
    ORPHAN_VOLUME = "OrphanVolume"
    FINISHED = "Finished"
    TTL_EXPIRED = "TTLExpired"
    # waits (requeue reasons)
    WAITING = "Waiting"
    UNKNOWN_STATE = "UnknownMachineState"
    BACK_OFF = "BackOff"
    RECHECK = "Recheck"  # a machine in a transient state is looked at again shortly
    HEARTBEATS_UNKNOWN = "HeartbeatsUnknown"  # after a Redis outage, until agents had a TTL to beat

    @classmethod
    def reported(cls, value: str | None, default: Reason) -> Reason:
        """An agent-reported reason as a member; none, or one outside the set, is ``default``."""
        try:
            return cls(value) if value else default
        except ValueError:
            return default
