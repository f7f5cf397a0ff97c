"""The Fly client against the real emulator (in-process ASGI): lifecycle, leases, lists, metadata.

Error mapping, retries and rate limits under faults are in test_fly_faults.py; the OpenAPI
contract of every request is in test_fly_spec.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.fly import FlyClientConfig, normalize_base_url
from controller.fly_errors import Conflict, LeaseHeld, Permanent, PreconditionFailed, WaitTimeout
from controller.fly_types import MachineGuest
from tests.controller.fly_harness import TOKEN, FlyHarness, exiting_config, sleeper_config


async def test_machine_goes_through_its_whole_lifecycle(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(
        sleeper_config(
            {"flyswarm_session": "s1"}, guest=MachineGuest(cpu_kind="shared", cpus=1, memory_mb=256)
        ),
        region="fra",
    )
    assert machine.state in ("created", "starting", "started")
    assert machine.metadata == {"flyswarm_session": "s1"}
    assert machine.region == "fra"

    started = await client.wait_machine(machine.id, "started", timeout=10)
    assert started.state == "started"

    await client.stop_machine(machine.id, signal="SIGTERM", timeout=2)
    stopped = await client.wait_machine(machine.id, "stopped", version=started.version, timeout=10)
    assert stopped.state == "stopped"
    assert (await client.get_machine(machine.id)).state == "stopped"

    await client.start_machine(machine.id)
    assert (await client.wait_machine(machine.id, ["started", "failed"], timeout=10)).state == "started"

    await client.suspend_machine(machine.id)
    assert (await client.wait_machine(machine.id, "suspended", timeout=10)).state == "suspended"

    assert await client.destroy_machine(machine.id) is True
    assert (await client.wait_machine(machine.id, "destroyed", timeout=10)).state == "destroyed"
    # Fly keeps answering for a while after a destroy (the exit code stays readable).
    assert (await client.get_machine(machine.id)).state == "destroyed"
    # Destroying what is gone is success, reported as "nothing to do".
    assert await client.destroy_machine(machine.id) is False
    assert [m.id for m in await client.list_all_machines()] == []
    deleted = await client.list_all_machines(include_deleted=True)
    assert [(m.id, m.state) for m in deleted] == [(machine.id, "destroyed")]


async def test_restart_update_and_cordon(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(sleeper_config({"k": "v"}))
    started = await client.wait_machine(machine.id, "started", timeout=10)

    await client.restart_machine(machine.id, signal="SIGTERM", timeout=1)
    assert (await client.wait_machine(machine.id, "started", timeout=10)).state == "started"

    current = await client.get_machine(machine.id)
    assert current.config is not None
    new_config = current.config.model_copy(update={"env": {"NEW": "1"}})
    updated = await client.update_machine(machine.id, new_config, current_version=current.version)
    assert updated.version != started.version
    assert updated.config is not None and updated.config.env == {"NEW": "1"}
    # The old version is stale now: a conditional update with it changes nothing.
    with pytest.raises(Conflict) as stale:
        await client.update_machine(machine.id, new_config, current_version=started.version)
    assert not isinstance(stale.value, LeaseHeld)

    await client.wait_machine(machine.id, "started", timeout=10)
    await client.cordon_machine(machine.id)
    assert (await client.get_machine(machine.id)).cordoned is True
    await client.uncordon_machine(machine.id)
    assert (await client.get_machine(machine.id)).cordoned is False


async def test_non_forced_destroy_of_a_running_machine_is_refused(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(sleeper_config())
    await client.wait_machine(machine.id, "started", timeout=10)
    with pytest.raises(PreconditionFailed):
        await client.destroy_machine(machine.id)
    assert await client.destroy_machine(machine.id, force=True) is True
    assert (await client.wait_machine(machine.id, "destroyed", timeout=10)).state == "destroyed"


async def test_exit_is_recorded_as_an_event_with_its_code(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(exiting_config(3))
    with pytest.raises(ValueError, match="version"):
        await client.wait_machine(machine.id, ["stopped", "failed"], timeout=10)
    await client.wait_machine(machine.id, ["stopped", "failed"], version=machine.version, timeout=10)
    events = await client.list_events(machine.id, limit=50)
    exits = [e.exit_event for e in events if e.exit_event is not None]
    assert exits and exits[0].exit_code == 3
    assert len(await client.list_events(machine.id, limit=1)) == 1
    assert (await client.get_machine(machine.id)).last_exit is not None


async def test_wait_keeps_long_polling_after_408_until_the_state_is_reached(tmp_path: Path) -> None:
    # Booting takes ~2.5 s while each wait request asks for 1 s: the first ones end in 408.
    fly = FlyHarness(tmp_path, transition_delays={"starting": 2.5})
    try:
        client = fly.client()
        machine = await client.create_machine(sleeper_config())
        result = await client.wait_machine(machine.id, "started", timeout=20, long_poll=1)
        assert result.state == "started"
        assert await fly.count("Machines_wait", 408) >= 1
        assert await fly.count("Machines_wait", 200) == 1
    finally:
        await fly.aclose()


async def test_wait_gives_up_at_its_overall_deadline(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    with pytest.raises(WaitTimeout):
        await client.wait_machine(machine.id, "started", timeout=2, long_poll=1)
    assert await fly.count("Machines_wait", 408) >= 1


async def test_lease_nonce_is_threaded_and_other_holders_get_lease_held(fly: FlyHarness) -> None:
    ours, theirs = fly.client(), fly.client()
    machine = await ours.create_machine(sleeper_config())
    await ours.wait_machine(machine.id, "started", timeout=10)

    async with ours.lease(machine.id, ttl=13, description="reconcile") as nonce:
        lease = await theirs.get_lease(machine.id)
        assert lease is not None and lease.nonce == nonce and lease.description == "reconcile"
        # Without the nonce, even our own token is refused: the nonce is the key.
        with pytest.raises(LeaseHeld):
            await theirs.stop_machine(machine.id)
        with pytest.raises(LeaseHeld):
            await theirs.acquire_lease(machine.id)
        await ours.set_metadata(machine.id, "phase", "stopping", nonce=nonce)
        await ours.stop_machine(machine.id, nonce=nonce)
        await ours.wait_machine(machine.id, "stopped", version=machine.version, timeout=10)
        await ours.start_machine(machine.id, nonce=nonce)
    # Released on exit: someone else can take it at once.
    assert await ours.get_lease(machine.id) is None
    again = await theirs.acquire_lease(machine.id, ttl=5)
    assert again.nonce and again.nonce != nonce
    await theirs.release_lease(machine.id, again.nonce)
    assert await fly.count("Machines_release_lease", 200) == 2


async def test_lease_is_released_when_the_block_fails(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    with pytest.raises(RuntimeError):
        async with client.lease(machine.id):
            raise RuntimeError("boom")
    assert await client.get_lease(machine.id) is None


async def test_lease_is_released_when_the_block_is_cancelled(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    entered = asyncio.Event()

    async def hold() -> None:
        async with client.lease(machine.id):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await client.get_lease(machine.id) is None


async def test_lease_outlives_its_ttl_because_it_is_refreshed(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    async with client.lease(machine.id, ttl=2) as nonce:
        await asyncio.sleep(3.0)  # longer than the ttl: only refreshes keep it alive
        await client.set_metadata(machine.id, "still", "ours", nonce=nonce)
        lease = await client.get_lease(machine.id)
        assert lease is not None and lease.nonce == nonce
    assert await fly.count("Machines_create_lease", 201) >= 3


async def test_releasing_an_expired_lease_is_fine(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    lease = await client.acquire_lease(machine.id, ttl=1)
    await asyncio.sleep(1.5)
    assert lease.nonce is not None
    await client.release_lease(machine.id, lease.nonce)  # "lease not found" is not an error
    assert await fly.count("Machines_release_lease", 404) == 1


async def test_create_with_lease_ttl_returns_a_nonce_that_unlocks_the_machine(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(sleeper_config(), lease_ttl=30, skip_launch=True)
    assert machine.nonce
    with pytest.raises(LeaseHeld):
        await client.start_machine(machine.id)
    await client.start_machine(machine.id, nonce=machine.nonce)
    await client.release_lease(machine.id, machine.nonce)
    assert (await client.wait_machine(machine.id, "started", timeout=10)).state == "started"


async def test_list_pages_through_every_machine(fly: FlyHarness) -> None:
    client = fly.client(rate_limits=False)
    created = {
        (await client.create_machine(sleeper_config({"batch": "b1"}), skip_launch=True)).id for _ in range(7)
    }
    first = await client.list_machines(metadata={"batch": "b1"}, limit=3)
    assert len(first.machines) == 3
    assert first.next_cursor is not None
    await fly.reset_stats()
    everything = await client.list_all_machines(metadata={"batch": "b1"}, page_size=3)
    assert {m.id for m in everything} == created
    assert await fly.count("Machines_list") == 3  # 3 + 3 + 1
    assert (await client.list_machines()).next_cursor is None


async def test_list_filters_by_metadata_state_and_region(fly: FlyHarness) -> None:
    client = fly.client(rate_limits=False)
    a_x = await client.create_machine(sleeper_config({"team": "a", "role": "x"}), region="fra")
    a_y = await client.create_machine(sleeper_config({"team": "a", "role": "y"}), skip_launch=True)
    b_x = await client.create_machine(sleeper_config({"team": "b", "role": "x"}), skip_launch=True)
    await client.wait_machine(a_x.id, "started", timeout=10)

    async def ids(**filters: object) -> set[str]:
        return {m.id for m in await client.list_all_machines(**filters)}  # type: ignore[arg-type]

    assert await ids(metadata={"team": "a", "role": "x"}) == {a_x.id}
    assert await ids(metadata={"team": "a"}) == {a_x.id, a_y.id}
    assert await ids(metadata={"role": "x"}) == {a_x.id, b_x.id}
    assert await ids(metadata={"team": "c"}) == set()
    assert await ids(states=["started"]) == {a_x.id}
    assert await ids(states=["created", "stopped"]) == {a_y.id, b_x.id}
    assert await ids(region="fra") == {a_x.id}
    summary = await client.list_all_machines(metadata={"team": "b"}, summary=True)
    assert [m.id for m in summary] == [b_x.id]


async def test_metadata_can_be_read_set_patched_and_deleted(fly: FlyHarness) -> None:
    client = fly.client()
    machine = await client.create_machine(sleeper_config({"a": "1", "b": "2"}), skip_launch=True)
    await client.set_metadata(machine.id, "c", "3")
    assert await client.get_metadata_key(machine.id, "c") == "3"
    await client.update_metadata(machine.id, {"a": "10", "b": None}, machine_version=machine.version)
    assert await client.get_metadata(machine.id) == {"a": "10", "c": "3"}
    await client.delete_metadata(machine.id, "c")
    assert await client.get_metadata_key(machine.id, "c") is None
    with pytest.raises(PreconditionFailed):
        await client.update_metadata(machine.id, {"a": "11"}, machine_version="01STALE0000000000000000000")
    assert (await client.get_machine(machine.id)).metadata == {"a": "10"}


def test_token_never_shows_in_config_or_client_reprs(fly: FlyHarness) -> None:
    config = fly.config()
    assert TOKEN not in repr(config)
    assert TOKEN not in repr(fly.client())


def test_base_url_comes_from_fly_api_hostname() -> None:
    config = FlyClientConfig.from_env("app", {"FLY_API_HOSTNAME": "127.0.0.1:4280", "FLY_API_TOKEN": "t0k3n"})
    assert config.base_url == "http://127.0.0.1:4280"
    assert config.api_token == "t0k3n"
    assert FlyClientConfig.from_env("app", {}).base_url == "https://api.machines.dev"
    assert normalize_base_url("api.machines.dev") == "https://api.machines.dev"
    assert normalize_base_url("http://_api.internal:4280/") == "http://_api.internal:4280"


async def test_macaroon_tokens_keep_their_own_scheme_and_no_token_sends_no_header(fly: FlyHarness) -> None:
    await fly.client(api_token="FlyV1 " + TOKEN).list_machines()
    assert fly.recorder.exchanges[-1].request.headers["authorization"] == "FlyV1 " + TOKEN
    with pytest.raises(Permanent) as caught:
        await fly.client(api_token="").list_machines()
    assert caught.value.status == 401
    assert "authorization" not in fly.recorder.exchanges[-1].request.headers
