"""Expectations: what this controller did to Fly that Fly's (lagging) list may not show yet.

Fly's ``list`` reads an eventually consistent store: a machine created a second ago may be
missing, a destroyed one may linger in its old state. A controller that trusted the list alone
would create a second machine for a session whose first machine is still "invisible", or act
twice on a machine it already stopped. controller-runtime's ReplicaSet controller has the same
problem with its informer cache and solves it with *expectations*; so do we.

Every Fly mutation the executor makes is recorded here, stamped with when we learnt it:

* a **create** (with its launch id, before the call, and the machine once Fly answered);
* a **state change** (the machine as a ``GET`` right after the call showed it, or as we expect it);
* a **destroy** (a tombstone).

:meth:`Expectations.view` merges one session's listed machines with these records: the newer
of the two wins, created machines the list lacks are added, tombstoned ones are hidden. A record
is dropped once a list that *started after it was made* agrees with it (:meth:`settle`), or when
it is older than ``max_age`` (then the list is trusted again, and the plan's duplicate and orphan
rules clean up anything that slipped through).

Memory only, by design: after a restart the Redis launch record (written before every create)
plays the same role for creates, and everything else is re-observed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from controller.machine_state import GONE
from controller.observed import LaunchRecord, ObservedMachine


@dataclass(frozen=True)
class _MachineRecord:
    """What we know about one machine from our own actions."""

    session_id: str | None
    machine: ObservedMachine | None  # None: a tombstone (we destroyed it)
    machine_id: str
    recorded_at: datetime


class Expectations:
    """In-memory expectations of one controller, shared by its workers (one event loop)."""

    def __init__(self, *, max_age_seconds: float = 120.0) -> None:
        self.max_age = timedelta(seconds=max_age_seconds)
        self._machines: dict[str, _MachineRecord] = {}
        self._launches: dict[str, LaunchRecord] = {}

    # -- recording --------------------------------------------------------------------------------

    def launch_requested(self, session_id: str, launch_id: str, at: datetime) -> None:
        """A create is about to be sent (the same fact the Redis launch record holds)."""
        self._launches[session_id] = LaunchRecord(launch_id=launch_id, requested_at=at)

    def launch_cancelled(self, session_id: str, launch_id: str) -> None:
        """The create failed before reaching Fly: no machine will appear for this launch."""
        launch = self._launches.get(session_id)
        if launch is not None and launch.launch_id == launch_id:
            del self._launches[session_id]

    def machine_created(self, session_id: str, machine: ObservedMachine, at: datetime) -> None:
        launch = self._launches.get(session_id)
        if launch is not None:
            self._launches[session_id] = replace(launch, machine_id=machine.id)
        self._machines[machine.id] = _MachineRecord(session_id, machine, machine.id, at)

    def machine_changed(self, session_id: str | None, machine: ObservedMachine, at: datetime) -> None:
        """We changed the machine (or just looked at it with a GET): this is its newest known state."""
        if machine.state in GONE:
            # Fly answers GET with state destroyed for a while after a destroy: gone all the same.
            self.machine_destroyed(session_id, machine.id, at)
            return
        current = self._machines.get(machine.id)
        if current is not None and current.machine is None:
            return  # a destroyed machine does not come back
        self._machines[machine.id] = _MachineRecord(session_id, machine, machine.id, at)

    def machine_destroyed(self, session_id: str | None, machine_id: str, at: datetime) -> None:
        self._machines[machine_id] = _MachineRecord(session_id, None, machine_id, at)

    def forget_session(self, session_id: str) -> None:
        self._launches.pop(session_id, None)
        for machine_id in [k for k, r in self._machines.items() if r.session_id == session_id]:
            # Tombstones outlive the session: a lingering listed machine must stay hidden.
            if self._machines[machine_id].machine is not None:
                del self._machines[machine_id]

    # -- reading ----------------------------------------------------------------------------------

    def launch(self, session_id: str, stored: LaunchRecord | None) -> LaunchRecord | None:
        """The newer of the stored launch record and ours."""
        ours = self._launches.get(session_id)
        if ours is None:
            return stored
        if stored is None or stored.requested_at < ours.requested_at:
            return ours
        if stored.launch_id == ours.launch_id and stored.machine_id is None and ours.machine_id:
            return replace(stored, machine_id=ours.machine_id)
        return stored

    def view(
        self, session_id: str, listed: Iterable[ObservedMachine], listed_from: datetime
    ) -> list[ObservedMachine]:
        """The session's machines: the list (started at ``listed_from``), corrected by what we did since."""
        merged: dict[str, ObservedMachine] = {}
        for machine in listed:
            record = self._machines.get(machine.id)
            if record is None:
                merged[machine.id] = machine
            elif record.machine is None:
                continue  # destroyed by us; the list has not caught up
            elif record.recorded_at >= listed_from or _newer(record.machine, machine):
                # The list started before we learnt this (or shows an older version): ours wins.
                merged[machine.id] = record.machine
            else:
                merged[machine.id] = machine
        for record in self._machines.values():
            if record.session_id != session_id or record.machine is None or record.machine_id in merged:
                continue
            merged[record.machine_id] = record.machine
        return sorted(merged.values(), key=lambda m: (m.created_at, m.id))

    def hidden(self, machine_id: str) -> bool:
        """True for a machine we destroyed that a lagging list may still show."""
        record = self._machines.get(machine_id)
        return record is not None and record.machine is None

    def extra_machines(self, listed_ids: set[str]) -> list[ObservedMachine]:
        """Machines we know of that the list does not show (creates the list has not caught up with)."""
        return [
            r.machine
            for r in self._machines.values()
            if r.machine is not None and r.machine_id not in listed_ids
        ]

    def pending_creates(self) -> int:
        """Creates requested whose machine the list has not shown yet."""
        return len(self._launches)

    # -- settling ---------------------------------------------------------------------------------

    def settle(self, listed: Iterable[ObservedMachine], listed_from: datetime, now: datetime) -> None:
        """Drop records that a list started at ``listed_from`` confirms, and records past ``max_age``."""
        by_id = {m.id: m for m in listed}
        for machine_id, record in list(self._machines.items()):
            if now - record.recorded_at > self.max_age:
                del self._machines[machine_id]
                continue
            if record.recorded_at >= listed_from:
                continue  # the list may predate what we did
            seen = by_id.get(machine_id)
            if record.machine is None:
                if seen is None or seen.state in GONE:
                    del self._machines[machine_id]
            elif seen is not None and not _newer(record.machine, seen):
                del self._machines[machine_id]
        for session_id, launch in list(self._launches.items()):
            if now - launch.requested_at > self.max_age:
                del self._launches[session_id]
            elif launch.machine_id and launch.machine_id in by_id and launch.requested_at < listed_from:
                del self._launches[session_id]

    def __len__(self) -> int:
        return len(self._machines) + len(self._launches)


def _newer(ours: ObservedMachine, listed: ObservedMachine) -> bool:
    """True when our record is more recent than the listed machine (compare Fly's updated_at)."""
    ours_at = ours.updated_at or ours.created_at
    listed_at = listed.updated_at or listed.created_at
    return ours_at > listed_at
