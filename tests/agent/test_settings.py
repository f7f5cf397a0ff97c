"""Agent settings: the control plane's address and token, validation, and the scrubbed environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.settings import AgentSettings, scrub_environment
from agent.token_handoff import receive

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fst_s-1_" + "ab" * 32


def _base(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYSWARM_SESSION_ID", "s-1")
    monkeypatch.setenv("FLYSWARM_CONTROL_URL", "http://gateway.internal:8082/")
    monkeypatch.setenv("FLYSWARM_SESSION_TOKEN", TOKEN)


def test_the_control_url_and_token_are_read_and_the_token_stays_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _base(monkeypatch)
    settings = AgentSettings()
    assert settings.control_url == "http://gateway.internal:8082"
    assert settings.session_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)


def test_fly_machine_id_is_picked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    _base(monkeypatch)
    monkeypatch.setenv("FLY_MACHINE_ID", "148e21ea7b9e89")
    assert AgentSettings().machine_id == "148e21ea7b9e89"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FLYSWARM_SESSION_ID", None),
        ("FLYSWARM_SESSION_ID", "Not_A_Label"),
        ("FLYSWARM_CONTROL_URL", None),
        ("FLYSWARM_CONTROL_URL", "redis://10.0.0.5:6379"),
        ("FLYSWARM_SESSION_TOKEN", None),
        ("FLYSWARM_HEARTBEAT_INTERVAL_SECONDS", "40"),
    ],
)
def test_invalid_environments_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str | None
) -> None:
    _base(monkeypatch)
    if value is None:
        monkeypatch.delenv(name)
    else:
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        AgentSettings()


def test_scrubbing_removes_the_token_and_every_forbidden_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    _base(monkeypatch)
    monkeypatch.setenv("FLYSWARM_REDIS_URL", "redis://u:p@h/0")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    monkeypatch.setenv("FLY_API_TOKEN", "t")
    removed = scrub_environment()
    assert set(removed) == {
        "FLYSWARM_SESSION_TOKEN",
        "FLYSWARM_REDIS_URL",
        "ANTHROPIC_API_KEY",
        "FLY_API_TOKEN",
    }
    assert not set(removed) & set(os.environ)
    assert os.environ["FLYSWARM_SESSION_ID"] == "s-1"


def test_a_token_file_is_read_once_and_deleted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    monkeypatch.setenv("FLYSWARM_SESSION_TOKEN_FILE", str(path))
    assert receive() == TOKEN
    assert not path.exists()
    assert "FLYSWARM_SESSION_TOKEN_FILE" not in os.environ


def test_the_handoff_re_executes_without_the_token_in_the_process_environment(tmp_path: Path) -> None:
    # A tiny program doing what the agent's main() does first; it prints what it received and its
    # own /proc/self/environ as the kernel shows it to any process of the same user.
    program = (
        "import sys, pathlib\n"
        "from agent import token_handoff\n"
        "token_handoff.hand_off([sys.executable, '-c', sys.argv[1], sys.argv[1]])\n"
        "print('received', token_handoff.receive())\n"
        "print('environ', pathlib.Path('/proc/self/environ').read_bytes())\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "FLYSWARM_SESSION_TOKEN": TOKEN,
        "ANTHROPIC_API_KEY": "sk-ant-must-go",
    }
    out = subprocess.run(
        [sys.executable, "-c", program, program],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert f"received {TOKEN}" in out
    environ_line = next(line for line in out.splitlines() if line.startswith("environ"))
    assert TOKEN not in environ_line and "sk-ant-must-go" not in environ_line
    assert "FLYSWARM_SESSION_TOKEN_FD" in environ_line  # the pipe's number only
