"""Tables for the pure pool plan: pool + records + observed machines + now -> actions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from api.models import Metadata
from api.pool_models import Pool, PoolSpec
from api.store_controller import PoolMachineRecord, PoolMachineState, PoolState
from controller.observed import ObservedMachine
from controller.pool_plan import (
    AdoptPoolMachine,
    CreatePoolMachine,
    DestroyPoolMachine,
    DropPoolClaim,
    FinishPoolClaim,
    ForgetPoolMachine,
    ParkPoolMachine,
    PoolAction,
    PoolInputs,
    PoolPlanSettings,
    RemovePool,
    SetPoolStatus,
    plan_pool,
    plan_pool_orphans,
    template_digest,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SETTINGS = PoolPlanSettings(boot_timeout_seconds=60, list_lag_seconds=10, orphan_grace_seconds=30)
SLOTS = ("n1", "n2", "n3")


def pool(size: int = 2, *, deleted: bool = False, image: str | None = None, **spec: Any) -> Pool:
    meta = Metadata(name="warm", generation=3, deletionTimestamp=NOW if deleted else None)
    return Pool(
        metadata=meta, spec=PoolSpec.model_validate({"size": size, "template": {"image": image}, **spec})
    )


def record(
    mid: str, state: PoolMachineState = "ready", *, p: Pool | None = None, age: float = 100, **kw: Any
) -> PoolMachineRecord:
    digest = template_digest((p or pool()).spec)
    return PoolMachineRecord(
        machine_id=mid,
        slot=f"s-{mid}",
        state=state,
        template=digest,
        created_at=NOW - timedelta(seconds=age),
        **kw,
    )


def machine(
    mid: str, state: str = "suspended", *, session: str | None = None, age: float = 100
) -> ObservedMachine:
    return ObservedMachine(
        id=mid,
        state=state,
        region="fra",
        session_id=session,
        launch_id=None,
        managed=True,
        created_at=NOW - timedelta(seconds=age),
        pool="warm",
        pool_slot=f"s-{mid}",
        pool_template=template_digest(pool().spec),
    )


def run(
    p: Pool, records: list[PoolMachineRecord], machines: list[ObservedMachine], **kw: Any
) -> list[PoolAction]:
    state = PoolState(
        records={r.machine_id: r for r in records},
        ready=frozenset(r.machine_id for r in records if r.state == "ready"),
        claims=kw.pop("claims", {}),
        booted=kw.pop("booted", {}),
    )
    inputs = PoolInputs(
        pool=p,
        state=state,
        machines=machines,
        listed_from=NOW - timedelta(seconds=1),
        session_ids=frozenset(kw.pop("sessions", ())),
        new_slots=SLOTS,
        **kw,
    )
    return plan_pool(inputs, NOW, SETTINGS)


def kinds(actions: list[PoolAction]) -> list[str]:
    return [a.kind for a in actions if not isinstance(a, SetPoolStatus)]


def status_of(actions: list[PoolAction]) -> SetPoolStatus:
    found = [a for a in actions if isinstance(a, SetPoolStatus)]
    assert len(found) == 1
    return found[0]


def test_an_empty_pool_is_filled_up_to_size_and_says_it_is_filling() -> None:
    actions = run(pool(size=2), [], [])
    assert [a for a in actions if isinstance(a, CreatePoolMachine)] == [
        CreatePoolMachine("warm", "n1"),
        CreatePoolMachine("warm", "n2"),
    ]
    status = status_of(actions).status
    assert (status.ready, status.booting, status.observedGeneration) == (0, 0, 3)
    assert status.conditions[0].status == "False" and status.conditions[0].reason == "Filling"


def test_creates_under_way_and_pending_claims_count_against_size_and_max_size() -> None:
    assert kinds(run(pool(size=3), [record("a")], [machine("a")], creating=2)) == []
    # maxSize 3 with one claim still being handed over: only one more machine fits.
    claimed = record("c", "claimed", session="s1", claimed_at=NOW)
    actions = run(
        pool(size=3, maxSize=3),
        [record("a"), claimed],
        [machine("a"), machine("c")],
        sessions={"s1"},
        claims={"s1": "c"},
    )
    assert kinds(actions) == ["pool_create"]


def test_a_booted_machine_is_parked_in_the_pools_mode_and_a_full_pool_is_ready() -> None:
    booting = record("b", "booting", age=5)
    actions = run(
        pool(size=2, mode="stopped"),
        [record("a"), booting],
        [machine("a"), machine("b", "started")],
        booted={"s-b": NOW},
    )
    assert [a for a in actions if isinstance(a, ParkPoolMachine)] == [
        ParkPoolMachine("warm", booting, "stopped")
    ]
    # Not booted yet: nothing to do but wait.
    assert kinds(run(pool(size=2), [record("a"), booting], [machine("a"), machine("b", "started")])) == []
    full = run(pool(size=1), [record("a")], [machine("a")])
    assert status_of(full).status.conditions[0].status == "True"


def test_failed_timed_out_and_outdated_machines_are_replaced_ready_ones_withdrawn_first() -> None:
    old_template = record("t", p=pool(image="old"))
    stuck = record("b", "booting", age=61)
    failed = record("f")
    exited = record("x", "booting", age=5)
    actions = run(
        pool(size=3),
        [old_template, stuck, failed, exited],
        [
            machine("t"),
            machine("b", "started", age=61),
            machine("f", "failed"),
            machine("x", "stopped", age=5),
        ],
    )
    destroys = {a.machine_id: a for a in actions if isinstance(a, DestroyPoolMachine)}
    assert {m: d.reason for m, d in destroys.items()} == {
        "t": "TemplateChanged",
        "b": "BootTimeout",
        "f": "MachineFailed",
        "x": "AgentExited",
    }
    assert destroys["t"].withdraw and destroys["f"].withdraw and not destroys["b"].withdraw
    assert kinds(actions).count("pool_create") == 3


def test_shrinking_destroys_booting_machines_before_ready_ones() -> None:
    records = [record("a"), record("b"), record("c", "booting", age=5)]
    actions = run(pool(size=1), records, [machine("a"), machine("b"), machine("c", "started")])
    destroyed = [a.machine_id for a in actions if isinstance(a, DestroyPoolMachine)]
    assert destroyed == ["c", "a"]
    assert all(a.reason == "ScaledDown" for a in actions if isinstance(a, DestroyPoolMachine))


def test_a_deleted_pool_is_drained_then_removed() -> None:
    actions = run(pool(deleted=True), [record("a"), record("b", "booting")], [machine("a"), machine("b")])
    assert sorted(a.machine_id for a in actions if isinstance(a, DestroyPoolMachine)) == ["a", "b"]
    assert not any(isinstance(a, RemovePool | CreatePoolMachine) for a in actions)
    # A pending claim holds the removal back; once nothing is left, the record goes.
    claimed = record("c", "claimed", session="s1", claimed_at=NOW)
    assert not any(
        isinstance(a, RemovePool)
        for a in run(pool(deleted=True), [claimed], [machine("c")], sessions={"s1"}, claims={"s1": "c"})
    )
    assert [a for a in run(pool(deleted=True), [], [], booted={"x": NOW}) if isinstance(a, RemovePool)] == [
        RemovePool("warm", ("x",))
    ]


def test_records_follow_flys_list_and_claims_follow_their_sessions() -> None:
    # Listed but unrecorded (a crash between create and record): adopted. Recorded long ago but not
    # listed: forgotten. Recorded just now and not listed yet (list lag): kept.
    actions = run(pool(size=2), [record("gone"), record("new", age=0)], [machine("stray")])
    assert [a.record.machine_id for a in actions if isinstance(a, AdoptPoolMachine)] == ["stray"]
    assert [a.machine_id for a in actions if isinstance(a, ForgetPoolMachine)] == ["gone"]
    # A claim whose machine already carries the session's tag is finished; one whose session is gone
    # (past the grace) is dropped and its machine destroyed; one of a live session is left alone.
    handed = record("h", "claimed", session="s1", claimed_at=NOW - timedelta(seconds=5))
    orphan = record("o", "claimed", session="s2", claimed_at=NOW - timedelta(seconds=60))
    live = record("l", "claimed", session="s3", claimed_at=NOW - timedelta(seconds=60))
    actions = run(
        pool(size=0),
        [handed, orphan, live],
        [machine("h", "started", session="s1"), machine("o"), machine("l")],
        sessions={"s1", "s3"},
        claims={"s1": "h", "s2": "o", "s3": "l"},
    )
    assert [(a.session_id, a.machine_id) for a in actions if isinstance(a, FinishPoolClaim)] == [("s1", "h")]
    assert [(a.session_id, a.machine_id) for a in actions if isinstance(a, DropPoolClaim)] == [("s2", "o")]
    assert status_of(actions).status.claimed == 2  # s1's machine (the session's now) and s3's pending claim


def test_pool_machines_of_a_missing_pool_are_orphans_after_the_grace_and_session_machines_never() -> None:
    machines = [machine("old"), machine("young", age=1), machine("claimed", "started", session="s1")]
    found = plan_pool_orphans(machines, set(), NOW, SETTINGS)
    assert [(d.machine_id, d.reason) for d in found] == [("old", "PoolGone")]
    assert plan_pool_orphans(machines, {"warm"}, NOW, SETTINGS) == []
