"""Emulated Fly volumes: the spec's shapes, Fly's refusals, and files that outlive their machines.

Every ``/v1`` answer is validated against shared/fly/openapi.json (the contract module's
validator). Snapshots and the org-wide volume list are not emulated (flyswarm does not use them).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from local.emulator import EmulatorSettings, create_app, emulator_state
from local.emulator_state import EmulatorState
from tests.local.test_emulator_contract import SpecValidator

V = "/v1/apps/vols/volumes"
M = "/v1/apps/vols/machines"
#: Appends one line to $NOTES (a path under the mount) and exits: a machine that leaves a trace.
WRITER = "import os; open(os.environ['NOTES'], 'a').write(os.environ['FLY_MACHINE_ID'] + '\\n')"


@pytest.fixture
async def client(
    openapi_path: Path, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, EmulatorState]]:
    import json

    validator = SpecValidator(json.loads(openapi_path.read_text()))
    app = create_app(EmulatorSettings(transition_delay=0.01, work_root=tmp_path / "work", stop_timeout=2))

    async def check(response: httpx.Response) -> None:
        await response.aread()
        if response.request.url.path.startswith("/v1/"):
            validator.validate(
                response.request.method,
                response.request.url.path,
                response.status_code,
                response.content,
                response.headers,
            )

    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://emulator", event_hooks={"response": [check]}
    )
    try:
        yield http, emulator_state(app)
    finally:
        await http.aclose()
        await emulator_state(app).aclose()


async def _call(http: httpx.AsyncClient, method: str, url: str, expected: int, **kw: Any) -> Any:
    response = await http.request(method, url, **kw)
    assert response.status_code == expected, f"{method} {url}: {response.status_code} {response.text}"
    return response.json()


def _machine(volume_id: str, region: str | None = None, path: str = "/data") -> dict[str, Any]:
    body: dict[str, Any] = {
        "config": {
            "image": "python",
            "init": {"exec": [sys.executable, "-c", WRITER]},
            "env": {"NOTES": "/data/notes.txt"},
            "restart": {"policy": "no"},
            "mounts": [{"volume": volume_id, "path": path}],
        }
    }
    if region:
        body["region"] = region
    return body


async def _until_state(http: httpx.AsyncClient, machine_id: str, state: str) -> None:
    async with asyncio.timeout(20):
        while (await _call(http, "GET", f"{M}/{machine_id}", 200))["state"] != state:
            await asyncio.sleep(0.02)


async def test_volume_api_answers_per_the_spec_and_refuses_what_fly_refuses(
    client: tuple[httpx.AsyncClient, EmulatorState],
) -> None:
    http, state = client
    created = await _call(http, "POST", V, 200, json={"name": "notes_1", "region": "fra", "size_gb": 1})
    vid = created["id"]
    assert created["state"] == "created" and created["region"] == "fra" and len(created["zone"]) == 4
    assert "attached_machine_id" not in created and vid.startswith("vol_")
    assert [v["id"] for v in await _call(http, "GET", V, 200)] == [vid]
    assert (await _call(http, "GET", f"{V}/{vid}", 200))["size_gb"] == 1
    updated = await _call(http, "PUT", f"{V}/{vid}", 200, json={"snapshot_retention": 7})
    assert updated["snapshot_retention"] == 7
    extended = await _call(http, "PUT", f"{V}/{vid}/extend", 200, json={"size_gb": 3})
    assert extended["volume"]["size_gb"] == 3 and extended["needs_restart"] is False

    refused = [
        ("POST", V, {"name": "Bad-Name", "region": "fra", "size_gb": 1}, 400, "name"),
        ("POST", V, {"name": "x", "region": "fra"}, 400, "size_gb is required"),
        ("POST", V, {"name": "x", "region": "fra", "size_gb": 501}, 400, "size_gb"),
        ("POST", V, {"name": "x", "size_gb": 1}, 400, "region is required"),
        ("PUT", f"{V}/{vid}/extend", {"size_gb": 2}, 400, "only grow"),
        ("GET", f"{V}/vol_nope", None, 404, "volume not found"),
        ("POST", M, _machine("vol_nope"), 400, "not found"),
        ("POST", M, _machine(vid, region="iad"), 400, "region fra"),
        (
            "POST",
            M,
            {**_machine(vid), "config": {**_machine(vid)["config"], "mounts": [{"volume": vid}]}},
            400,
            "path",
        ),
    ]
    for method, url, body, status, text in refused:
        answer = await _call(http, method, url, status, json=body)
        assert text in answer["error"], (url, answer)

    await http.patch("/_admin/faults", json={"capacity_regions": ["ams"]})
    full = await _call(http, "POST", V, 400, json={"name": "x", "region": "ams", "size_gb": 1})
    assert full["status"] == "volume_placement_capacity"
    await http.patch("/_admin/faults", json={"capacity_regions": [], "full_volumes": [vid]})
    host_full = await _call(http, "POST", M, 412, json=_machine(vid))
    assert "insufficient resources" in host_full["error"]
    await http.patch("/_admin/faults", json={"full_volumes": []})

    # A machine without a region goes where its volume is; a second one cannot mount it meanwhile.
    machine = await _call(http, "POST", M, 200, json=_machine(vid))
    assert machine["region"] == "fra"
    assert (await _call(http, "GET", f"{V}/{vid}", 200))["attached_machine_id"] == machine["id"]
    busy = await _call(http, "POST", M, 412, json=_machine(vid))
    assert "already attached" in busy["error"]
    attached = await _call(http, "DELETE", f"{V}/{vid}", 412)
    assert "attached" in attached["error"]
    assert state.volumes.volumes[vid].path.is_dir()


async def test_a_volumes_files_outlive_stops_and_machines_until_it_is_deleted(
    client: tuple[httpx.AsyncClient, EmulatorState],
) -> None:
    http, state = client
    vid = (await _call(http, "POST", V, 200, json={"name": "notes", "region": "fra", "size_gb": 1}))["id"]
    notes = state.volumes.volumes[vid].path / "notes.txt"

    first = (await _call(http, "POST", M, 200, json=_machine(vid)))["id"]
    await _until_state(http, first, "stopped")  # wrote its line and exited
    await _call(http, "POST", f"{M}/{first}/start", 200)
    async with asyncio.timeout(20):
        while len(notes.read_text().split()) < 2:
            await asyncio.sleep(0.02)
    await _until_state(http, first, "stopped")
    await _call(http, "DELETE", f"{M}/{first}", 200)
    await _until_state(http, first, "destroyed")
    assert "attached_machine_id" not in await _call(http, "GET", f"{V}/{vid}", 200)

    second = (await _call(http, "POST", M, 200, json=_machine(vid)))["id"]
    await _until_state(http, second, "stopped")
    assert notes.read_text().split() == [first, first, second]
    assert (await _call(http, "GET", f"{V}/{vid}", 200))["bytes_used"] == len(notes.read_bytes())

    await _call(http, "DELETE", f"{M}/{second}", 200)
    await _until_state(http, second, "destroyed")
    gone = await _call(http, "DELETE", f"{V}/{vid}", 200)
    assert gone["state"] == "pending_destroy"
    await _call(http, "GET", f"{V}/{vid}", 404)
    assert not notes.exists() and await _call(http, "GET", V, 200) == []
