"""The pure volume rules (controller/volume_plan.py) as tables of values, over plan()'s real output."""

from __future__ import annotations

from datetime import timedelta

from api.models import Phase, Reason
from controller.actions import CreateMachine, CreateVolume, DestroyVolume, RemoveSession, SetStatus
from controller.plan import plan
from controller.volume_plan import (
    ObservedVolume,
    VolumeRecord,
    is_ours,
    needs_record,
    plan_orphan_volumes,
    twins_to_destroy,
    volume_name,
    with_volume,
)
from tests.controller.test_plan import CFG, SID, T0, ago, make_session

RECORD = VolumeRecord(id="vol_a", name=volume_name(SID), region="ams", size_gb=3)


def test_volume_names_are_fly_names_and_say_whose_they_are() -> None:
    name = volume_name("a-very-long-session-id-" + "x" * 40)
    assert len(name) <= 30 and is_ours(name) and name == name.lower()
    assert volume_name(SID) != volume_name(SID + "x")
    assert not is_ours("fs_short") and not is_ours("data") and not is_ours(None)


def test_a_persistent_session_gets_its_volume_before_its_machine_then_mounts_it() -> None:
    session = make_session(
        "chat", phase=Phase.PENDING, machine_id=None, started_at=None, persistence={"sizeGb": 3}
    )
    planned = plan(session, [], None, T0, CFG)
    assert any(isinstance(a, CreateMachine) for a in planned) and needs_record(session, planned)

    first = with_volume(session, planned, None)
    creates = [a for a in first if isinstance(a, CreateVolume)]
    assert creates == [
        CreateVolume(SID, volume_name(SID), "fra", 3, reason=creates[0].reason, message=creates[0].message)
    ]
    assert not any(isinstance(a, CreateMachine) for a in first)
    assert isinstance(first[0], SetStatus)  # the status still says a create is under way

    then = with_volume(session, planned, RECORD)
    machine = next(a for a in then if isinstance(a, CreateMachine))
    assert (machine.volume_id, machine.region) == ("vol_a", "ams")  # the volume pins the region


def test_sessions_without_persistence_are_left_alone() -> None:
    session = make_session("chat", phase=Phase.PENDING, machine_id=None, started_at=None)
    planned = plan(session, [], None, T0, CFG)
    assert not needs_record(session, planned)
    assert with_volume(session, planned, None) == planned


def test_the_volume_is_destroyed_only_in_front_of_the_removal() -> None:
    deleted = make_session("chat", phase=Phase.SLEEPING, machine_id=None, deleted_at=ago(1), persistence={})
    planned = plan(deleted, [], None, T0, CFG)
    assert isinstance(planned[-1], RemoveSession)
    out = with_volume(deleted, planned, RECORD)
    assert [type(a) for a in out[-2:]] == [DestroyVolume, RemoveSession]
    assert out[-2] == DestroyVolume(SID, "vol_a", reason=out[-2].reason, message=out[-2].message)
    # A live session's plan never destroys its volume, whatever it does with machines.
    for phase in (Phase.RUNNING, Phase.SLEEPING, Phase.CREATING):
        live = make_session("chat", phase=phase, machine_id=None, persistence={})
        assert not any(
            isinstance(a, DestroyVolume) for a in with_volume(live, plan(live, [], None, T0, CFG), RECORD)
        )


def test_orphans_and_twins_after_the_grace_and_never_an_attached_or_foreign_volume() -> None:
    def vol(
        vid: str, name: str, age: float = 60, attached: str | None = None, state: str = "created"
    ) -> ObservedVolume:
        return ObservedVolume(vid, name, state, attached, T0 - timedelta(seconds=age))

    volumes = [
        vol("v1", volume_name("gone")),  # orphan
        vol("v2", volume_name("gone2"), age=1),  # orphan, too young
        vol("v3", volume_name("gone3"), attached="m9"),  # orphan name but mounted: wait
        vol("v4", "their_data"),  # not ours
        vol("v5", volume_name("live")),  # the live session's
        vol("v6", volume_name("live")),  # its twin
        vol("v7", volume_name("gone4"), state="pending_destroy"),  # already going
    ]
    orphans, crowded = plan_orphan_volumes(volumes, {"live"}, T0, 10.0)
    assert [a.volume_id for a in orphans] == ["v1"] and orphans[0].reason == Reason.ORPHAN_VOLUME
    assert set(crowded) == {"live"}
    assert [a.volume_id for a in twins_to_destroy("live", crowded["live"], "v5")] == ["v6"]
    assert twins_to_destroy("live", crowded["live"], None) == []  # no record: the next create adopts one
    _, alone = plan_orphan_volumes([vol("v5", volume_name("live"))], {"live"}, T0, 10.0)
    assert alone == {}


def test_persistence_is_bounded_and_bad_sizes_name_the_field() -> None:
    import pydantic

    from api.models import MAX_PERSISTENCE_GB, SessionSpec

    assert SessionSpec.model_validate({"mode": "chat", "persistence": {}}).persistence is not None
    for size in (0, MAX_PERSISTENCE_GB + 1, "big"):
        try:
            SessionSpec.model_validate({"mode": "chat", "persistence": {"sizeGb": size}})
        except pydantic.ValidationError as err:
            assert err.errors()[0]["loc"] == ("persistence", "sizeGb")
        else:
            raise AssertionError(f"sizeGb={size!r} accepted")
