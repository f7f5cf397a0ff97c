"""The Fly client under the emulator's faults: error mapping, retries, ambiguity, rate limits.

Every assertion is about outcomes and about what the emulator saw (its request stats), never
about elapsed time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from controller.fly_errors import (
    AmbiguousCreate,
    Capacity,
    NotFound,
    Permanent,
    RateLimited,
    Transient,
)
from tests.controller.fly_harness import TOKEN, FlyHarness, sleeper_config


@pytest.fixture
async def fly(tmp_path: Path) -> AsyncIterator[FlyHarness]:
    harness = FlyHarness(tmp_path, regions=["iad", "fra", "ams"])
    try:
        yield harness
    finally:
        await harness.aclose()


async def test_ambiguous_create_is_not_retried_and_the_machine_is_found_by_metadata(fly: FlyHarness) -> None:
    client = fly.client()
    await fly.set_faults(create_timeout_rate=1.0)
    tag = {"flyswarm_session": "s1", "flyswarm_launch": "01LAUNCH"}
    with pytest.raises(AmbiguousCreate) as caught:
        await client.create_machine(sleeper_config(tag))
    assert caught.value.status == 408
    assert caught.value.metadata == tag
    assert await fly.count("Machines_create") == 1  # never re-sent blindly
    await fly.set_faults(create_timeout_rate=0.0)
    found = await client.list_all_machines(metadata={"flyswarm_launch": "01LAUNCH"})
    assert len(found) == 1


async def test_server_errors_on_create_are_ambiguous_too(fly: FlyHarness) -> None:
    client = fly.client()
    await fly.set_faults(error_rate=1.0)
    with pytest.raises(AmbiguousCreate) as caught:
        await client.create_machine(sleeper_config({"flyswarm_launch": "L2"}))
    assert caught.value.status in (500, 502, 503)
    assert await fly.count("Machines_create") == 1


async def test_rate_limited_create_is_retried_because_nothing_happened(fly: FlyHarness) -> None:
    # Emulator limits on, ours off: the 4th create in a burst bounces with 429 and is re-sent.
    await fly.set_faults(rate_limits=True)
    client = fly.client(rate_limits=False)
    machines = [
        await client.create_machine(sleeper_config({"batch": "r"}), skip_launch=True) for _ in range(5)
    ]
    assert len({m.id for m in machines}) == 5
    assert await fly.count("Machines_create", 429) >= 1
    assert await fly.count("Machines_create", 200) == 5
    assert len(await client.list_all_machines(metadata={"batch": "r"})) == 5  # no duplicates


async def test_transient_errors_are_retried_within_the_deadline_and_succeed(fly: FlyHarness) -> None:
    client = fly.client(rate_limits=False)
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    await fly.set_faults(error_rate=0.5, seed=7)
    await fly.reset_stats()
    results = [await client.get_machine(machine.id) for _ in range(20)]
    assert all(m.id == machine.id for m in results)
    stats = await fly.stats()
    assert stats["server_errors"] >= 1
    # Each failure cost exactly one extra request; nothing else was sent.
    assert stats["total"] == 20 + stats["server_errors"]


async def test_transient_errors_surface_once_the_deadline_is_spent(fly: FlyHarness) -> None:
    client = fly.client(rate_limits=False, call_deadline=0.5)
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    await fly.set_faults(error_rate=1.0)
    await fly.reset_stats()
    with pytest.raises(Transient) as caught:
        await client.get_machine(machine.id)
    assert caught.value.status in (500, 502, 503)
    assert caught.value.fly_request_id
    assert await fly.count("Machines_show") >= 2  # it did retry, then gave up


@pytest.mark.parametrize("knob", ["rate_limits", "error_rate"])
async def test_mutations_are_retried_on_transient_errors(fly: FlyHarness, knob: str) -> None:
    client = fly.client(rate_limits=False)
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    await fly.set_faults(
        **({"rate_limits": True} if knob == "rate_limits" else {"error_rate": 0.5, "seed": 3})
    )
    for i in range(6):
        await client.set_metadata(machine.id, f"k{i}", str(i))
    await fly.set_faults(rate_limits=False, error_rate=0.0)
    assert await client.get_metadata(machine.id) == {f"k{i}": str(i) for i in range(6)}
    assert await fly.count("Machines_upsert_metadata", 204) == 6


async def test_permanent_errors_surface_at_once(fly: FlyHarness) -> None:
    client = fly.client()
    with pytest.raises(Permanent) as caught:
        await client.create_machine(sleeper_config(), region="mars")
    assert caught.value.status == 422
    with pytest.raises(Permanent) as bad_token:
        await fly.client(api_token="wrong-token").list_machines()
    assert bad_token.value.status == 401
    with pytest.raises(NotFound):
        await client.get_machine("0000000000dead")
    stats = await fly.stats()
    assert await fly.count("Machines_create") == 1
    assert await fly.count("Machines_list") == 1
    assert await fly.count("Machines_show") == 1
    assert stats["total"] == 3


async def test_capacity_errors_are_typed_on_create_and_on_start(fly: FlyHarness) -> None:
    client = fly.client()
    stopped = await client.create_machine(sleeper_config(), region="ams", skip_launch=True)
    await fly.set_faults(capacity_regions=["ams"])
    with pytest.raises(Capacity) as on_create:
        await client.create_machine(sleeper_config(), region="ams")
    assert on_create.value.error_status == "insufficient_capacity"
    with pytest.raises(Capacity) as on_start:
        await client.start_machine(stopped.id)
    assert on_start.value.status == 409
    assert await fly.count("Machines_create") == 2  # the failed one was not retried
    # Another region still works: the caller's fallback.
    assert (await client.create_machine(sleeper_config(), region="fra", skip_launch=True)).region == "fra"


async def test_a_burst_stays_under_flys_rate_limits(fly: FlyHarness) -> None:
    # Both limiters on: ours must keep the emulator's from ever answering 429.
    await fly.set_faults(rate_limits=True)
    client = fly.client()
    seed = await client.create_machine(sleeper_config({"burst": "1"}), skip_launch=True)
    await fly.reset_stats()

    async def creates() -> None:
        await asyncio.gather(
            *(client.create_machine(sleeper_config({"burst": "1"}), skip_launch=True) for _ in range(5))
        )

    async def gets() -> None:
        await asyncio.gather(*(client.get_machine(seed.id) for _ in range(14)))

    async def metadata_writes() -> None:
        await asyncio.gather(*(client.set_metadata(seed.id, f"k{i}", "v") for i in range(5)))

    async def lists() -> None:
        await asyncio.gather(*(client.list_machines(metadata={"burst": "1"}) for _ in range(5)))

    await asyncio.gather(creates(), gets(), metadata_writes(), lists())
    stats = await fly.stats()
    assert stats["rate_limited"] == 0
    assert stats["total"] == 5 + 14 + 5 + 5
    assert len(await client.list_all_machines(metadata={"burst": "1"})) == 6


async def test_client_side_limit_fails_fast_when_no_token_fits_the_deadline(fly: FlyHarness) -> None:
    client = fly.client(call_deadline=0.5)
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    await fly.reset_stats()
    outcomes = await asyncio.gather(
        *(client.set_metadata(machine.id, f"k{i}", "v") for i in range(6)), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert refused and all(o.status is None for o in refused)  # refused locally, never sent
    assert await fly.count("Machines_upsert_metadata") == 6 - len(refused)


async def test_metrics_hook_counts_calls_by_action_and_status(fly: FlyHarness) -> None:
    seen: Counter[tuple[str, str]] = Counter()
    client = fly.client(on_response=lambda action, status, seconds: seen.update([(action, status)]))
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    await client.get_machine(machine.id)
    with pytest.raises(NotFound):
        await client.get_machine("0000000000dead")
    assert seen == Counter({("create", "200"): 1, ("get", "200"): 1, ("get", "404"): 1})


async def test_the_token_never_reaches_logs_or_error_messages(fly: FlyHarness) -> None:
    client = fly.client(rate_limits=False, call_deadline=0.3)
    machine = await client.create_machine(sleeper_config(), skip_launch=True)
    await fly.set_faults(error_rate=1.0)
    with structlog.testing.capture_logs() as logs, pytest.raises(Transient) as caught:
        await client.get_machine(machine.id)
    assert any(entry["event"] == "fly_call_retried" for entry in logs)
    assert TOKEN not in repr(logs)
    assert TOKEN not in str(caught.value) and TOKEN not in repr(caught.value)
    await fly.set_faults(error_rate=0.0)
    with pytest.raises(Permanent) as unauthorized:
        await fly.client(api_token=TOKEN + "-wrong").get_machine(machine.id)
    assert TOKEN not in str(unauthorized.value)
