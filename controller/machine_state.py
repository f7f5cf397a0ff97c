"""Fly machine states and what each means to us: the one definition, used everywhere.

The plan, the executor, the reconciler, the Fly client's types and the emulator all classify
states from here (fly-machines-api.md §4), so they can never disagree about, say, whether
``replaced`` is a machine going away or a machine being updated.

* **Resting** states are where a machine stays until someone acts: ``created``, ``started``,
  ``stopped``, ``suspended``, ``failed``.
* **Transient** states are passed through: wait, look again soon, and escalate only past Fly's
  wedge thresholds. ``replaced`` and ``migrated`` are final only for an old *version* of a
  machine; the machine id lives on in a new version, so a machine shown in them is waited on like
  a transition, never treated as gone. ``launch_failed`` leads to ``destroyed``.
* **Gone**: ``destroyed``. Fly keeps answering a destroyed machine for a while (with its events);
  for us it is absent.
* **At rest** (destroyable without ``force``): ``stopped``, ``suspended``, ``failed``, ``created``
  (Fly answers 412 to a plain destroy in any other state).
* **Settled**, for the reconciler: a resting state or gone - nothing will change without an action,
  so a trigger need not re-read it.

A state this module does not know (Fly adds some now and then) is *unknown*: waited on, never
destroyed.
"""

from __future__ import annotations

from enum import StrEnum


class MachineState(StrEnum):
    CREATING = "creating"
    CREATED = "created"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESTARTING = "restarting"
    UPDATING = "updating"
    REPLACING = "replacing"
    REPLACED = "replaced"
    MIGRATED = "migrated"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    LAUNCH_FAILED = "launch_failed"

    @classmethod
    def parse(cls, value: str | None) -> MachineState | None:
        """The member for ``value``, or None for a state we do not know."""
        try:
            return cls(value) if value else None
        except ValueError:
            return None


S = MachineState

RESTING = frozenset({S.CREATED, S.STARTED, S.STOPPED, S.SUSPENDED, S.FAILED})
TRANSIENT = frozenset(
    {
        S.CREATING,
        S.STARTING,
        S.STOPPING,
        S.RESTARTING,
        S.SUSPENDING,
        S.DESTROYING,
        S.UPDATING,
        S.REPLACING,
        S.LAUNCH_FAILED,
        S.REPLACED,
        S.MIGRATED,
    }
)
GONE = frozenset({S.DESTROYED})
KNOWN = RESTING | TRANSIENT | GONE
#: Destroyable without ``force``.
AT_REST = frozenset({S.STOPPED, S.SUSPENDED, S.FAILED, S.CREATED})
#: Nothing changes without an action: a trigger need not re-read the machine.
SETTLED = frozenset({S.STARTED, S.STOPPED, S.SUSPENDED, S.FAILED, S.DESTROYED})
#: Transient states with Fly's longer wedge threshold (10 min instead of 5).
SLOW = frozenset({S.UPDATING})
#: States a live machine is "in progress" toward running in (for choosing which duplicate to keep).
BOOTING = frozenset({S.CREATING, S.CREATED, S.STARTING, S.RESTARTING, S.UPDATING, S.REPLACING})
#: States of a machine that is asleep or falling asleep (ditto).
SLEEPING = frozenset({S.STOPPED, S.SUSPENDED, S.STOPPING, S.SUSPENDING})
#: States the Machines API's ``wait`` endpoint accepts (``settled`` is a pseudo-state).
WAITABLE = frozenset({"started", "stopped", "suspended", "destroyed", "failed", "settled"})
#: States the list endpoint's ``state`` filter accepts.
LISTABLE = frozenset({S.CREATED, S.STARTED, S.STOPPED, S.SUSPENDED})

assert RESTING.isdisjoint(TRANSIENT) and GONE.isdisjoint(RESTING | TRANSIENT)
assert KNOWN == frozenset(MachineState), "every state is classified exactly once"
