"""The Fly Machines emulator's API semantics, driven in-process over httpx's ASGI transport.

Machines here are real subprocesses (``init.exec`` runs small Python scripts), so the tests see
exit codes, signals and frozen processes as the kernel reports them.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from local.emulator import FaultSettings
from tests.local.emulator_harness import APP, SLEEP, Emulator, EmulatorFactory, eventually, script_config


async def started_and_ready(emu: Emulator, config: dict[str, Any], **body: Any) -> dict[str, Any]:
    machine = await emu.create(config, **body)
    await emu.wait(machine["id"], "started")

    async def ready() -> bool:
        return "ready" in await emu.log(machine["id"])

    await eventually(ready)
    return machine


def proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def gone(pid: int) -> bool:
    return proc_state(pid) in (None, "Z", "X")


# --- create / get / list -------------------------------------------------------------------


async def test_create_returns_a_machine_in_fly_shape_that_boots_asynchronously(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), name="worker-1", region="fra")

    assert re.fullmatch(r"[0-9a-f]{14}", machine["id"])
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", machine["version"])
    assert machine["instance_id"] == machine["version"]
    assert machine["state"] == "created"
    assert machine["name"] == "worker-1" and machine["region"] == "fra"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", machine["created_at"])
    assert machine["host_status"] == "ok" and machine["cordoned"] is False
    assert machine["events"][0]["type"] == "launch"
    waited = await emu.wait(machine["id"], "started")
    assert waited["ok"] is True and waited["state"] == "started" and waited["version"] == machine["version"]
    assert (await emu.get(machine["id"]))["state"] == "started"


async def test_create_drops_unknown_config_fields_as_fly_does(emu: Emulator) -> None:
    config = script_config(
        SLEEP,
        auto_stop_machines=True,
        services=[{"internal_port": 8080, "autostop": "stop"}],
        guest={"cpus": 2, "memory_mb": 512, "cpu_kind": "shared", "vcpus": 9},
    )
    machine = await emu.create(config, skip_launch=True)
    assert "auto_stop_machines" not in machine["config"]
    assert machine["config"]["guest"] == {"cpus": 2, "memory_mb": 512, "cpu_kind": "shared"}
    assert machine["config"]["services"] == [{"internal_port": 8080, "autostop": "stop"}]
    assert "auto_stop_machines" not in (await emu.get(machine["id"]))["config"]


async def test_create_rejects_bad_configs_with_400_naming_the_field(emu: Emulator) -> None:
    for body, field in (
        ({"config": {"env": {"A": "b"}}}, "config.image"),
        ({"config": {"image": "x", "env": {"A": 1}}}, "config.env"),
        ({"config": {"image": "x", "restart": {"policy": "sometimes"}}}, "config.restart"),
        ({"config": {"image": "x", "stop_config": {"timeout": "ten seconds"}}}, "config.stop_config"),
        ({"config": "nope"}, "config"),
        ({"config": {"image": "x", "guest": {"cpus": -3}}}, "config.guest.cpus"),
        ({"config": {"image": "x", "guest": {"cpus": 3}}}, "config.guest.cpus"),
        ({"config": {"image": "x", "guest": {"memory_mb": 1}}}, "config.guest.memory_mb"),
        ({"config": {"image": "x", "guest": {"memory_mb": 300}}}, "config.guest.memory_mb"),
        ({"config": {"image": "x", "guest": {"cpu_kind": "turbo"}}}, "config.guest.cpu_kind"),
        ({"config": {"image": "x", "mounts": [{"volume": "vol_nope", "path": "/d"}]}}, "config.mounts"),
    ):
        r = await emu.client.post(f"/v1/apps/{APP}/machines", json=body)
        assert r.status_code == 400, body
        assert r.json()["error"].startswith("invalid_argument"), body
        assert field in r.json()["error"], (body, r.json())
    assert await emu.client.get(f"/v1/apps/{APP}/machines") and not emu.state.machines


async def test_an_update_without_a_config_is_refused_and_changes_nothing(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP))
    await emu.wait(machine["id"], "started")
    pid = await emu.pid(machine["id"])
    for kwargs in ({}, {"json": {}}, {"json": {"skip_launch": False}}):
        r = await emu.client.post(f"/v1/apps/{APP}/machines/{machine['id']}", **kwargs)
        assert r.status_code == 400 and "config is required" in r.json()["error"], r.text
    after = await emu.get(machine["id"])
    assert (after["state"], after["version"]) == ("started", machine["version"])
    assert await emu.pid(machine["id"]) == pid


async def test_machine_names_are_unique_per_app(emu: Emulator) -> None:
    await emu.create(script_config(SLEEP), name="same", skip_launch=True)
    r = await emu.client.post(
        f"/v1/apps/{APP}/machines", json={"config": script_config(SLEEP), "name": "same"}
    )
    assert r.status_code == 409
    await emu.create(script_config(SLEEP), app="other", name="same", skip_launch=True)


async def test_skip_launch_keeps_machine_created_until_started(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    r = await emu.client.get(
        f"/v1/apps/{APP}/machines/{machine['id']}/wait", params={"state": "started", "timeout": 1}
    )
    assert r.status_code == 408
    r = await emu.post(machine["id"], "start")
    assert r.status_code == 200 and r.json()["previous_state"] == "created"
    await emu.wait(machine["id"], "started")


async def test_get_of_unknown_machine_is_404_in_fly_shape(emu: Emulator) -> None:
    r = await emu.client.get(f"/v1/apps/{APP}/machines/0123456789abcd")
    assert r.status_code == 404
    assert r.json() == {"error": "machine not found"}
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    assert (await emu.client.get(f"/v1/apps/other/machines/{machine['id']}")).status_code == 404


async def test_list_filters_by_metadata_region_and_state(emu: Emulator) -> None:
    a = await emu.create(script_config(SLEEP, metadata={"team": "ios", "tier": "1"}), skip_launch=True)
    b = await emu.create(
        script_config(SLEEP, metadata={"team": "ios", "tier": "2"}), skip_launch=True, region="fra"
    )
    c = await emu.create(script_config(SLEEP, metadata={"team": "web"}), skip_launch=True)

    async def ids(**params: Any) -> set[str]:
        r = await emu.client.get(f"/v1/apps/{APP}/machines", params=params)
        assert r.status_code == 200, r.text
        return {m["id"] for m in r.json()}

    assert await ids() == {a["id"], b["id"], c["id"]}
    assert await ids(**{"metadata.team": "ios"}) == {a["id"], b["id"]}
    assert await ids(**{"metadata.team": "ios", "metadata.tier": "2"}) == {b["id"]}
    assert await ids(region="fra") == {b["id"]}
    assert await ids(state="created,stopped") == {a["id"], b["id"], c["id"]}
    assert await ids(state="started") == set()


async def test_list_summary_omits_config_events_and_host_status(emu: Emulator) -> None:
    await emu.create(script_config(SLEEP), skip_launch=True)
    r = await emu.client.get(f"/v1/apps/{APP}/machines", params={"summary": "true"})
    [machine] = r.json()
    assert "config" not in machine and "events" not in machine and "host_status" not in machine
    assert machine["state"] == "created" and machine["name"]


async def test_list_pages_with_limit_and_fly_next_cursor(emu: Emulator) -> None:
    created = [(await emu.create(script_config(SLEEP), skip_launch=True))["id"] for _ in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        r = await emu.client.get(f"/v1/apps/{APP}/machines", params=params)
        assert r.status_code == 200
        seen.extend(m["id"] for m in r.json())
        pages += 1
        cursor = r.headers.get("fly-next-cursor")
        if cursor is None:
            break
    assert seen == created and pages == 3
    bad_params: list[dict[str, Any]] = [
        {"limit": 0},
        {"limit": 1001},
        {"cursor": "c1.x"},
        {"limit": 2, "cursor": "x"},
    ]
    for bad in bad_params:
        assert (await emu.client.get(f"/v1/apps/{APP}/machines", params=bad)).status_code == 400


async def test_destroyed_machines_are_hidden_unless_include_deleted(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    assert (await emu.client.delete(f"/v1/apps/{APP}/machines/{machine['id']}")).status_code == 200
    await emu.wait(machine["id"], "destroyed")
    assert (await emu.client.get(f"/v1/apps/{APP}/machines")).json() == []
    listed = (await emu.client.get(f"/v1/apps/{APP}/machines", params={"include_deleted": "true"})).json()
    assert [(m["id"], m["state"]) for m in listed] == [(machine["id"], "destroyed")]
    # GET keeps answering for a while, as on Fly (destroyed_retention; test_emulator_fidelity.py).
    assert (await emu.get(machine["id"]))["state"] == "destroyed"


# --- update ----------------------------------------------------------------------------------


async def test_update_with_stale_current_version_is_409_and_changes_nothing(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    r = await emu.client.post(
        f"/v1/apps/{APP}/machines/{machine['id']}",
        json={
            "config": script_config(SLEEP, env={"X": "1"}),
            "current_version": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        },
    )
    assert r.status_code == 409
    after = await emu.get(machine["id"])
    assert after["version"] == machine["version"] and "env" not in after["config"]


async def test_update_of_stopped_machine_makes_a_new_version_and_stays_stopped(emu: Emulator) -> None:
    machine = await emu.create(script_config("import sys; sys.exit(0)"))
    await emu.wait(machine["id"], "stopped")
    r = await emu.client.post(
        f"/v1/apps/{APP}/machines/{machine['id']}",
        json={"config": script_config(SLEEP, env={"X": "1"}), "current_version": machine["version"]},
    )
    assert r.status_code == 200, r.text
    updated = r.json()
    assert updated["version"] != machine["version"] and len(updated["version"]) == 26
    assert updated["config"]["env"] == {"X": "1"}
    waited = await emu.wait(machine["id"], "settled")
    assert waited["state"] == "stopped"
    versions = (await emu.client.get(f"/v1/apps/{APP}/machines/{machine['id']}/versions")).json()
    assert [v["version"] for v in versions] == [updated["version"], machine["version"]]


async def test_update_of_started_machine_restarts_it_with_the_new_config(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    old_pid = await emu.pid(machine["id"])
    config = script_config(
        "import os,time\nprint('v2', os.environ['X'], flush=True)\ntime.sleep(60)", env={"X": "2"}
    )
    r = await emu.client.post(f"/v1/apps/{APP}/machines/{machine['id']}", json={"config": config})
    assert r.status_code == 200
    await emu.wait(machine["id"], "started")

    async def new_version_runs() -> bool:
        return "v2 2" in await emu.log(machine["id"])

    await eventually(new_version_runs)
    assert await emu.pid(machine["id"]) != old_pid
    assert old_pid is not None and gone(old_pid)


# --- transitions and destroy -------------------------------------------------------------------


async def test_invalid_transitions_answer_412_in_fly_shape(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    r = await emu.post(machine["id"], "start")
    assert r.status_code == 412
    assert r.json() == {"error": "unable to start machine from current state"}
    stopped = await emu.create(script_config(SLEEP), skip_launch=True)
    assert (await emu.post(stopped["id"], "suspend")).status_code == 412
    assert (await emu.post(stopped["id"], "restart")).status_code == 412


async def test_non_forced_destroy_of_started_machine_is_refused(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    r = await emu.client.delete(f"/v1/apps/{APP}/machines/{machine['id']}")
    assert r.status_code == 412
    assert r.json()["error"] == (
        "failed_precondition: unable to destroy machine, not currently stopped, suspended, failed or created"
    )
    assert (await emu.get(machine["id"]))["state"] == "started"


@pytest.mark.parametrize("flag", ["force", "kill"])
async def test_forced_destroy_kills_the_process(emu: Emulator, flag: str) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    pid = await emu.pid(machine["id"])
    r = await emu.client.delete(f"/v1/apps/{APP}/machines/{machine['id']}", params={flag: "true"})
    assert r.status_code == 200
    await emu.wait(machine["id"], "destroyed")
    assert pid is not None and gone(pid)
    types = [e["type"] for e in machine["events"]] + [
        e["type"] for e in emu.state.machines[machine["id"]].events
    ]
    assert "destroy" in types


# --- processes and exits -----------------------------------------------------------------------


async def test_exit_code_is_recorded_in_the_exit_event(emu: Emulator) -> None:
    machine = await emu.create(script_config("import sys; sys.exit(3)"))
    await emu.wait(machine["id"], "stopped")
    [exit_event] = [e for e in await emu.events(machine["id"]) if e["type"] == "exit"]
    assert exit_event["status"] == "stopped" and exit_event["source"] == "flyd"
    details = exit_event["request"]["exit_event"]
    assert details["exit_code"] == 3 and details["signal"] == -1
    assert details["requested_stop"] is False and details["restarting"] is False
    assert details["oom_killed"] is False and "exited_at" in details
    assert exit_event["request"]["restart_count"] == 0


async def test_on_failure_restarts_non_zero_exits_up_to_max_retries(emu: Emulator) -> None:
    config = script_config("import sys; sys.exit(1)", policy="on-failure")
    config["restart"]["max_retries"] = 2
    machine = await emu.create(config)
    await emu.wait(machine["id"], "stopped")
    exits = [e for e in await emu.events(machine["id"], limit=50) if e["type"] == "exit"]
    assert len(exits) == 3
    assert [e["request"]["exit_event"]["restarting"] for e in exits] == [False, True, True]
    assert exits[0]["request"]["restart_count"] == 2


async def test_on_failure_does_not_restart_a_clean_exit(emu: Emulator) -> None:
    machine = await emu.create(script_config("import sys; sys.exit(0)", policy="on-failure"))
    await emu.wait(machine["id"], "stopped")
    assert len([e for e in await emu.events(machine["id"]) if e["type"] == "exit"]) == 1


async def test_always_restarts_even_clean_exits(emu: Emulator) -> None:
    machine = await emu.create(script_config("print('run', flush=True)", policy="always"))

    async def restarted_twice() -> bool:
        return (await emu.log(machine["id"])).count("run") >= 3

    await eventually(restarted_twice)
    exits = [e for e in await emu.events(machine["id"], limit=50) if e["type"] == "exit"]
    assert exits and all(e["request"]["exit_event"]["exit_code"] == 0 for e in exits)
    assert (await emu.get(machine["id"]))["state"] != "stopped"


async def test_auto_destroy_destroys_the_machine_when_it_exits(emu: Emulator) -> None:
    machine = await emu.create(script_config("print('done')", auto_destroy=True))
    waited = await emu.wait(machine["id"], "destroyed")
    assert waited["state"] == "destroyed"
    gone = await emu.get(machine["id"])
    assert gone["state"] == "destroyed"
    exits = [e for e in gone["events"] if e["type"] == "exit"]
    assert exits and exits[0]["request"]["exit_event"]["exit_code"] == 0


async def test_stop_sends_stop_config_signal_and_records_requested_stop(emu: Emulator) -> None:
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got term', flush=True), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)"
    )
    machine = await started_and_ready(emu, script_config(script, stop_config={"signal": "SIGTERM"}))
    r = await emu.post(machine["id"], "stop", json={"timeout": "0s"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    await emu.wait(machine["id"], "stopped")
    assert "got term" in await emu.log(machine["id"])
    exit_event = next(e for e in await emu.events(machine["id"]) if e["type"] == "exit")
    details = exit_event["request"]["exit_event"]
    assert details["exit_code"] == 0 and details["requested_stop"] is True


async def test_default_stop_signal_is_sigint(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    assert (await emu.post(machine["id"], "stop")).status_code == 200
    await emu.wait(machine["id"], "stopped")
    exit_event = next(e for e in await emu.events(machine["id"]) if e["type"] == "exit")
    assert exit_event["request"]["exit_event"]["signal"] == 2


async def test_a_machine_process_starts_with_no_signal_blocked_or_ignored(emu: Emulator) -> None:
    """As under Fly's init: what the emulator's own process blocks or ignores never reaches a machine
    (it survives exec otherwise, and a stop's SIGINT would never arrive: SIGKILL after the timeout)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        machine = await started_and_ready(emu, script_config(SLEEP))
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert (await emu.post(machine["id"], "stop")).status_code == 200
    await emu.wait(machine["id"], "stopped")
    exit_event = next(e for e in await emu.events(machine["id"]) if e["type"] == "exit")
    assert exit_event["request"]["exit_event"]["signal"] == 2


async def test_stop_escalates_to_sigkill_when_the_process_ignores_the_signal(emu: Emulator) -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)"
    )
    machine = await started_and_ready(emu, script_config(script))
    pid = await emu.pid(machine["id"])
    r = await emu.post(machine["id"], "stop", json={"signal": "SIGINT", "timeout": "300ms"})
    assert r.status_code == 200
    assert (await emu.get(machine["id"]))["state"] == "stopping"
    await emu.wait(machine["id"], "stopped")
    exit_event = next(e for e in await emu.events(machine["id"]) if e["type"] == "exit")
    assert exit_event["request"]["exit_event"]["signal"] == 9
    assert pid is not None and gone(pid)


async def test_suspend_freezes_the_process_and_start_resumes_it(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    pid = await emu.pid(machine["id"])
    assert pid is not None
    assert (await emu.post(machine["id"], "suspend")).status_code == 200
    await emu.wait(machine["id"], "suspended")
    assert proc_state(pid) == "T"
    r = await emu.post(machine["id"], "start")
    assert r.status_code == 200 and r.json()["previous_state"] == "suspended"
    await emu.wait(machine["id"], "started")
    assert await emu.pid(machine["id"]) == pid
    assert proc_state(pid) in ("S", "R")


async def test_stopping_a_suspended_machine_discards_the_process(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    pid = await emu.pid(machine["id"])
    await emu.post(machine["id"], "suspend")
    await emu.wait(machine["id"], "suspended")
    assert (await emu.post(machine["id"], "stop")).status_code == 200
    await emu.wait(machine["id"], "stopped")
    assert pid is not None and gone(pid)


async def test_restart_runs_a_fresh_process(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    pid = await emu.pid(machine["id"])
    r = await emu.post(
        machine["id"], "restart", params={"signal": "SIGTERM", "timeout": "2s", "force_stop": "false"}
    )
    assert r.status_code == 200
    await emu.wait(machine["id"], "started")

    async def new_pid() -> bool:
        current = await emu.pid(machine["id"])
        return current is not None and current != pid

    await eventually(new_pid)
    types = [e["type"] for e in await emu.events(machine["id"])]
    assert "restart" in types
    assert pid is not None and gone(pid)


async def test_signal_is_delivered_to_the_main_process(emu: Emulator) -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: print('usr1', flush=True))\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)"
    )
    machine = await started_and_ready(emu, script_config(script))
    assert (await emu.post(machine["id"], "signal", json={"signal": "SIGUSR1"})).status_code == 200

    async def handled() -> bool:
        return "usr1" in await emu.log(machine["id"])

    await eventually(handled)
    assert (await emu.post(machine["id"], "signal", json={"signal": "SIGNOPE"})).status_code == 400


async def test_unknown_image_without_a_command_fails_to_launch(emu: Emulator) -> None:
    machine = await emu.create({"image": "registry.fly.io/nope:latest"})
    waited = await emu.wait(machine["id"], "failed")
    assert waited["state"] == "failed"
    failure = next(e for e in await emu.events(machine["id"]) if e["type"] == "exit")
    assert failure["status"] == "failed" and "nope" in failure["request"]["error"]


async def test_image_map_runs_the_mapped_command(make_emulator: EmulatorFactory) -> None:
    command = [sys.executable, "-c", "import sys; print('mapped', sys.argv[1:], flush=True)"]
    emu = await make_emulator(images={"worker": command})
    machine = await emu.create({"image": "registry.fly.io/worker:v3", "init": {"cmd": ["a1"]}})
    await emu.wait(machine["id"], "stopped")
    assert "mapped ['a1']" in await emu.log(machine["id"])


async def test_machine_env_has_fly_vars_and_secrets_but_not_the_host_environment(
    make_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", "host-token-must-not-leak")
    monkeypatch.setenv("SOME_HOST_VAR", "nope")
    emu = await make_emulator(secrets={APP: {"ANTHROPIC_API_KEY": "sk-from-settings"}})
    r = await emu.client.put(f"/_admin/secrets/{APP}", json={"MODEL_URL": "http://127.0.0.1:9"})
    assert r.status_code == 200 and r.json()["names"] == ["ANTHROPIC_API_KEY", "MODEL_URL"]
    script = "import json, os\nprint(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}), flush=True)"
    machine = await emu.create(script_config(script, env={"MY_VAR": "1"}), region="ams")
    await emu.wait(machine["id"], "stopped")
    dumped = json.loads((await emu.log(machine["id"])).strip().splitlines()[-1])
    env = dumped["env"]
    assert "FLY_API_TOKEN" not in env and "SOME_HOST_VAR" not in env
    assert env["ANTHROPIC_API_KEY"] == "sk-from-settings" and env["MODEL_URL"] == "http://127.0.0.1:9"
    assert env["MY_VAR"] == "1"
    assert (
        env["FLY_MACHINE_ID"] == machine["id"] and env["FLY_APP_NAME"] == APP and env["FLY_REGION"] == "ams"
    )
    assert env["FLY_IMAGE_REF"] == "python:3.11-slim" and env["FLY_PRIVATE_IP"] == machine["private_ip"]
    workdir = (await emu.client.get(f"/_admin/machines/{machine['id']}")).json()["workdir"]
    assert env["HOME"] == workdir and dumped["cwd"] == workdir
    secrets_listing = (await emu.client.get(f"/_admin/secrets/{APP}")).text
    assert "sk-from-settings" not in secrets_listing


async def test_skip_secrets_keeps_app_secrets_out(make_emulator: EmulatorFactory) -> None:
    emu = await make_emulator(secrets={APP: {"TOP": "secret"}})
    script = "import os\nprint('TOP' in os.environ, flush=True)"
    machine = await emu.create(script_config(script), skip_secrets=True)
    await emu.wait(machine["id"], "stopped")
    assert "False" in await emu.log(machine["id"])


# --- leases ------------------------------------------------------------------------------------


async def test_lease_blocks_mutations_without_its_nonce(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    base = f"/v1/apps/{APP}/machines/{machine['id']}"
    r = await emu.client.post(f"{base}/lease", params={"ttl": 30})
    assert r.status_code == 201
    lease = r.json()
    assert lease["status"] == "success"
    nonce = lease["data"]["nonce"]
    assert lease["data"]["version"] == machine["version"] and isinstance(lease["data"]["expires_at"], int)

    r = await emu.post(machine["id"], "start")
    assert r.status_code == 409
    assert re.fullmatch(
        rf"aborted: machine ID {machine['id']} lease currently held by \S+, expires at \d{{4}}-.*Z",
        r.json()["error"],
    )
    assert (await emu.client.delete(base)).status_code == 409
    assert (await emu.client.post(f"{base}/metadata/k", json={"value": "v"})).status_code == 409
    assert (
        await emu.post(machine["id"], "start", headers={"fly-machine-lease-nonce": nonce})
    ).status_code == 200
    # A second holder is refused, the holder refreshes with its nonce.
    assert (await emu.client.post(f"{base}/lease", json={"ttl": 30})).status_code == 409
    r = await emu.client.post(f"{base}/lease", json={"ttl": 60}, headers={"fly-machine-lease-nonce": nonce})
    assert r.status_code == 201 and r.json()["data"]["nonce"] == nonce
    assert r.json()["data"]["expires_at"] >= lease["data"]["expires_at"]
    shown = await emu.client.get(f"{base}/lease")
    assert shown.status_code == 200 and shown.json()["data"]["nonce"] == nonce
    listed = (await emu.client.get(f"/v1/apps/{APP}/machines", params={"include_leases": "true"})).json()
    assert listed[0]["lease"]["owner"] == lease["data"]["owner"]
    # Release needs the nonce header.
    assert (await emu.client.delete(f"{base}/lease")).status_code == 400
    r = await emu.client.delete(f"{base}/lease", headers={"fly-machine-lease-nonce": nonce})
    assert r.status_code == 200 and r.json() == {"status": "success", "data": {"ok": True}}
    assert (await emu.client.get(f"{base}/lease")).status_code == 404
    assert (
        await emu.client.delete(f"{base}/lease", headers={"fly-machine-lease-nonce": nonce})
    ).status_code == 404


async def test_lease_expires_after_its_ttl(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    base = f"/v1/apps/{APP}/machines/{machine['id']}"
    assert (await emu.client.post(f"{base}/lease", params={"ttl": 1})).status_code == 201
    assert (await emu.client.post(f"{base}/cordon")).status_code == 409

    async def expired() -> bool:
        return (await emu.client.post(f"{base}/cordon")).status_code == 200

    await eventually(expired, timeout=10)
    assert (await emu.get(machine["id"]))["cordoned"] is True


async def test_create_with_lease_ttl_returns_the_nonce(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True, lease_ttl=30)
    nonce = machine["nonce"]
    assert (await emu.post(machine["id"], "start")).status_code == 409
    assert (
        await emu.post(machine["id"], "start", headers={"fly-machine-lease-nonce": nonce})
    ).status_code == 200
    assert "nonce" not in await emu.get(machine["id"])


# --- wait ----------------------------------------------------------------------------------------


async def test_wait_times_out_with_408(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    r = await emu.client.get(
        f"/v1/apps/{APP}/machines/{machine['id']}/wait",
        params={"state": "stopped", "timeout": 1, "version": machine["version"]},
    )
    assert r.status_code == 408 and "error" in r.json()


async def test_wait_accepts_comma_lists_repeats_and_settled(emu: Emulator) -> None:
    machine = await emu.create(script_config("import sys; sys.exit(0)"))
    url = f"/v1/apps/{APP}/machines/{machine['id']}/wait"
    version = machine["version"]
    r = await emu.client.get(url, params={"state": "stopped,failed", "timeout": 20, "instance_id": version})
    assert r.status_code == 200 and r.json()["state"] == "stopped"
    r = await emu.client.get(
        url, params=[("state", "failed"), ("state", "stopped"), ("timeout", "5"), ("version", version)]
    )
    assert r.status_code == 200 and r.json()["state"] == "stopped"
    r = await emu.client.get(url, params={"state": "settled", "timeout": 5})
    assert r.status_code == 200 and r.json()["state"] == "stopped"
    assert r.json()["event_id"] == (await emu.events(machine["id"]))[0]["id"]


@pytest.mark.parametrize(
    "params", [{"timeout": 0}, {"timeout": 61}, {"timeout": "abc"}, {"state": "sleeping"}]
)
async def test_wait_rejects_out_of_bounds_arguments(emu: Emulator, params: dict[str, Any]) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    r = await emu.client.get(f"/v1/apps/{APP}/machines/{machine['id']}/wait", params=params)
    assert r.status_code == 400 and r.json()["error"].startswith("invalid_argument")


async def test_wait_wakes_when_the_state_changes(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    waiter = asyncio.create_task(emu.wait(machine["id"], "started"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await emu.post(machine["id"], "start")
    assert (await asyncio.wait_for(waiter, 20))["state"] == "started"


# --- events, metadata, cordon ------------------------------------------------------------------


async def test_events_default_to_20_newest_first_and_cap_at_50(emu: Emulator) -> None:
    machine = await emu.create(script_config("pass", policy="always"))

    async def many_events() -> bool:
        return len(emu.state.machines[machine["id"]].events) >= 60

    await eventually(many_events)
    default = await emu.events(machine["id"])
    assert len(default) == 20
    assert [e["timestamp"] for e in default] == sorted((e["timestamp"] for e in default), reverse=True)
    assert len(await emu.events(machine["id"], limit=500)) == 50
    assert len(await emu.events(machine["id"], limit=5)) == 5


async def test_metadata_endpoints_set_read_and_remove_keys(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP, metadata={"a": "1", "b": "2"}), skip_launch=True)
    base = f"/v1/apps/{APP}/machines/{machine['id']}/metadata"
    assert (await emu.client.get(base)).json() == {"a": "1", "b": "2"}
    r = await emu.client.patch(base, json={"metadata": {"a": None, "b": "", "c": "3"}})
    assert r.status_code == 204
    assert (await emu.client.get(base)).json() == {"c": "3"}
    assert (await emu.client.post(f"{base}/d", json={"value": "4"})).status_code == 204
    assert (await emu.client.get(f"{base}/d")).json() == {"value": "4"}
    assert (await emu.client.delete(f"{base}/d")).status_code == 204
    assert (await emu.client.get(f"{base}/d")).status_code == 404
    r = await emu.client.patch(
        base, json={"metadata": {"x": "y"}, "machine_version": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}
    )
    assert r.status_code == 412
    r = await emu.client.put(base, json={"metadata": {"x": "y"}, "machine_version": machine["version"]})
    assert r.status_code == 204
    after = await emu.get(machine["id"])
    assert after["config"]["metadata"] == {"c": "3", "x": "y"} and after["version"] == machine["version"]


async def test_cordon_and_uncordon_flip_the_flag(emu: Emulator) -> None:
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    assert (await emu.post(machine["id"], "cordon")).status_code == 200
    assert (await emu.get(machine["id"]))["cordoned"] is True
    assert (await emu.post(machine["id"], "uncordon")).status_code == 200
    assert (await emu.get(machine["id"]))["cordoned"] is False


# --- auth ----------------------------------------------------------------------------------------


async def test_api_token_is_required_when_configured(make_emulator: EmulatorFactory) -> None:
    emu = await make_emulator(api_token="tok-123")
    r = await emu.client.get(f"/v1/apps/{APP}/machines")
    assert r.status_code == 401 and "error" in r.json()
    r = await emu.client.get(f"/v1/apps/{APP}/machines", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = await emu.client.get(f"/v1/apps/{APP}/machines", headers={"Authorization": "Bearer tok-123"})
    assert r.status_code == 200
    assert "tok-123" not in r.text
    assert (await emu.client.get("/_admin/stats")).status_code == 401


# --- fault knobs ---------------------------------------------------------------------------------


async def test_rate_limits_answer_429_per_action_and_machine(emu: Emulator) -> None:
    a = await emu.create(script_config(SLEEP), skip_launch=True)
    b = await emu.create(script_config(SLEEP), skip_launch=True)
    r = await emu.client.patch("/_admin/faults", json={"rate_limits": True})
    assert r.status_code == 200 and r.json()["rate_limits"] is True
    statuses = [(await emu.client.get(f"/v1/apps/{APP}/machines/{a['id']}")).status_code for _ in range(25)]
    assert statuses[:10] == [200] * 10 and 429 in statuses
    limited = await emu.client.get(f"/v1/apps/{APP}/machines/{a['id']}")
    assert limited.status_code == 429 and limited.json() == {
        "error": "resource_exhausted: rate limit exceeded"
    }
    # Another machine has its own bucket; another action on the same machine too.
    assert (await emu.client.get(f"/v1/apps/{APP}/machines/{b['id']}")).status_code == 200
    assert (await emu.client.get(f"/v1/apps/{APP}/machines/{a['id']}/events")).status_code == 200
    cordons = [(await emu.post(a["id"], "cordon")).status_code for _ in range(6)]
    assert cordons[:3] == [200] * 3 and 429 in cordons
    stats = (await emu.client.get("/_admin/stats")).json()
    assert stats["rate_limited"] == statuses.count(429) + 1 + cordons.count(429)
    rows = {(row["method"], row["op"], row["status"]): row["count"] for row in stats["requests"]}
    assert rows[("GET", "Machines_show", 429)] == statuses.count(429) + 1
    assert rows[("POST", "Machines_cordon", 200)] == 3 + cordons[3:].count(200)


async def test_creates_are_rate_limited_per_app(emu: Emulator) -> None:
    await emu.client.put("/_admin/faults", json={"rate_limits": True})
    body = {"config": script_config(SLEEP), "skip_launch": True}
    statuses = [(await emu.client.post(f"/v1/apps/{APP}/machines", json=body)).status_code for _ in range(6)]
    assert statuses[:3] == [200] * 3 and 429 in statuses
    assert (await emu.client.post("/v1/apps/other/machines", json=body)).status_code == 200
    await emu.client.put("/_admin/faults", json={})
    assert (await emu.client.post(f"/v1/apps/{APP}/machines", json=body)).status_code == 200


async def test_latency_knob_delays_v1_requests(emu: Emulator) -> None:
    await emu.client.patch("/_admin/faults", json={"latency_ms": 150})
    begin = time.monotonic()
    assert (await emu.client.get(f"/v1/apps/{APP}/machines")).status_code == 200
    # A lower bound the emulator guarantees by sleeping, not a timing expectation.
    assert time.monotonic() - begin >= 0.15
    assert (await emu.client.get("/_admin/faults")).json()["latency_ms"] == 150


async def test_error_rate_injects_reproducible_5xx_only_on_v1(emu: Emulator) -> None:
    async def sample() -> list[int]:
        await emu.client.put("/_admin/faults", json={"error_rate": 0.5, "seed": 7})
        return [(await emu.client.get(f"/v1/apps/{APP}/machines")).status_code for _ in range(30)]

    first, second = await sample(), await sample()
    assert first == second
    assert {s for s in first if s != 200} <= {500, 502, 503} and 200 in first and len(set(first)) > 1
    await emu.client.put("/_admin/faults", json={"error_rate": 1.0})
    assert (await emu.client.get(f"/v1/apps/{APP}/machines")).status_code >= 500
    assert (await emu.client.get("/_admin/health")).status_code == 200
    assert (await emu.client.get("/_admin/stats")).json()["server_errors"] >= 16


async def test_create_timeout_fault_answers_408_after_creating_the_machine(emu: Emulator) -> None:
    await emu.client.patch("/_admin/faults", json={"create_timeout_rate": 1.0})
    config = script_config(SLEEP, metadata={"launch": "L1"})
    r = await emu.client.post(f"/v1/apps/{APP}/machines", json={"config": config})
    assert r.status_code == 408
    await emu.client.patch("/_admin/faults", json={"create_timeout_rate": 0.0})
    [machine] = (await emu.client.get(f"/v1/apps/{APP}/machines", params={"metadata.launch": "L1"})).json()
    await emu.wait(machine["id"], "started")


async def test_capacity_fault_refuses_creates_in_a_full_region(emu: Emulator) -> None:
    await emu.client.patch("/_admin/faults", json={"capacity_regions": ["fra"]})
    body = {"config": script_config(SLEEP), "region": "fra", "skip_launch": True}
    r = await emu.client.post(f"/v1/apps/{APP}/machines", json=body)
    assert r.status_code == 422
    assert r.json()["status"] == "insufficient_capacity" and r.json()["error"]
    r = await emu.client.post(f"/v1/apps/{APP}/machines", json={**body, "region": "ams"})
    assert r.status_code == 200


async def test_list_lag_hides_new_machines_and_shows_destroyed_ones(emu: Emulator) -> None:
    await emu.client.patch("/_admin/faults", json={"list_lag_seconds": 0.5})
    machine = await emu.create(script_config(SLEEP), skip_launch=True)
    assert (await emu.client.get(f"/v1/apps/{APP}/machines")).json() == []
    assert (await emu.get(machine["id"]))["id"] == machine["id"]

    async def listed() -> bool:
        return len((await emu.client.get(f"/v1/apps/{APP}/machines")).json()) == 1

    await eventually(listed)
    await emu.client.delete(f"/v1/apps/{APP}/machines/{machine['id']}")
    await emu.wait(machine["id"], "destroyed")
    [lingering] = (await emu.client.get(f"/v1/apps/{APP}/machines")).json()
    assert lingering["id"] == machine["id"] and lingering["state"] == "created"

    async def dropped() -> bool:
        return bool((await emu.client.get(f"/v1/apps/{APP}/machines")).json() == [])

    await eventually(dropped)


async def test_crash_fault_kills_the_process_and_the_restart_policy_applies(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP, policy="on-failure"))
    pid = await emu.pid(machine["id"])
    assert (await emu.client.post(f"/_admin/machines/{machine['id']}/crash")).status_code == 200

    async def restarted() -> bool:
        current = await emu.pid(machine["id"])
        return current is not None and current != pid and emu.state.machines[machine["id"]].state == "started"

    await eventually(restarted)
    crash = next(e for e in reversed(await emu.events(machine["id"])) if e["type"] == "exit")
    assert (
        crash["request"]["exit_event"]["signal"] == 9 and crash["request"]["exit_event"]["restarting"] is True
    )


async def test_hang_fault_freezes_the_process_while_fly_says_started(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    pid = await emu.pid(machine["id"])
    assert pid is not None
    assert (await emu.client.post(f"/_admin/machines/{machine['id']}/hang")).status_code == 200
    assert proc_state(pid) == "T"
    assert (await emu.get(machine["id"]))["state"] == "started"
    # A hung machine still stops: the stop signal waits, SIGKILL does not.
    assert (await emu.client.get(f"/_admin/machines/{machine['id']}")).json()["hung"] is True
    await emu.post(machine["id"], "stop", json={"timeout": "200ms"})
    await emu.wait(machine["id"], "stopped")
    assert gone(pid)
    exit_event = next(e for e in await emu.events(machine["id"]) if e["type"] == "exit")
    assert exit_event["request"]["exit_event"]["signal"] == 9


async def test_faults_can_be_set_at_start(make_emulator: EmulatorFactory) -> None:
    emu = await make_emulator(faults=FaultSettings(error_rate=1.0))
    assert (await emu.client.get(f"/v1/apps/{APP}/machines")).status_code >= 500
    assert (await emu.client.post("/_admin/reset")).status_code == 200
    assert (await emu.client.get("/_admin/faults")).json()["error_rate"] == 1.0
    assert (await emu.client.put("/_admin/faults", json={"error_rate": 2})).status_code == 400


async def test_reset_forgets_machines_and_kills_their_processes(emu: Emulator) -> None:
    machine = await started_and_ready(emu, script_config(SLEEP))
    pid = await emu.pid(machine["id"])
    assert (await emu.client.post("/_admin/reset")).status_code == 200
    assert pid is not None and gone(pid)
    assert (await emu.client.get(f"/v1/apps/{APP}/machines")).json() == []
    assert (await emu.client.get("/_admin/stats")).json()["total"] == 1  # the list just made


async def test_close_kills_every_process_group_including_children(emu: Emulator) -> None:
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('ready', child.pid, flush=True)\n"
        "while True: time.sleep(0.05)"
    )
    pids: list[int] = []
    for _ in range(3):
        machine = await started_and_ready(emu, script_config(script))
        main_pid = await emu.pid(machine["id"])
        assert main_pid is not None
        child_pid = int((await emu.log(machine["id"])).split("ready", 1)[1].split()[0])
        pids += [main_pid, child_pid]
    suspended = await started_and_ready(emu, script_config(SLEEP))
    await emu.post(suspended["id"], "suspend")
    await emu.wait(suspended["id"], "suspended")
    suspended_pid = await emu.pid(suspended["id"])
    assert suspended_pid is not None
    pids.append(suspended_pid)
    assert not any(gone(pid) for pid in pids)

    await emu.state.aclose()

    async def all_gone() -> bool:
        return all(gone(pid) for pid in pids)

    await eventually(all_gone, timeout=10)
    assert emu.state.pids == []


async def test_concurrent_random_actions_never_break_the_emulator_or_leak_processes(
    make_emulator: EmulatorFactory,
) -> None:
    import random

    emu = await make_emulator(transition_delay=0.005, stop_timeout=0.3)
    rng = random.Random(42)
    ids = [(await emu.create(script_config(SLEEP, policy=rng.choice(["no", "always", "on-failure"]))))["id"]]
    ids += [(await emu.create(script_config("import sys; sys.exit(1)", policy="on-failure")))["id"]]
    for _ in range(6):
        ids.append((await emu.create(script_config(SLEEP), skip_launch=rng.random() < 0.3))["id"])
    seen_pids: set[int] = set()

    async def act(machine_id: str) -> int:
        choice = rng.choice(
            ["start", "stop", "suspend", "restart", "destroy", "kill", "crash", "update", "get"]
        )
        base = f"/v1/apps/{APP}/machines/{machine_id}"
        if choice == "destroy":
            r = await emu.client.delete(base)
        elif choice == "kill":
            r = await emu.client.delete(base, params={"kill": "true"})
        elif choice == "crash":
            r = await emu.client.post(f"/_admin/machines/{machine_id}/crash")
        elif choice == "update":
            r = await emu.client.post(base, json={"config": script_config(SLEEP)})
        elif choice == "get":
            r = await emu.client.get(base)
        else:
            r = await emu.client.post(
                f"{base}/{choice}", json={"timeout": "100ms"} if choice == "stop" else None
            )
        pid = emu.state.machines[machine_id].process
        if pid is not None:
            seen_pids.add(pid.pid)
        return r.status_code

    statuses: list[int] = []
    for _ in range(15):
        statuses += await asyncio.gather(*(act(machine_id) for machine_id in ids))
        await asyncio.sleep(rng.random() * 0.05)
    assert all(status < 500 for status in statuses)
    assert {200, 412} <= set(statuses)
    for machine_id in ids:
        r = await emu.client.get(f"/v1/apps/{APP}/machines/{machine_id}/wait", params={"state": "settled"})
        assert r.status_code in (200, 404), r.text
    # Whatever Fly says must match the process table: started runs, suspended is frozen, others have none.
    for machine in emu.state.machines.values():
        process = machine.process
        if machine.state == "started":
            assert process is not None and process.running, machine.id
        elif machine.state == "suspended":
            assert process is not None and proc_state(process.pid) == "T", machine.id
        elif machine.state in ("stopped", "created", "failed", "destroyed"):
            assert process is None, (machine.id, machine.state)
    health = (await emu.client.get("/_admin/health")).json()
    assert health["task_failures"] == 0
    assert (await emu.client.get("/_admin/stats")).json()["server_errors"] == 0

    await emu.state.aclose()
    assert emu.state.task_failures == 0 and emu.state.pids == []

    async def all_gone() -> bool:
        return all(gone(pid) for pid in seen_pids)

    await eventually(all_gone, timeout=10)
