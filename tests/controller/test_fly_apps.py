"""More than one agent app: creates spread over the apps, every rule kept per app.

Pacing is checked with an injected clock (no wall time); the client and the controller against the
emulator (its per-app create limit on) on the state they leave: machines per app, launch records,
the emulator's 429 count.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from api.models import Phase
from controller.executor import CreatePacer
from controller.fly_apps import AppSpreader, NoAllowedApp, parse_app_list
from controller.observed import TAG_LAUNCH, TAG_MANAGED, TAG_SESSION, LaunchRecord
from controller.ratelimit import Limit
from controller.settings import ControllerSettings
from local.emulator_faults import FaultSettings
from tests.controller.fly_harness import APP as HARNESS_APP
from tests.controller.fly_harness import FlyHarness, sleeper_config
from tests.controller.world import APP, World, make_world

pytestmark = pytest.mark.timeout(150)

APP_B = f"{APP}-b"
#: The client's pacing of one app's creates (Fly's 1/s burst 3 at the default 90 % margin).
CREATE_LIMIT = Limit(rate=1.0, burst=3).scaled(0.9)
#: A machine's first heartbeat may take long on a loaded two-core machine; nothing here waits on it.
BOOT_GRACE = 30.0


# -- settings and the choice of app (pure, injected clock) ------------------------------------------


def test_the_apps_setting_is_a_validated_list_and_the_single_app_means_a_list_of_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_app_list(" app-a, app-b ,") == ("app-a", "app-b")
    assert ControllerSettings(fly_app_name="solo").agent_apps == ("solo",)
    monkeypatch.setenv("FLYSWARM_FLY_APPS", "app-a,app-b")
    assert ControllerSettings().agent_apps == ("app-a", "app-b")
    for bad, why in (("app-a,App_B", "not a Fly app name"), ("app-a,app-a", "listed twice")):
        monkeypatch.setenv("FLYSWARM_FLY_APPS", bad)
        with pytest.raises(ValidationError) as caught:
            ControllerSettings()
        assert "FLYSWARM_FLY_APPS" in str(caught.value) and why in str(caught.value)


def test_two_apps_admit_a_burst_of_creates_twice_as_fast_as_one() -> None:
    now = [50.0]

    def last_slot(apps: tuple[str, ...]) -> tuple[float, dict[str, int]]:
        pacer = CreatePacer(CREATE_LIMIT, apps=apps, clock=lambda: now[0])
        slots = [pacer.slot(f"s{i}") for i in range(12)]
        per_app = {app: sum(1 for s in slots if s.app == app) for app in apps}
        return max(s.wait for s in slots), per_app

    one, one_split = last_slot(("a",))
    two, two_split = last_slot(("a", "b"))
    assert one_split == {"a": 12}
    assert two_split == {"a": 6, "b": 6}
    # 12 creates: one app spends its burst of 2 then waits 10 tokens; two apps 2 x 2 then 4 each.
    assert one == pytest.approx(10 / CREATE_LIMIT.rate)
    assert two == pytest.approx(4 / CREATE_LIMIT.rate)


def test_a_create_goes_to_the_soonest_token_then_the_least_loaded_app_within_the_allowed_ones() -> None:
    now = [0.0]
    load = {"a": 5, "b": 1, "c": 0}
    spreader = AppSpreader(("a", "b", "c"), CREATE_LIMIT, load=lambda: load, clock=lambda: now[0])
    assert spreader.choose_app() == "c"  # every bucket full: least loaded
    assert spreader.choose_app(["a", "b", "unknown"]) == "b"  # a pool narrowed to a and b
    for _ in range(2):
        assert spreader.reserve(["c"]).app == "c"
    # c has no token left: the loaded apps with a token come first, then load decides.
    assert spreader.choose_app() == "b"
    load["b"] = 9
    assert spreader.choose_app() == "a"
    with pytest.raises(NoAllowedApp):
        spreader.choose_app(["elsewhere"])


# -- the client: each machine addressed in its own app ----------------------------------------------


async def test_a_machine_in_the_second_app_is_reached_there_even_by_a_client_that_never_saw_it(
    fly: FlyHarness,
) -> None:
    second = f"{HARNESS_APP}-b"
    await fly.set_faults(rate_limits=True)
    creator = fly.client(apps=(HARNESS_APP, second))
    # Both limiters on: four creates per app at once stay under each app's limit.
    made = await asyncio.gather(
        *(
            creator.create_machine(sleeper_config({"k": "v"}), skip_launch=True, app=app)
            for app in (HARNESS_APP, second) * 4
        )
    )
    assert (await fly.stats())["rate_limited"] == 0
    in_b = [m.id for m, app in zip(made, (HARNESS_APP, second) * 4, strict=True) if app == second]
    assert {fly.state.machines[mid].app for mid in in_b} == {second}
    assert {m.id for m in await creator.list_all_machines(app=second)} == set(in_b)
    assert creator.machine_counts() == {HARNESS_APP: 4, second: 4}

    fresh = fly.client(apps=(HARNESS_APP, second))  # a restarted controller: knows no machine yet
    target = in_b[0]
    await fresh.start_machine(target)
    assert (await fresh.wait_machine(target, "started", timeout=10)).state == "started"
    assert fresh.app_of(target) == second
    assert await fresh.destroy_machine(target, force=True) is True
    assert (await fresh.wait_machine(target, "destroyed", timeout=10)).ok
    assert fly.state.machines[target].state == "destroyed"
    # A machine in no app is gone, as with one app.
    assert await fresh.destroy_machine("0000000000000", force=True) is False


# -- the controller -------------------------------------------------------------------------------


@pytest.fixture
async def limited_world(redis_url: str, redis_client: aioredis.Redis, tmp_path: Path) -> Any:
    """A world whose emulator enforces Fly's rate limits (creates per app)."""
    async with make_world(redis_url, redis_client, tmp_path, faults=FaultSettings(rate_limits=True)) as w:
        yield w


def _app_of(world: World, session_id: str) -> str:
    machine = world.live_machine(session_id)
    assert machine is not None
    return str(machine.app)


async def test_creates_spread_over_two_apps_and_orphans_and_duplicates_are_handled_in_the_second(
    limited_world: World,
) -> None:
    world = limited_world
    await world.start_controller(fly_apps=f"{APP},{APP_B}", boot_grace_seconds=BOOT_GRACE)
    ids = [f"sp{i}" for i in range(6)]
    for sid in ids:
        await world.create_session(sid, mode="chat", idleTimeoutSeconds=0)
    for sid in ids:
        await world.until_running(sid, timeout=60)
    apps = {sid: _app_of(world, sid) for sid in ids}
    per_app = {app: sum(1 for a in apps.values() if a == app) for app in (APP, APP_B)}
    assert min(per_app.values()) >= 2, per_app
    stats = (await world.admin("GET", "/_admin/stats")).json()
    assert stats["rate_limited"] == 0
    for sid in ids:  # the launch record names the app the machine lives in
        launch = LaunchRecord.from_store(await world.store.get_launch(sid))
        assert launch is not None and launch.app == apps[sid]

    in_b = next(sid for sid in ids if apps[sid] == APP_B)
    original = world.live_machine(in_b)
    assert original is not None
    twin = await world.fly.create_machine(
        sleeper_config({TAG_MANAGED: "true", TAG_SESSION: in_b, TAG_LAUNCH: "twin"}), app=APP_B
    )
    orphan = await world.fly.create_machine(
        sleeper_config({TAG_MANAGED: "true", TAG_SESSION: "nobody", TAG_LAUNCH: "x"}), app=APP_B
    )

    async def cleaned() -> bool:
        return world.emulator.machines[orphan.id].state == "destroyed" and len(world.machines(in_b)) == 1

    await world.until(cleaned, timeout=30, what="orphan and duplicate destroyed in the second app")
    session = await world.until_running(in_b, timeout=60)
    assert session.status.machineId in (original.id, twin.id)

    # Creates whose answer is lost (408 after Fly made the machine) are looked up in their own app:
    # the two apps are even, so the next two creates go one to each, and neither is made twice.
    await world.set_faults(create_timeout_rate=1.0)
    late = ["amb0", "amb1"]
    for sid in late:
        await world.create_session(sid, mode="chat", idleTimeoutSeconds=0)
    for sid in late:
        await world.until_running(sid, timeout=60)
        assert len(world.machines(sid, live=False)) == 1, f"{sid}: the ambiguous create was repeated"
    assert {_app_of(world, sid) for sid in late} == {APP, APP_B}
    await world.assert_invariants(set(ids + late))


async def test_a_session_in_an_app_removed_from_the_settings_is_restarted_and_torn_down_there(
    world: World,
) -> None:
    first = await world.start_controller(fly_apps=f"{APP},{APP_B}", boot_grace_seconds=BOOT_GRACE)
    for sid in ("r0", "r1"):
        await world.create_session(sid, mode="chat", idleTimeoutSeconds=0)
        await world.until_running(sid, timeout=60)
    in_b = [sid for sid in ("r0", "r1") if _app_of(world, sid) == APP_B]
    assert in_b, "the second create did not go to the less loaded app"
    sid = in_b[0]
    await first.shutdown()
    # The second app is dropped from the settings; its session's machine is still ours to look after.
    await world.start_controller(fly_apps=APP, boot_grace_seconds=BOOT_GRACE)
    before = await world.until_running(sid, timeout=60)
    machine_id = before.status.machineId
    assert machine_id is not None
    await world.admin("POST", f"/_admin/machines/{machine_id}/crash")

    async def restarted() -> bool:
        session = await world.store.get(sid)
        return session is not None and session.status.restarts >= 1 and session.status.phase is Phase.RUNNING

    await world.until(restarted, timeout=60, what="restart in the removed app")
    after = await world.until_running(sid, timeout=60)
    assert after.status.machineId == machine_id and world.emulator.machines[machine_id].app == APP_B
    # The removed app is still listed while a launch record names it: a duplicate there is seen.
    twin = await world.fly.create_machine(
        sleeper_config({TAG_MANAGED: "true", TAG_SESSION: sid, TAG_LAUNCH: "twin"}), app=APP_B
    )
    await world.until(
        lambda: _state_is(world, twin.id, "destroyed"),
        timeout=60,
        what="duplicate destroyed in the removed app",
    )
    for gone in ("r0", "r1"):
        await world.store.mark_deleted(gone)

    async def removed() -> bool:
        return all([await world.store.get(s) is None for s in ("r0", "r1")]) and not world.machines()

    await world.until(
        removed, timeout=60, what="both sessions removed and their machines destroyed in both apps"
    )
    assert world.emulator.machines[machine_id].state == "destroyed"
    await world.assert_invariants(set())


async def _state_is(world: World, machine_id: str, state: str) -> bool:
    return bool(world.emulator.machines[machine_id].state == state)
