"""The pure half of warm pools: given a pool, its records and what Fly shows, what to do next.

``plan_pool(inputs, now, settings)`` is to a :class:`~api.pool_models.Pool` what ``plan()`` is to a
session: no I/O, no clock, no randomness beyond what the caller passes (the slot ids of new
machines), so tests are tables of values. The runtime (:mod:`controller.pool_loop`) reads the
inputs and applies the :data:`PoolAction` s one Fly call each (:mod:`controller.pool_executor`).

A pool machine lives through three records (:class:`api.store_pool_claims.PoolMachineRecord`):
``booting`` (created; its agent imports the SDK, connects and says it is booted through the
gateway, ``keys.pool_booted``), then - after one suspend (``mode: suspended``) or stop
(``mode: stopped``) call - ``ready``, and ``claimed`` once a session popped it; a claimed machine's
record goes away when the claim is handed over, and from then on the machine is the session's (its
Fly metadata carries the session tag; the session plan treats it like any machine it created).

The rules, per pool, first that applies wins per machine:

1. **Deleted pool** - every unclaimed machine is destroyed (a ready one is first withdrawn from
   the ready set, so a claim racing the destroy wins or loses cleanly); once none is left and no
   claim is pending, the pool's keys are removed.
2. **Replace** - a machine that failed, whose agent exited or did not boot within ``boot_timeout``, or that
   was built from an older template (image roll-out) is destroyed; the refill replaces it. (A ready
   machine that will not resume is found by the claim that tries it, which falls back to a create
   and destroys it.)
3. **Park** - a booting machine whose agent reported booted is suspended or stopped; once Fly
   shows it at rest it is marked ready.
4. **Size** - fewer unclaimed machines than ``size``: create the difference (never past
   ``maxSize`` counting claims still being handed over); the executor admits these creates only
   when no session is waiting on a create (sessions first). More than ``size``: destroy the
   extra, booting ones first.
5. **Records** - a machine Fly shows with this pool's tag but no record (a controller died between
   the create and the record) is adopted; a record whose machine Fly no longer shows, in a list
   that started well after it was made, is forgotten. A claim whose session is gone, past the
   grace, is dropped and its machine destroyed.

:func:`plan_pool_orphans`: machines tagged for a pool that does not exist are destroyed after the
orphan grace (the pool's removal comes after its drain, so these are leftovers of a crash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

from api.models import Condition
from api.pool_models import Pool, PoolSpec, PoolStatus
from api.store_controller import PoolMachineRecord, PoolState
from controller.machine_state import GONE, KNOWN, MachineState
from controller.observed import ObservedMachine

#: Fly states in which a parked pool machine is claimable.
PARKED = frozenset({MachineState.SUSPENDED, MachineState.STOPPED})


@dataclass(frozen=True)
class PoolPlanSettings:
    #: A created machine whose agent has not said "booted" by then is replaced.
    boot_timeout_seconds: float = 120.0
    #: How long a record may wait for its machine to show in Fly's list before it is forgotten.
    list_lag_seconds: float = 30.0
    #: Grace for machines tagged for a missing pool, and for claims of a missing session.
    orphan_grace_seconds: float = 60.0
    #: A claim not handed over by then (its claimant died and the session went another way) is
    #: dropped and its machine destroyed.
    claim_timeout_seconds: float = 120.0
    #: Creates planned per pass at most (the executor paces them; the rest come next pass).
    max_creates_per_pass: int = 3


# -- actions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatePoolMachine:
    kind: ClassVar[str] = "pool_create"
    pool: str
    slot: str
    reason: str = "Refill"


@dataclass(frozen=True)
class ParkPoolMachine:
    """Suspend or stop a booted machine, then mark it ready."""

    kind: ClassVar[str] = "pool_park"
    pool: str
    record: PoolMachineRecord
    mode: str
    reason: str = "Booted"


@dataclass(frozen=True)
class MarkPoolReady:
    kind: ClassVar[str] = "pool_ready"
    pool: str
    record: PoolMachineRecord
    reason: str = "Parked"


@dataclass(frozen=True)
class DestroyPoolMachine:
    """Destroy an unclaimed machine (``withdraw``: a ready one, taken out of the ready set first)."""

    kind: ClassVar[str] = "pool_destroy"
    pool: str
    machine_id: str
    slot: str | None
    withdraw: bool
    reason: str


@dataclass(frozen=True)
class AdoptPoolMachine:
    kind: ClassVar[str] = "pool_adopt"
    pool: str
    record: PoolMachineRecord
    reason: str = "Adopted"


@dataclass(frozen=True)
class ForgetPoolMachine:
    kind: ClassVar[str] = "pool_forget"
    pool: str
    machine_id: str
    slot: str
    reason: str = "MachineGone"


@dataclass(frozen=True)
class DropPoolClaim:
    """A claim whose session is gone: forget it and destroy its machine."""

    kind: ClassVar[str] = "pool_drop_claim"
    pool: str
    session_id: str
    machine_id: str
    slot: str | None
    reason: str = "SessionGone"


@dataclass(frozen=True)
class FinishPoolClaim:
    """A claim whose machine already carries its session's tag (a claimant died before the end)."""

    kind: ClassVar[str] = "pool_finish_claim"
    pool: str
    session_id: str
    machine_id: str
    slot: str
    reason: str = "Claimed"


@dataclass(frozen=True)
class SetPoolStatus:
    kind: ClassVar[str] = "pool_status"
    pool: str
    status: PoolStatus
    reason: str = "Status"


@dataclass(frozen=True)
class RemovePool:
    kind: ClassVar[str] = "pool_remove"
    pool: str
    slots: tuple[str, ...] = ()
    reason: str = "Drained"


PoolAction = (
    CreatePoolMachine
    | ParkPoolMachine
    | MarkPoolReady
    | DestroyPoolMachine
    | AdoptPoolMachine
    | ForgetPoolMachine
    | DropPoolClaim
    | FinishPoolClaim
    | SetPoolStatus
    | RemovePool
)


# -- inputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolInputs:
    pool: Pool
    state: PoolState
    #: Live machines Fly listed with this pool's tag (claimed ones included: they carry a session tag).
    machines: Sequence[ObservedMachine]
    listed_from: datetime
    session_ids: frozenset[str]
    #: Slot ids for the machines this pass may create (the caller draws them).
    new_slots: Sequence[str] = ()
    last_error: str | None = None
    #: Creates under way (sent, not yet recorded): they count as machines.
    creating: int = 0


def template_digest(spec: PoolSpec) -> str:
    """Short digest of the pool template: machines built from another one are replaced."""
    return hashlib.sha256(spec.template_json().encode()).hexdigest()[:12]


# -- the plan ---------------------------------------------------------------------------------------


def plan_pool(inputs: PoolInputs, now: datetime, settings: PoolPlanSettings) -> list[PoolAction]:
    """The actions that move one pool toward its spec (see the module docstring)."""
    pool, state = inputs.pool, inputs.state
    name = pool.name
    seen = {m.id: m for m in inputs.machines if m.state not in GONE}
    actions: list[PoolAction] = []
    records = _records(inputs, seen, now, settings, actions)
    unclaimed = {mid: r for mid, r in records.items() if r.state != "claimed"}
    pending_claims = sum(1 for r in records.values() if r.state == "claimed")
    if pool.deleted:
        # Rule 1.
        actions += [_destroy(name, record, "PoolDeleted") for _mid, record in sorted(unclaimed.items())]
        if not unclaimed and not pending_claims and not state.claims:
            slots = tuple(sorted({r.slot for r in state.records.values()} | set(state.booted)))
            return [*actions, RemovePool(name, slots)]
        return actions + [_status(inputs, now, unclaimed, pending_claims, seen)]
    digest = template_digest(pool.spec)
    keep: dict[str, PoolMachineRecord] = {}
    for mid, record in sorted(unclaimed.items()):
        machine = seen.get(mid)
        why = _replace_reason(record, machine, digest, inputs, now, settings)
        if why is not None:
            actions.append(_destroy(name, record, why))  # rule 2
            continue
        keep[mid] = record
        if record.state == "booting" and record.slot in state.booted:  # rule 3
            if machine is not None and machine.state in PARKED:
                actions.append(MarkPoolReady(name, record))
            elif machine is None or machine.state == MachineState.STARTED:
                actions.append(ParkPoolMachine(name, record, pool.spec.mode))
    actions += _size(inputs, keep, pending_claims, settings)
    return actions + [_status(inputs, now, keep, pending_claims, seen)]


def _records(
    inputs: PoolInputs,
    seen: dict[str, ObservedMachine],
    now: datetime,
    settings: PoolPlanSettings,
    actions: list[PoolAction],
) -> dict[str, PoolMachineRecord]:
    """Rule 5: the records, made to agree with Fly's list and with the sessions (appends actions)."""
    name, state = inputs.pool.name, inputs.state
    records = dict(state.records)
    claimed = set(state.claims.values())
    for machine in seen.values():
        if machine.session_id is None and machine.id not in records and machine.id not in claimed:
            if machine.pool_slot is None:
                continue
            record = PoolMachineRecord(
                machine_id=machine.id,
                slot=machine.pool_slot,
                state="booting",
                template=machine.pool_template or "",
                created_at=machine.created_at,
            )
            records[machine.id] = record
            actions.append(AdoptPoolMachine(name, record))
    lag = timedelta(seconds=settings.list_lag_seconds)
    for mid, record in list(records.items()):
        if mid not in seen and record.state != "claimed" and record.created_at + lag < inputs.listed_from:
            actions.append(ForgetPoolMachine(name, mid, record.slot))
            del records[mid]
    for session_id, mid in sorted(state.claims.items()):
        held = records.get(mid)
        listed = seen.get(mid)
        claimed_at = held.claimed_at if held is not None and held.claimed_at else None
        if listed is not None and listed.session_id == session_id:
            # Handed over, all but the bookkeeping: the machine is the session's.
            slot = held.slot if held is not None else (listed.pool_slot or "")
            actions.append(FinishPoolClaim(name, session_id, mid, slot))
            records.pop(mid, None)
        elif session_id not in inputs.session_ids and (claimed_at is None or claimed_at + lag < now):
            # Its session was deleted before the claim was handed over.
            actions.append(DropPoolClaim(name, session_id, mid, held.slot if held else None))
            records.pop(mid, None)
        elif claimed_at is not None and claimed_at + timedelta(seconds=settings.claim_timeout_seconds) < now:
            # Never handed over: the session went on without it (it would have finished it by now).
            actions.append(
                DropPoolClaim(name, session_id, mid, held.slot if held else None, reason="ClaimTimeout")
            )
            records.pop(mid, None)
    return records


def _size(
    inputs: PoolInputs, keep: dict[str, PoolMachineRecord], pending_claims: int, settings: PoolPlanSettings
) -> list[PoolAction]:
    """Rule 4: create the missing machines (within maxSize), destroy the extra (booting first)."""
    name, size, limit = inputs.pool.name, inputs.pool.spec.size, inputs.pool.spec.limit
    have = len(keep) + inputs.creating
    if have < size:
        room = max(0, min(size - have, limit - have - pending_claims, settings.max_creates_per_pass))
        return [CreatePoolMachine(name, slot) for slot in list(inputs.new_slots)[:room]]
    out: list[PoolAction] = []
    if len(keep) > size:
        extra = sorted(keep.values(), key=lambda r: (r.state == "ready", r.created_at, r.machine_id))
        for record in extra[: len(keep) - size]:
            out.append(_destroy(name, record, "ScaledDown"))
            del keep[record.machine_id]
    return out


def plan_pool_orphans(
    machines: Sequence[ObservedMachine], pools: set[str], now: datetime, settings: PoolPlanSettings
) -> list[DestroyPoolMachine]:
    """Unclaimed machines tagged for a pool that does not exist, past the grace."""
    out: list[DestroyPoolMachine] = []
    for m in sorted(machines, key=lambda m: m.id):
        if not m.managed or not m.unclaimed_pool_machine or m.pool in pools:
            continue
        if m.state in GONE or m.state not in KNOWN:
            continue
        if (now - m.created_at).total_seconds() < settings.orphan_grace_seconds:
            continue
        out.append(DestroyPoolMachine(m.pool or "", m.id, m.pool_slot, withdraw=False, reason="PoolGone"))
    return out


def _replace_reason(
    record: PoolMachineRecord,
    machine: ObservedMachine | None,
    digest: str,
    inputs: PoolInputs,
    now: datetime,
    settings: PoolPlanSettings,
) -> str | None:
    if record.template and record.template != digest:
        return "TemplateChanged"
    if machine is None:
        return None  # not listed yet (or gone: rule 5 forgets it once the list is sure)
    if machine.state == MachineState.FAILED or machine.host_status not in ("ok", ""):
        return "MachineFailed"
    if record.state == "booting":
        booted = record.slot in inputs.state.booted
        if not booted and (now - record.created_at).total_seconds() > settings.boot_timeout_seconds:
            return "BootTimeout"
        if not booted and machine.state == MachineState.STOPPED:
            return "AgentExited"  # nothing stops a booting machine but its agent's exit
    return None


def _destroy(pool: str, record: PoolMachineRecord, reason: str) -> DestroyPoolMachine:
    return DestroyPoolMachine(
        pool, record.machine_id, record.slot, withdraw=record.state == "ready", reason=reason
    )


def _status(
    inputs: PoolInputs,
    now: datetime,
    unclaimed: dict[str, PoolMachineRecord],
    pending_claims: int,
    seen: dict[str, ObservedMachine],
) -> SetPoolStatus:
    pool = inputs.pool
    ready = sum(1 for r in unclaimed.values() if r.state == "ready")
    booting = len(unclaimed) - ready
    claimed = pending_claims + sum(1 for m in seen.values() if m.session_id is not None)
    ok = ready >= pool.spec.size and not pool.deleted
    reason = "Deleting" if pool.deleted else ("Filled" if ok else "Filling")
    message = f"{ready}/{pool.spec.size} ready, {booting} booting"
    previous = {c.type: c for c in pool.status.conditions}
    old = previous.get("Ready")
    value = "True" if ok else "False"
    since = old.lastTransitionTime if old is not None and old.status == value else now
    condition = Condition(
        type="Ready", status=value, reason=reason, message=message, lastTransitionTime=since
    )
    status = PoolStatus(
        ready=ready,
        booting=booting,
        claimed=claimed,
        conditions=[condition],
        lastError=inputs.last_error,
        observedGeneration=pool.metadata.generation,
        updatedAt=pool.status.updatedAt,
    )
    if status != pool.status:
        status = status.model_copy(update={"updatedAt": now})
    return SetPoolStatus(pool.name, status)
