"""Places where the emulator once answered differently from Fly (issue 11, item 7), held in place.

Each test names the Fly behaviour; local/EMULATOR.md lists the differences that remain on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from local.emulator_config import CONFIG_FIELDS, NESTED_FIELDS, NESTED_SCHEMAS
from tests.local.emulator_harness import APP, SLEEP, Emulator, EmulatorFactory, eventually, script_config


async def test_a_destroyed_machine_still_answers_with_its_exit_code_then_is_forgotten(
    make_emulator: EmulatorFactory,
) -> None:
    emu = await make_emulator(destroyed_retention=0.5)
    machine = await emu.create(script_config("import sys; sys.exit(3)", auto_destroy=True))
    await emu.wait(machine["id"], "destroyed")
    gone = await emu.get(machine["id"])
    assert gone["state"] == "destroyed"
    exit_event = next(e for e in gone["events"] if e["type"] == "exit")["request"]["exit_event"]
    assert exit_event["exit_code"] == 3
    assert exit_event["error"] == "" and exit_event["guest_error"] == ""
    assert [e["type"] for e in await emu.events(machine["id"])][:2] == ["destroy", "destroy"]
    # Mutations see no machine: a repeated destroy is the 404 clients treat as done.
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    assert (await emu.client.delete(url)).status_code == 404
    assert (await emu.post(machine["id"], "start")).status_code == 404

    async def forgotten() -> bool:
        return (await emu.client.get(url)).status_code == 404

    await eventually(forgotten)
    assert (await emu.client.get(url + "/events")).status_code == 404
    listed = (await emu.client.get(f"/v1/apps/{APP}/machines", params={"include_deleted": "true"})).json()
    assert [m["id"] for m in listed] == [machine["id"]]


@pytest.mark.parametrize("states", ["stopped", "stopped,failed", "suspended,stopped"])
async def test_waiting_for_stopped_without_a_version_is_a_400(emu: Emulator, states: str) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    url = f"/v1/apps/{APP}/machines/{machine['id']}/wait"
    r = await emu.client.get(url, params={"state": states, "timeout": 1})
    assert r.status_code == 400
    assert "version" in r.json()["error"] and r.json()["error"].startswith("invalid_argument")
    # The same wait with the version (or the deprecated instance_id) is accepted.
    for name in ("version", "instance_id"):
        r = await emu.client.get(url, params={"state": states, "timeout": 1, name: machine["version"]})
        assert r.status_code == 408, r.text


async def test_a_launch_failure_says_why_in_the_exit_events_error(emu: Emulator) -> None:
    machine = await emu.create({"image": "no-such-image"})
    await emu.wait(machine["id"], "failed")
    exit_event = next(e for e in await emu.events(machine["id"]) if e["type"] == "exit")
    assert exit_event["status"] == "failed"
    assert "no-such-image" in exit_event["request"]["exit_event"]["error"]
    assert exit_event["request"]["exit_event"]["guest_error"] == ""


def _restart_gaps(events: list[dict[str, Any]]) -> list[int]:
    """Milliseconds from each policy exit to the boot that followed it, oldest first."""
    ordered = list(reversed(events))
    gaps = []
    for i, event in enumerate(ordered):
        if event["type"] == "exit" and event["request"]["exit_event"]["restarting"]:
            boot = next(
                (e for e in ordered[i + 1 :] if e["type"] == "start" and e["status"] == "started"), None
            )
            if boot is not None:
                gaps.append(boot["timestamp"] - event["timestamp"])
    return gaps


async def test_the_always_policy_backs_off_between_restarts(make_emulator: EmulatorFactory) -> None:
    emu = await make_emulator(restart_backoff=0.1, restart_backoff_max=0.4)
    machine = await emu.create(script_config("pass", policy="always"))

    async def five_restarts() -> bool:
        return len(_restart_gaps(await emu.events(machine["id"], limit=50))) >= 5

    await eventually(five_restarts)
    gaps = _restart_gaps(await emu.events(machine["id"], limit=50))
    # 0.1, 0.2, 0.4, then capped at 0.4 s (event timestamps are milliseconds).
    assert gaps[0] >= 100 and gaps[1] >= 200 and gaps[2] >= 400 and gaps[3] >= 400, gaps
    # During the backoff the machine is not stopped (always never rests there), and a stop wins.
    stop = await emu.post(machine["id"], "stop")
    if stop.status_code == 412:  # caught in the short window where it runs: wait for the next exit
        await eventually(lambda: _in_backoff(emu, machine["id"]))
        stop = await emu.post(machine["id"], "stop")
    assert stop.status_code == 200, stop.text
    await emu.wait(machine["id"], "stopped")
    assert (await emu.get(machine["id"]))["state"] == "stopped"


async def _in_backoff(emu: Emulator, machine_id: str) -> bool:
    return emu.state.machines[machine_id].restart_pending


def test_the_fields_the_emulator_keeps_are_the_specs(openapi_path: Path) -> None:
    schemas = json.loads(openapi_path.read_text())["components"]["schemas"]
    assert set(schemas["fly.MachineConfig"]["properties"]) == CONFIG_FIELDS
    for key, schema in NESTED_SCHEMAS.items():
        assert set(schemas[schema]["properties"]) == NESTED_FIELDS[key], schema
