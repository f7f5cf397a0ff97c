"""The Fly client's volume calls against the emulator: typed answers, Fly's errors, Fly's limits."""

from __future__ import annotations

import pytest

from controller import fly_errors
from controller.fly_volumes import FlyVolumes
from tests.controller.fly_harness import FlyHarness


async def test_volume_calls_round_trip_and_map_fly_errors(fly: FlyHarness) -> None:
    volumes = FlyVolumes(fly.client())
    made = await volumes.create("fs_notes", region="fra", size_gb=1)
    assert (made.name, made.region, made.size_gb, made.state) == ("fs_notes", "fra", 1, "created")
    assert [v.id for v in await volumes.list_volumes()] == [made.id]
    assert (await volumes.extend(made.id, 2)).size_gb == 2
    assert (await volumes.get(made.id)).attached_machine_id is None

    await fly.set_faults(capacity_regions=["ams"])
    with pytest.raises(fly_errors.Capacity):
        await volumes.create("fs_notes", region="ams", size_gb=1)
    with pytest.raises(fly_errors.Permanent):
        await volumes.create("Not-A-Name", region="fra", size_gb=1)
    await fly.set_faults(capacity_regions=[], create_timeout_rate=0.0, error_rate=1.0)
    with pytest.raises(fly_errors.AmbiguousCreate):  # a 5xx on a create: it may have happened
        await volumes.create("fs_notes", region="fra", size_gb=1)
    await fly.set_faults(error_rate=0.0)

    assert await volumes.delete(made.id) is True
    assert await volumes.delete(made.id) is False  # gone: a repeated delete is done
    with pytest.raises(fly_errors.NotFound):
        await volumes.get(made.id)
    assert await fly.count("Volumes_create", 200) == 1
