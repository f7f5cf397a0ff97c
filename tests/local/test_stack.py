"""The local stack's own rules, without starting the whole stack (tests/cli/test_e2e_local.py does that)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from local.redis_server import free_port
from local.stack import MARKER_ENV, Stack, StackConfig, StackError, marked_processes


def _config(tmp_path: Path, **env: str) -> StackConfig:
    return StackConfig.from_env({"FLYSWARM_LOCAL_DIR": str(tmp_path / ".local"), **env})


def test_every_default_can_be_moved_by_the_environment(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        FLYSWARM_REDIS_PORT="1001",
        FLYSWARM_EMULATOR_PORT="1002",
        FLYSWARM_MODEL_PORT="1003",
        PORT="1004",
        FLYSWARM_CONTROLLER_PORT="1005",
        FLYSWARM_GATEWAY_PORT="1006",
        FLY_APP_NAME="my-agents",
        FLY_AGENT_IMAGE="my-image",
        FLYSWARM_UP_TIMEOUT="90s",
        FLYSWARM_DOWN_TIMEOUT="3",
    )

    assert config.root == (tmp_path / ".local").resolve()
    ports = (
        config.redis_port,
        config.emulator_port,
        config.model_port,
        config.api_port,
        config.controller_port,
    )
    assert ports == (1001, 1002, 1003, 1004, 1005)
    assert config.gateway_url == "http://127.0.0.1:1006"
    assert (config.app_name, config.agent_image) == ("my-agents", "my-image")
    assert (config.ready_timeout, config.stop_timeout) == (90.0, 3.0)
    assert config.api_url == "http://127.0.0.1:1004"


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    config = _config(tmp_path)

    ports = (
        config.redis_port,
        config.emulator_port,
        config.model_port,
        config.gateway_port,
        config.api_port,
        config.controller_port,
    )
    assert ports == (6399, 4280, 4281, 8082, 8080, 9090)
    assert (config.app_name, config.agent_image, config.uses_model) == (
        "flyswarm-agents",
        "flyswarm-agent",
        True,
    )


def test_two_agent_apps_reach_the_controller_and_both_emulated_apps_get_the_agent_secrets(
    tmp_path: Path,
) -> None:
    assert _config(tmp_path).agent_apps == ("flyswarm-agents",)
    stack = Stack(_config(tmp_path, FLYSWARM_FLY_APPS="flyswarm-agents,flyswarm-agents-b"), environ={})
    components = stack.components()

    assert components["controller"].env["FLYSWARM_FLY_APPS"] == "flyswarm-agents,flyswarm-agents-b"
    secrets = json.loads(components["emulator"].env["FLYSWARM_EMULATOR_SECRETS"])
    assert secrets == {app: stack.agent_secrets() for app in ("flyswarm-agents", "flyswarm-agents-b")}
    with pytest.raises(StackError, match="FLYSWARM_FLY_APPS: 'Agents' is not a Fly app name"):
        _config(tmp_path, FLYSWARM_FLY_APPS="Agents")


def test_a_bad_port_names_its_variable(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="FLYSWARM_EMULATOR_PORT='http' is not a port number"):
        _config(tmp_path, FLYSWARM_EMULATOR_PORT="http")


def test_without_a_key_the_agents_use_the_scripted_model(tmp_path: Path) -> None:
    stack = Stack(_config(tmp_path), environ={})

    secrets = stack.agent_secrets()
    components = stack.components()

    assert "model" in components
    # The agents call the gateway and hold no Anthropic key; the gateway forwards to the model with
    # the one key the model accepts.
    # (the controller gives each machine the gateway's address and its session's token).
    assert components["controller"].env["FLYSWARM_AGENT_GATEWAY_URL"] == "http://127.0.0.1:8082"
    assert "ANTHROPIC_API_KEY" not in secrets and not any("redis" in v for v in secrets.values())
    gateway = components["gateway"].env
    assert gateway["FLYSWARM_GATEWAY_UPSTREAM_URL"] == "http://127.0.0.1:4281"
    assert (
        gateway["ANTHROPIC_API_KEY"] == components["model"].env["FLYSWARM_MODEL_API_KEY"] == stack.model_key()
    )
    assert secrets[MARKER_ENV] == str(stack.root)
    assert secrets["FLYSWARM_WORK_ROOT"] == str(stack.root / "sessions")


def test_with_a_key_only_the_gateway_holds_it(tmp_path: Path) -> None:
    key = "sk-ant-real-key-123456"
    environ = {
        "ANTHROPIC_API_KEY": key,
        "FLY_API_TOKEN": "fly-real-token-999",
        "REDIS_URL": "redis://elsewhere",
    }
    stack = Stack(_config(tmp_path, ANTHROPIC_API_KEY=key), environ=environ)

    secrets = stack.agent_secrets()
    components = stack.components()

    assert "model" not in components
    assert "ANTHROPIC_API_KEY" not in secrets
    assert components["controller"].env["FLYSWARM_AGENT_GATEWAY_URL"] == "http://127.0.0.1:8082"
    assert components["gateway"].env["ANTHROPIC_API_KEY"] == key
    assert "FLYSWARM_GATEWAY_UPSTREAM_URL" not in components["gateway"].env  # the real API, by default
    for component in components.values():
        assert all(key not in arg for arg in component.argv), component.name
        if component.name != "gateway":
            assert key not in component.env.values(), component.name
        # The operator's real Fly token never reaches the local stack; the controller gets the local one.
        assert "fly-real-token-999" not in component.env.values(), component.name
    controller = components["controller"].env
    assert controller["FLY_API_TOKEN"] == stack.fly_token()
    assert controller["FLY_API_HOSTNAME"] == "http://127.0.0.1:4280"
    assert controller["REDIS_URL"] == components["api"].env["REDIS_URL"] == "redis://127.0.0.1:6399/0"


def test_the_local_fly_token_is_private_and_stable(tmp_path: Path) -> None:
    stack = Stack(_config(tmp_path), environ={})

    first = stack.fly_token()
    second = Stack(_config(tmp_path), environ={}).fly_token()

    assert first == second and len(first) > 20
    assert (stack.root / "secrets" / "fly-api-token").stat().st_mode & 0o077 == 0


def test_up_refuses_a_port_held_by_a_process_it_did_not_start(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        stack = Stack(_config(tmp_path, FLYSWARM_REDIS_PORT=str(port)), environ={})

        with pytest.raises(StackError) as caught:
            stack.up(echo=lambda _line: None)

    assert f"port {port} (redis) is in use" in str(caught.value)
    assert "FLYSWARM_REDIS_PORT=<port>" in str(caught.value)
    assert stack.recorded_pid("redis") is None


@pytest.fixture
def marked_sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process like an orphaned agent: its own session, this stack's marker in its environment."""
    root = (tmp_path / ".local").resolve()
    root.mkdir(parents=True)
    env = {**os.environ, MARKER_ENV: str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], env=env, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_down_kills_every_process_that_carries_the_stacks_marker(
    tmp_path: Path, marked_sleeper: subprocess.Popen[bytes]
) -> None:
    stack = Stack(_config(tmp_path), environ={})
    other_root = tmp_path / "other"
    assert marked_processes(stack.root) == [marked_sleeper.pid]
    assert marked_processes(other_root) == []
    lines: list[str] = []

    survivors = stack.down(echo=lines.append)

    assert survivors == []
    assert marked_sleeper.wait(10) == -signal.SIGKILL
    assert "  machines    1 leftover process(es) killed" in lines


def test_down_with_nothing_running_says_so(tmp_path: Path) -> None:
    lines: list[str] = []

    Stack(_config(tmp_path), environ={}).down(echo=lines.append)

    assert lines == ["nothing was running"]


def test_down_leaves_a_recycled_pid_alone(tmp_path: Path) -> None:
    # A pid file that now names an unrelated process (pid reuse) must not get that process killed.
    stack = Stack(_config(tmp_path), environ={})
    (stack.root / "pids").mkdir(parents=True)
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    try:
        stack.config.pid_path("api").write_text(f"{bystander.pid}\n")
        lines: list[str] = []

        stack.down(echo=lines.append)

        with pytest.raises(subprocess.TimeoutExpired):
            bystander.wait(0.5)
        assert "  api         was not running" in lines
        assert not stack.config.pid_path("api").exists()
    finally:
        bystander.kill()
        bystander.wait(10)


def test_status_reports_a_stopped_stack_as_down(tmp_path: Path) -> None:
    ports = {name: str(free_port()) for name in ("FLYSWARM_REDIS_PORT", "FLYSWARM_EMULATOR_PORT", "PORT")}
    stack = Stack(_config(tmp_path, **ports), environ={})
    lines: list[str] = []

    healthy = stack.status(echo=lines.append)

    assert healthy is False
    assert any(line.split()[:2] == ["redis", "down"] for line in lines)
    assert "Sessions:  (the API does not answer)" in lines
    assert "Machines:  (the emulator does not answer)" in lines


def test_logs_follow_prefixes_lines_and_survives_truncation(tmp_path: Path) -> None:
    stack = Stack(_config(tmp_path), environ={})
    logs = stack.root / "logs"
    logs.mkdir(parents=True)
    (logs / "api.log").write_text("old 1\nold 2\n")
    lines: list[str] = []
    done = threading.Event()
    follower = threading.Thread(
        target=lambda: stack.follow_logs(echo=lines.append, history=1, poll=0.02, stop=done.is_set),
        daemon=True,
    )
    follower.start()

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 10
        while not any(text in line for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.02)

    wait_for("old 2")
    with open(logs / "controller.log", "a") as fh:
        fh.write("controller up\n")
    wait_for("controller up")
    (logs / "api.log").write_text("fresh\n")  # truncated and rewritten, as a restart with a new file
    wait_for("fresh")
    done.set()
    follower.join(10)

    assert lines == ["api        | old 2", "controller | controller up", "api        | fresh"]


def test_cluster_mode_runs_the_cluster_launcher_and_gives_every_component_a_cluster_url(
    tmp_path: Path,
) -> None:
    stack = Stack(_config(tmp_path, FLYSWARM_REDIS_MODE="cluster", FLYSWARM_REDIS_PORT="7390"), environ={})
    components = stack.components()
    redis = components["redis"]
    assert redis.argv[1:] == ("-m", "local.redis_cluster")
    assert redis.env["FLYSWARM_REDIS_PORT"] == "7390"
    assert redis.env["FLYSWARM_REDIS_DIR"] == str(stack.root / "redis-cluster")
    for name in ("api", "controller"):
        assert components[name].env["REDIS_URL"] == "redis+cluster://127.0.0.1:7390"


def test_an_unknown_redis_mode_is_refused_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="FLYSWARM_REDIS_MODE='sharded' is not one of: single, cluster"):
        _config(tmp_path, FLYSWARM_REDIS_MODE="sharded")
