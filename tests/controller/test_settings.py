"""Controller settings: the seed's names, FLYSWARM_ names, secrets kept secret, docs for every field."""

from __future__ import annotations

import pytest

from controller.settings import ControllerSettings, PlanSettings


def test_defaults_match_the_documented_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "FLY_APP_NAME", "FLYSWARM_RESYNC_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    settings = ControllerSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.fly_app_name == "flyswarm-agents"
    assert settings.fly_agent_image == "flyswarm-agent"
    assert settings.fly_api_hostname == "https://api.machines.dev"
    assert (settings.resync_seconds, settings.heartbeat_ttl_seconds, settings.boot_grace_seconds) == (
        15,
        30,
        60,
    )
    assert (settings.wedge_seconds, settings.wedge_updating_seconds) == (300, 600)
    assert settings.default_region == "fra" and settings.controller_port == 9090
    assert settings.plan_settings() == PlanSettings()


def test_reads_seed_and_prefixed_names_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:pw-from-env@10.0.0.1:6379/0")
    monkeypatch.setenv("FLY_API_TOKEN", "fly-token-from-env")
    monkeypatch.setenv("FLY_APP_NAME", "my-agents")
    monkeypatch.setenv("FLYSWARM_RESYNC_SECONDS", "5")
    monkeypatch.setenv("FLYSWARM_MAX_DESTROYS_PER_PASS", "3")
    settings = ControllerSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.fly_app_name == "my-agents"
    assert settings.resync_seconds == 5 and settings.max_destroys_per_pass == 3
    assert settings.redis_url.get_secret_value() == "redis://:pw-from-env@10.0.0.1:6379/0"
    assert "pw-from-env" not in repr(settings) and "fly-token-from-env" not in repr(settings)
    assert settings.plan_settings().resync_seconds == 5


def test_every_setting_is_documented_with_its_variable() -> None:
    fields = ControllerSettings.model_fields
    names = [f.validation_alias for f in fields.values()]
    assert all(isinstance(n, str) for n in names)
    assert len(names) == len(set(names)) == len(fields)
    assert all(f.description for f in fields.values())
    assert {"REDIS_URL", "FLY_API_TOKEN", "FLYSWARM_RESYNC_SECONDS", "LOG_LEVEL"} <= set(names)  # type: ignore[operator]
    assert all(str(n).startswith(("FLYSWARM_", "FLY_", "REDIS_", "LOG_")) for n in names)
