"""The emulator as a server process (``python -m local.emulator``): it serves, and no machine outlives it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from local.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = {
    "image": "python:3.11-slim",
    "init": {"exec": [sys.executable, "-c", "import time\nwhile True: time.sleep(0.05)"]},
    "restart": {"policy": "no"},
}


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    base_url: str


@contextlib.contextmanager
def running_emulator(tmp_path: Path, **env_settings: str) -> Iterator[ServerProcess]:
    """``python -m local.emulator`` on a free loopback port; killed (with its machines) on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYSWARM_EMULATOR_")}
    env["PYTHONPATH"] = str(ROOT)
    env["FLYSWARM_EMULATOR_TRANSITION_DELAY"] = "0.01"
    env.update({f"FLYSWARM_EMULATOR_{k.upper()}": v for k, v in env_settings.items()})
    log_path = tmp_path / f"emulator-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "local.emulator", "--port", str(port), "--log-level", "warning"],
            env=env,
            cwd=str(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base_url}/_admin/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"emulator did not start: {log_path.read_text()}")
            time.sleep(0.05)
        yield ServerProcess(proc, base_url)
    finally:
        # Graceful first (the emulator kills its machines and removes its temp dir), then force.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(timeout=10)


def proc_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_until(check: object, timeout: float = 15.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def start_machines(base_url: str, count: int) -> tuple[list[int], Path]:
    """Start ``count`` sleeping machines; their pids and the emulator's work root."""
    pids: list[int] = []
    workdir = ""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(count):
            r = client.post("/v1/apps/demo/machines", json={"config": SLEEPER})
            assert r.status_code == 200, r.text
            machine_id = r.json()["id"]
            r = client.get(
                f"/v1/apps/demo/machines/{machine_id}/wait", params={"state": "started", "timeout": 20}
            )
            assert r.status_code == 200, r.text
            admin = client.get(f"/_admin/machines/{machine_id}").json()
            assert isinstance(admin["pid"], int)
            pids.append(admin["pid"])
            workdir = admin["workdir"]
    return pids, Path(workdir).parent


def test_module_entry_point_serves_and_runs_machines_as_processes(tmp_path: Path) -> None:
    images = json.dumps({"hello": [sys.executable, "-c", "print('hello from a machine', flush=True)"]})
    with running_emulator(tmp_path, images=images, work_root=str(tmp_path / "work")) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            r = client.post("/v1/apps/demo/machines", json={"config": {"image": "hello"}})
            assert r.status_code == 200
            machine_id, version = r.json()["id"], r.json()["version"]
            r = client.get(
                f"/v1/apps/demo/machines/{machine_id}/wait",
                params={"state": "stopped", "timeout": 20, "version": version},
            )
            assert r.status_code == 200
            assert "hello from a machine" in client.get(f"/_admin/machines/{machine_id}/logs").text
        assert (tmp_path / "work" / machine_id / "machine.log").exists()


def test_sigterm_shuts_down_and_kills_every_machine_process(tmp_path: Path) -> None:
    with running_emulator(tmp_path) as server:
        pids, work_root = start_machines(server.base_url, 3)
        assert not any(proc_gone(pid) for pid in pids) and work_root.is_dir()
        server.proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal after its graceful shutdown.
        assert server.proc.wait(timeout=20) in (0, -signal.SIGTERM)
        wait_until(lambda: all(proc_gone(pid) for pid in pids))
        # The lifespan shutdown ran (it removes the emulator's own temporary work root).
        assert not work_root.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_machines_die_even_when_the_emulator_is_sigkilled(tmp_path: Path) -> None:
    with running_emulator(tmp_path, work_root=str(tmp_path / "work")) as server:
        pids, _ = start_machines(server.base_url, 2)
        server.proc.kill()
        server.proc.wait(timeout=10)
        wait_until(lambda: all(proc_gone(pid) for pid in pids))


def test_api_token_from_the_environment_guards_the_server(tmp_path: Path) -> None:
    with running_emulator(tmp_path, api_token="s3cret-token") as server:
        assert httpx.get(f"{server.base_url}/v1/apps/demo/machines").status_code == 401
        headers = {"Authorization": "Bearer s3cret-token"}
        r = httpx.get(f"{server.base_url}/v1/apps/demo/machines", headers=headers)
        assert r.status_code == 200 and r.json() == []


def test_a_create_whose_client_gave_up_during_latency_still_happens(tmp_path: Path) -> None:
    with running_emulator(tmp_path, work_root=str(tmp_path / "work")) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert client.patch("/_admin/faults", json={"latency_ms": 500}).status_code == 200
            body = {"config": {**SLEEPER, "metadata": {"launch": "L-gone"}}, "skip_launch": True}
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/apps/demo/machines", json=body, timeout=0.1)
            client.patch("/_admin/faults", json={"latency_ms": 0})

            def appeared() -> bool:
                listed = client.get("/v1/apps/demo/machines", params={"metadata.launch": "L-gone"}).json()
                return len(listed) == 1

            wait_until(appeared)
            stats = client.get("/_admin/stats").json()
            assert stats["server_errors"] == 0
