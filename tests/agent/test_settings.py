"""Agent settings: the control plane's address and token, validation, and the scrubbed environment."""

from __future__ import annotations

import os
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
