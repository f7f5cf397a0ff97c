"""A chat's files survive sleep and replacement: one Fly volume per ``spec.persistence`` session.

Real Redis, the emulator over HTTP (volumes are directories on disk there), the real controller and
heartbeat agents that append each chat turn to ``notes.txt`` in their work dir. Every check reads
the state of Redis and the emulator.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from api import keys
from api.models import Phase
from controller.machine_config import VOLUME_MOUNT_PATH
from controller.volume_plan import volume_name
from tests.controller.world import APP, World

pytestmark = pytest.mark.timeout(90)
#: A loaded two-core machine can take seconds to boot a heartbeat agent: no restart for slowness.
SLOW_BOOT = {"boot_grace_seconds": 20.0}


def _notes(world: World, volume_id: str, session_id: str) -> list[tuple[str, str]]:
    volume = world.emulator.volumes.volumes.get(volume_id)
    if volume is None:
        return []
    path = Path(volume.path) / session_id / "work" / "notes.txt"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(line.split(" ", 1)[0], line.split(" ", 1)[1]) for line in lines if " " in line]


async def _noted(world: World, volume_id: str, session_id: str, text: str) -> list[tuple[str, str]] | None:
    notes = _notes(world, volume_id, session_id)
    return notes if any(t == text for _, t in notes) else None


async def test_chat_files_survive_sleep_and_replacement_and_go_with_the_session(world: World) -> None:
    await world.start_controller(**SLOW_BOOT)
    await world.create_session("notes", mode="chat", idleTimeoutSeconds=1, persistence={"sizeGb": 2})
    session = await world.until_launched("notes")

    # The volume was made first, is recorded in Redis, named for the session and mounted at /data.
    record = await world.store.get_volume("notes")
    volume_id = record["id"]
    volume = world.emulator.volumes.volumes[volume_id]
    assert (volume.name, volume.size_gb, volume.region) == (volume_name("notes"), 2, session.status.region)
    first = world.live_machine("notes")
    assert first is not None
    assert first.config["mounts"] == [{"volume": volume_id, "path": VOLUME_MOUNT_PATH}]
    assert world.emulator.volumes.view(volume)["attached_machine_id"] == first.id

    await world.store.send_message("notes", "first note")
    await world.until(lambda: _noted(world, volume_id, "notes", "first note"), what="first note written")

    # Sleep (stop), then a message wakes the same machine: the file is still there, appended to.
    await world.until_phase("notes", Phase.SLEEPING)
    await world.until(lambda: _state(world, first.id, "stopped"), what="machine stopped while sleeping")
    await world.store.send_message("notes", "after sleep")
    await world.until(lambda: _noted(world, volume_id, "notes", "after sleep"), what="note after wake")

    # The machine destroyed behind the controller's back: its replacement mounts the same volume.
    await world.fly.destroy_machine(first.id, force=True)
    await world.store.send_message("notes", "after replacement")
    notes = await world.until(
        lambda: _noted(world, volume_id, "notes", "after replacement"), what="note after replacement"
    )
    second = world.live_machine("notes")
    assert second is not None and second.id != first.id
    assert notes == [(first.id, "first note"), (first.id, "after sleep"), (second.id, "after replacement")]
    assert list(world.emulator.volumes.volumes) == [volume_id], "one volume for the session's whole life"

    # Deleting the session removes its machine, then its volume (files and all), then its keys.
    volume_dir = Path(volume.path)
    await world.store.mark_deleted("notes")
    await world.until(lambda: _gone(world, "notes"), what="session removed")
    assert not world.emulator.volumes.volumes and not volume_dir.exists()
    assert not await world.redis.exists(keys.volume("notes"))
    await world.assert_invariants(set())


async def test_volume_failures_are_reported_and_orphan_volumes_destroyed(world: World) -> None:
    await world.set_faults(capacity_regions=["fra"])
    await world.start_controller(**SLOW_BOOT)
    await world.create_session("cap", mode="chat", persistence={"sizeGb": 1})

    async def refused() -> bool:
        session = await world.store.get("cap")
        return bool(
            session is not None
            and session.status.reason == "NoCapacity"
            and "volume" in (session.status.message or "")
        )

    await world.until(refused, what="status says the volume could not be created")
    events = [e.event for e in await world.store.read_events("cap", count=200)]
    assert any(e.reason == "VolumeCreateFailed" and "no capacity" in (e.message or "") for e in events)
    assert not world.emulator.volumes.volumes and not world.machines("cap")

    # Capacity comes back: the retry makes the volume, then the machine.
    await world.set_faults(capacity_regions=[])
    await world.until_running("cap")
    kept = (await world.store.get_volume("cap"))["id"]

    # Volumes named for no session (and a twin of the live one) go after the grace; others stay.
    ghost = await _create_volume(world, volume_name("ghost"))
    twin = await _create_volume(world, volume_name("cap"))
    foreign = await _create_volume(world, "someone_elses_data")

    async def swept() -> bool:
        ids = set(world.emulator.volumes.volumes)
        return ghost not in ids and twin not in ids

    await world.until(swept, what="orphan and twin volumes destroyed")
    assert set(world.emulator.volumes.volumes) == {kept, foreign}

    # Its host lost (the volume vanishes) and the machine with it: a new, empty volume, said so.
    machine = world.live_machine("cap")
    assert machine is not None
    del world.emulator.volumes.volumes[kept]
    await world.fly.destroy_machine(machine.id, force=True)
    await world.store.send_message("cap", "still there?")

    async def replaced() -> str | None:
        record = await world.store.get_volume("cap")
        new = record.get("id")
        live = world.live_machine("cap")
        return new if new and new != kept and live is not None and live.state == "started" else None

    fresh = await world.until(replaced, what="a new volume and a machine mounting it")
    events = [e.event for e in await world.store.read_events("cap", count=500)]
    assert any(e.reason == "VolumeLost" and kept in (e.message or "") for e in events)
    assert set(world.emulator.volumes.volumes) == {fresh, foreign}
    await world.assert_invariants({"cap"})


# -- helpers ---------------------------------------------------------------------------------------


async def _create_volume(world: World, name: str) -> str:
    response = await world.admin(
        "POST", f"/v1/apps/{APP}/volumes", json={"name": name, "region": "fra", "size_gb": 1}
    )
    volume_id = response.json()["id"]
    assert isinstance(volume_id, str)
    return volume_id


async def _state(world: World, machine_id: str, state: str) -> bool:
    return world.emulator.machines[machine_id].state == state


async def _gone(world: World, session_id: str) -> bool:
    return await world.store.get(session_id) is None
