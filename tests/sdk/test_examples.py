"""The README's SDK snippets and the two examples, run against a real local stack (`flyswarm up` on
free ports: redis-server, the Fly emulator running real agents, the scripted model, the gateway, the
API and the controller), as a user would run them after `make up`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from local.redis_server import free_port
from local.stack import marked_processes

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def readme_snippets() -> list[str]:
    """The Python programs of README "Python SDK": each ```python block and each `python -c "..."`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python SDK\n") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    one_liners = re.findall(r'^python -c "(.*)"$', section, re.M)
    return blocks + one_liners


def test_the_readme_has_snippets_to_run() -> None:
    assert len(readme_snippets()) >= 4


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, str]]:
    root = (tmp_path / "stack" / ".local").resolve()
    root.parent.mkdir(parents=True)
    ports = {
        name: str(free_port())
        for name in (
            "FLYSWARM_REDIS_PORT",
            "FLYSWARM_EMULATOR_PORT",
            "FLYSWARM_MODEL_PORT",
            "FLYSWARM_GATEWAY_PORT",
            "PORT",
            "FLYSWARM_CONTROLLER_PORT",
            "FLYSWARM_GIT_PORT",
        )
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYSWARM_", "FLY_", "ANTHROPIC_"))}
    env.pop("API_TOKENS", None)
    env.pop("REDIS_URL", None)
    env.update(ports)
    env.update(
        {
            "FLYSWARM_LOCAL_DIR": str(root),
            "FLYSWARM_URL": f"http://127.0.0.1:{ports['PORT']}",
            "PYTHONPATH": str(ROOT),
            "FLYSWARM_RESYNC_SECONDS": "1",
            "FLYSWARM_DOWN_TIMEOUT": "10",
        }
    )
    up = subprocess.run(
        [sys.executable, "-m", "cli", "up"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root.parent,
        timeout=180,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        subprocess.run([sys.executable, "-m", "cli", "down"], capture_output=True, env=env, timeout=120)
        for pid in marked_processes(root):
            os.kill(pid, signal.SIGKILL)


def _python(env: dict[str, str], *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    # Run outside the checkout: the SDK must not depend on the working directory.
    cwd = Path(env["FLYSWARM_LOCAL_DIR"]).parent
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def test_readme_snippets_and_examples_run_against_a_local_stack(stack: dict[str, str]) -> None:
    # One test, so one stack: xdist would start a stack per worker for separate tests of a module.
    for index, snippet in enumerate(readme_snippets()):
        ran = _python(stack, "-c", snippet)
        assert ran.returncode == 0, f"README snippet {index}:\n{snippet}\n{ran.stdout}{ran.stderr}"
    _ci_script_fans_out_and_collects_every_result(stack)
    _chat_backend_relays_a_conversation_over_its_websocket(stack)


def _ci_script_fans_out_and_collects_every_result(stack: dict[str, str]) -> None:
    ran = _python(stack, str(EXAMPLES / "ci_fanout.py"), "--count", "5", "--timeout", "300")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = ran.stdout.strip().splitlines()
    assert lines[-1].endswith(": 5 succeeded, 0 failed"), ran.stdout
    assert sum(" Succeeded " in line for line in lines) == 5


def _chat_backend_relays_a_conversation_over_its_websocket(stack: dict[str, str]) -> None:
    port = free_port()
    cwd = Path(stack["FLYSWARM_LOCAL_DIR"]).parent
    log = cwd / f"relay-{port}.log"
    with open(log, "wb") as out:
        relay = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "chat_relay.py"), "--port", str(port)],
            env=stack,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                assert relay.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        types: list[str] = []
        with connect(f"ws://127.0.0.1:{port}/chat/alice", open_timeout=30) as socket:
            socket.send("hello from alice")
            while "turn_finished" not in types:
                frame = json.loads(socket.recv(timeout=300))
                assert set(frame) == {"id", "type", "message"}
                types.append(frame["type"])
                assert frame["type"] != "turn_failed", (types, log.read_text())
        assert "turn_started" in types
        assert types.index("turn_started") < types.index("turn_finished")
    finally:
        relay.terminate()
        relay.wait(30)
