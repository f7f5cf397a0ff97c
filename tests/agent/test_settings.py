"""Agent settings: credentials composition, validation, and the scrubbed environment."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from agent.settings import AgentSettings, scrub_environment


def test_username_and_password_variables_override_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYSWARM_SESSION_ID", "s-1")
    monkeypatch.setenv("FLYSWARM_REDIS_URL", "redis://old:pw@10.0.0.5:6380/0")
    monkeypatch.setenv("FLYSWARM_REDIS_USERNAME", "fs-session-s-1")
    monkeypatch.setenv("FLYSWARM_REDIS_PASSWORD", "p@ss/word")
    settings = AgentSettings()
    assert settings.redis_connection_url() == "redis://fs-session-s-1:p%40ss%2Fword@10.0.0.5:6380/0"
    assert "p@ss" not in repr(settings)


def test_fly_machine_id_is_picked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYSWARM_SESSION_ID", "s-1")
    monkeypatch.setenv("FLYSWARM_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("FLY_MACHINE_ID", "148e21ea7b9e89")
    assert AgentSettings().machine_id == "148e21ea7b9e89"


@pytest.mark.parametrize(
    "env",
    [
        {"FLYSWARM_REDIS_URL": "redis://x"},  # no session id
        {"FLYSWARM_SESSION_ID": "Not_A_Label", "FLYSWARM_REDIS_URL": "redis://x"},
        {
            "FLYSWARM_SESSION_ID": "s",
            "FLYSWARM_REDIS_URL": "redis://x",
            "FLYSWARM_HEARTBEAT_INTERVAL_SECONDS": "40",
        },
    ],
)
def test_invalid_environments_are_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in ("FLYSWARM_SESSION_ID", "FLYSWARM_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        AgentSettings()


def test_scrubbing_removes_redis_credentials_and_fly_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYSWARM_REDIS_URL", "redis://u:p@h/0")
    monkeypatch.setenv("FLYSWARM_REDIS_PASSWORD", "p")
    monkeypatch.setenv("FLY_API_TOKEN", "t")
    monkeypatch.setenv("FLYSWARM_SESSION_ID", "s")
    removed = scrub_environment()
    assert set(removed) == {"FLYSWARM_REDIS_URL", "FLYSWARM_REDIS_PASSWORD", "FLY_API_TOKEN"}
    assert "FLYSWARM_REDIS_URL" not in os.environ and "FLY_API_TOKEN" not in os.environ
    assert os.environ["FLYSWARM_SESSION_ID"] == "s"
