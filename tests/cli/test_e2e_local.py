"""The issue's "done when", through the real CLI: `flyswarm up` on free ports in a temp dir, apply the
task example, wait for Succeeded, see the agent's result in `describe`, see the machine gone, heal
the stack after components are killed by hand, and `flyswarm down` leaves no process behind.

Everything is real: redis-server, the Fly emulator running the agent as a subprocess, the scripted
model, the API, the controller, the Agent SDK and its bundled CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from local.redis_server import free_port
from local.stack import marked_processes

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
COMPONENTS = ("redis", "emulator", "model", "gateway", "api", "controller")

pytestmark = pytest.mark.e2e


@dataclass
class LocalStack:
    root: Path
    env: dict[str, str]
    api_url: str
    emulator_url: str

    def flyswarm(
        self, *args: str, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.root.parent,
            timeout=timeout,
            input=input,
        )

    def pid(self, name: str) -> int:
        return int((self.root / "pids" / f"{name}.pid").read_text())

    def emulator(self, path: str) -> Any:
        token = (self.root / "secrets" / "fly-api-token").read_text().strip()
        response = httpx.get(
            f"{self.emulator_url}{path}", headers={"authorization": f"Bearer {token}"}, timeout=10
        )
        response.raise_for_status()
        return response.json()

    def api(self, path: str) -> Any:
        response = httpx.get(f"{self.api_url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    root = (tmp_path / "work" / ".local").resolve()
    root.parent.mkdir(parents=True)
    ports = {
        "FLYSWARM_REDIS_PORT": free_port(),
        "FLYSWARM_EMULATOR_PORT": free_port(),
        "FLYSWARM_MODEL_PORT": free_port(),
        "FLYSWARM_GATEWAY_PORT": free_port(),
        "PORT": free_port(),
        "FLYSWARM_CONTROLLER_PORT": free_port(),
        "FLYSWARM_GIT_PORT": free_port(),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYSWARM_", "FLY_", "ANTHROPIC_"))}
    env.pop("API_TOKENS", None)
    env.pop("REDIS_URL", None)
    env.update({k: str(v) for k, v in ports.items()})
    env.update(
        {
            "FLYSWARM_LOCAL_DIR": str(root),
            "FLYSWARM_URL": f"http://127.0.0.1:{ports['PORT']}",
            "PYTHONPATH": str(ROOT),
            # A short resync keeps the test quick; the rest are the defaults `make up` uses.
            "FLYSWARM_RESYNC_SECONDS": "1",
            "FLYSWARM_DOWN_TIMEOUT": "10",
        }
    )
    local = LocalStack(
        root=root,
        env=env,
        api_url=f"http://127.0.0.1:{ports['PORT']}",
        emulator_url=f"http://127.0.0.1:{ports['FLYSWARM_EMULATOR_PORT']}",
    )
    try:
        yield local
    finally:
        local.flyswarm("down", timeout=120)
        for pid in marked_processes(root):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(420)
def test_up_apply_wait_describe_heal_and_down_leave_nothing_behind(stack: LocalStack) -> None:
    up = stack.flyswarm("up")
    assert up.returncode == 0, up.stdout + up.stderr
    for name in COMPONENTS:
        assert any(line.split()[:2] == [name, "started"] for line in up.stdout.splitlines()), up.stdout
    assert "flyswarm apply -f manifests/examples/task.yaml" in up.stdout
    pids = {name: stack.pid(name) for name in COMPONENTS}

    again = stack.flyswarm("up")
    assert again.returncode == 0, again.stdout + again.stderr
    for name in COMPONENTS:
        assert any(line.split()[:3] == [name, "already", "running"] for line in again.stdout.splitlines())
    assert {name: stack.pid(name) for name in COMPONENTS} == pids

    # The path: apply, wait, describe.
    applied = stack.flyswarm("apply", "-f", str(EXAMPLES / "task.yaml"))
    assert applied.stdout.strip() == "session/hello-task created", applied.stderr
    # The workspace example alongside: the stack's demo Git host, cloned, fixed, diffed.
    git_port = stack.env["FLYSWARM_GIT_PORT"]
    fix_bug = (EXAMPLES / "fix-bug.yaml").read_text().replace("127.0.0.1:4282", f"127.0.0.1:{git_port}")
    assert stack.flyswarm("apply", "-f", "-", input=fix_bug).returncode == 0
    waited = stack.flyswarm("wait", "hello-task", "--for=phase=Succeeded", "--timeout", "240s", timeout=300)
    assert waited.returncode == 0, (
        waited.stdout + waited.stderr + (stack.root / "logs" / "controller.log").read_text()
    )
    result_text = stack.api("/sessions/hello-task")["agent"]["resultText"]
    assert result_text
    described = stack.flyswarm("describe", "session", "hello-task")
    assert described.returncode == 0, described.stderr
    assert "Phase:                Succeeded" in described.stdout
    assert "Result:" in described.stdout and result_text in described.stdout

    fixed = stack.flyswarm("wait", "fix-bug", "--for=phase=Succeeded", "--timeout", "240s", timeout=300)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    diff = stack.flyswarm("diff", "fix-bug")
    assert "-    return a - b\n+    return a + b\n" in diff.stdout, diff.stdout + diff.stderr

    # The machine is gone from the emulator once the session finished.
    deadline = time.monotonic() + 60
    while True:
        machines = stack.emulator("/v1/apps/flyswarm-agents/machines")
        ours = [
            m
            for m in machines
            if (m.get("config", {}).get("metadata") or {}).get("flyswarm_session") == "hello-task"
        ]
        if not ours:
            break
        assert time.monotonic() < deadline, ours
        time.sleep(0.5)

    # Killing components by hand, then `up` again, heals the stack without losing the session.
    os.kill(pids["api"], signal.SIGKILL)
    os.kill(pids["redis"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pids["api"]) or _alive(pids["redis"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    healed = stack.flyswarm("up")
    assert healed.returncode == 0, healed.stdout + healed.stderr
    states = {line.split()[0]: line.split()[1] for line in healed.stdout.splitlines()[1:7]}
    assert states == {
        "redis": "restarted",
        "emulator": "already",
        "model": "already",
        "gateway": "already",
        "api": "restarted",
        "controller": "already",
    }
    assert stack.api("/sessions/hello-task")["status"]["phase"] == "Succeeded"
    # The controller notices Redis is back on its own (not ready until then): status says when.
    deadline = time.monotonic() + 60
    while (status := stack.flyswarm("status")).returncode != 0:
        assert time.monotonic() < deadline, status.stdout
        time.sleep(0.5)
    assert "Sessions:  2 (Succeeded 2)" in status.stdout

    # The chat example's pattern with a short idle timeout: it sleeps, a message wakes it, and the
    # conversation resumes (the scripted model's echo scenario lists every user prompt it was sent).
    nap = yaml.safe_load((EXAMPLES / "chat.yaml").read_text())
    nap["metadata"]["name"] = "chat-nap"
    nap["spec"].update({"idleTimeoutSeconds": 3, "prompt": "[[scenario:echo]] hello"})
    assert stack.flyswarm("apply", "-f", "-", input=yaml.safe_dump(nap)).returncode == 0
    slept = stack.flyswarm("wait", "chat-nap", "--for=phase=Sleeping", "--timeout", "120s", timeout=180)
    assert slept.returncode == 0, slept.stdout + slept.stderr
    assert stack.flyswarm("send", "chat-nap", "[[scenario:echo]] again").returncode == 0
    deadline = time.monotonic() + 120
    while True:
        logs = stack.flyswarm("logs", "chat-nap", "-o", "json")
        texts = [e.get("message") or "" for e in map(json.loads, logs.stdout.splitlines())]
        if any("1. hello" in t and "2. again" in t for t in texts):
            break
        assert time.monotonic() < deadline, logs.stdout
        time.sleep(0.5)
    slept = stack.flyswarm("wait", "chat-nap", "--for=phase=Sleeping", "--timeout", "120s", timeout=180)
    assert slept.returncode == 0, slept.stdout + slept.stderr

    # A chat session keeps a machine running: `down` must take it (and its agent) down too.
    assert stack.flyswarm("apply", "-f", str(EXAMPLES / "chat.yaml")).returncode == 0
    running = stack.flyswarm("wait", "coach-demo", "--for=phase=Running", "--timeout", "120s", timeout=180)
    assert running.returncode == 0, running.stdout + running.stderr
    machine_pids = [m["pid"] for m in stack.emulator("/_admin/machines") if m.get("pid")]
    assert machine_pids
    recorded = {name: stack.pid(name) for name in COMPONENTS}
    marked_before = marked_processes(stack.root)
    assert set(machine_pids) <= set(marked_before)

    down = stack.flyswarm("down")

    assert down.returncode == 0, down.stdout + down.stderr
    for name in COMPONENTS:
        assert not _alive(recorded[name]), name
        assert not (stack.root / "pids" / f"{name}.pid").exists()
    assert [pid for pid in machine_pids if _alive(pid)] == []
    assert marked_processes(stack.root) == []
