"""The machine a session runs on: built from its spec, tagged for identity, and free of our secrets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.models import Metadata, Session, SessionSpec
from controller.fly_types import CreateMachineRequest, MachineConfig
from controller.machine_config import (
    MAX_NAME_LENGTH,
    VOLUME_MOUNT_PATH,
    MachineConfigBuilder,
    controller_secrets,
    machine_config_for,
    machine_name,
)
from controller.observed import parse_tags
from controller.settings import ControllerSettings

FLY_TOKEN = "FlyV1 fm2_super-secret-fly-token"
CONTROLLER_REDIS_PASSWORD = "controller-redis-pw-123"
TOKEN = "fst_s1_" + "5e" * 32
CONTROL_URL = "http://flyswarm-gateway.internal:8082"


def make_settings(**overrides: Any) -> ControllerSettings:
    values: dict[str, Any] = {
        "redis_url": f"redis://default:{CONTROLLER_REDIS_PASSWORD}@127.0.0.1:6379/0",
        "fly_api_token": FLY_TOKEN,
        "agent_gateway_url": CONTROL_URL,
        **overrides,
    }
    return ControllerSettings(_env_file=None, **values)  # type: ignore[call-arg]


def make_session(mode: str = "task", sid: str = "s1", **spec: Any) -> Session:
    spec.setdefault("prompt", "fix it" if mode == "task" else None)
    return Session(metadata=Metadata(name=sid, generation=1), spec=SessionSpec(mode=mode, **spec))


def build(session: Session | None = None, **kw: Any) -> dict[str, Any]:
    return machine_config_for(
        session or make_session(),
        kw.pop("settings", None) or make_settings(),
        launch_id=kw.pop("launch_id", "g1r0-abc"),
        session_token=kw.pop("session_token", TOKEN),
        **kw,
    )


def test_config_carries_image_guest_region_and_identity_tags() -> None:
    session = make_session(
        machine={"region": "ams", "guest": {"cpuKind": "performance", "cpus": 2, "memoryMb": 4096}}
    )
    body = build(session)
    config = body["config"]
    assert body["region"] == "ams"
    assert config["image"] == "flyswarm-agent"
    assert config["guest"] == {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    assert parse_tags(config["metadata"]) == (True, "s1", "g1r0-abc")


def test_spec_image_wins_over_the_deployment_image() -> None:
    assert build(make_session(machine={"image": "registry.fly.io/custom:1"}))["config"]["image"] == (
        "registry.fly.io/custom:1"
    )
    assert (
        build(image="registry.fly.io/flyswarm-agent:v2")["config"]["image"]
        == "registry.fly.io/flyswarm-agent:v2"
    )
    assert build(settings=make_settings(fly_agent_image="mine"))["config"]["image"] == "mine"


def test_region_override_is_used_for_fallback() -> None:
    assert build(region="iad")["region"] == "iad"


def test_agent_env_names_session_control_plane_token_and_heartbeat_and_keeps_spec_env() -> None:
    env = build(make_session(machine={"env": {"GIT_AUTHOR_NAME": "bot"}}))["config"]["env"]
    assert env["FLYSWARM_SESSION_ID"] == "s1"
    assert env["FLYSWARM_LAUNCH_ID"] == "g1r0-abc"
    assert env["FLYSWARM_CONTROL_URL"] == CONTROL_URL
    assert env["FLYSWARM_SESSION_TOKEN"] == TOKEN
    assert env["FLYSWARM_HEARTBEAT_TTL_SECONDS"] == "30"
    assert float(env["FLYSWARM_HEARTBEAT_INTERVAL_SECONDS"]) < float(env["FLYSWARM_HEARTBEAT_TTL_SECONDS"])
    assert float(env["FLYSWARM_STOP_TIMEOUT_SECONDS"]) < 30
    assert env["GIT_AUTHOR_NAME"] == "bot"
    assert all(isinstance(v, str) for v in env.values())


def test_task_machines_destroy_themselves_and_chat_machines_do_not() -> None:
    assert build(make_session("task"))["config"]["auto_destroy"] is True
    assert build(make_session("chat"))["config"]["auto_destroy"] is False


def test_fly_never_restarts_the_machine_and_stop_lets_the_agent_flush() -> None:
    config = build(settings=make_settings(stop_grace_seconds=45))["config"]
    assert config["restart"] == {"policy": "no"}
    assert config["stop_config"] == {"signal": "SIGTERM", "timeout": "45s"}


def test_no_controller_secret_reaches_the_machine() -> None:
    text = json.dumps(build(make_session(machine={"env": {"ANTHROPIC_BASE_URL": "http://model"}})))
    assert FLY_TOKEN not in text
    assert CONTROLLER_REDIS_PASSWORD not in text
    assert "ANTHROPIC_API_KEY" not in text
    assert "FLY_API_TOKEN" not in text
    assert "redis" not in text.lower()  # no Redis address, no Redis credential: the agent has none


def test_refuses_to_build_a_config_that_would_hand_a_machine_a_redis_address() -> None:
    with pytest.raises(ValueError, match="Redis address"):
        build(make_session(machine={"env": {"CACHE": "redis://10.0.0.5:6379/0"}}))


def test_refuses_to_build_a_config_that_would_leak_the_controller_redis_password() -> None:
    with pytest.raises(ValueError, match="controller secret"):
        build(make_session(machine={"env": {"PW": CONTROLLER_REDIS_PASSWORD}}))


def test_refuses_a_spec_env_value_that_carries_the_fly_token() -> None:
    with pytest.raises(ValueError, match="controller secret"):
        build(make_session(machine={"env": {"SOMETHING": FLY_TOKEN}}))


def test_controller_secrets_are_the_fly_token_and_the_redis_password() -> None:
    assert set(controller_secrets(make_settings())) == {FLY_TOKEN, CONTROLLER_REDIS_PASSWORD}


def test_machine_names_are_unique_per_launch_and_bounded() -> None:
    assert machine_name("s1", "g1r0-a") != machine_name("s1", "g1r0-b")
    long_a, long_b = "a" * 60 + "-x", "a" * 60 + "-y"
    names = {machine_name(sid, "g12r3-lz8k2abc") for sid in (long_a, long_b)}
    assert len(names) == 2 and all(len(n) <= MAX_NAME_LENGTH for n in names)
    assert build()["name"] == "s1-g1r0-abc"


def test_body_is_a_valid_fly_create_request() -> None:
    request = CreateMachineRequest.model_validate(build())
    assert request.config.restart is not None and request.config.restart.policy == "no"
    assert request.to_api()["config"]["metadata"]["flyswarm_managed"] == "true"


def test_builder_gives_the_executor_a_typed_config() -> None:
    builder = MachineConfigBuilder(make_settings())
    config = builder(make_session("chat"), launch_id="g1r0-abc", region="fra", session_token=TOKEN)
    assert isinstance(config, MachineConfig)
    assert config.auto_destroy is False and (config.env or {})["FLYSWARM_SESSION_TOKEN"] == TOKEN


def test_a_persistent_session_mounts_its_volume_as_the_agents_work_root() -> None:
    config = build(make_session("chat", persistence={"sizeGb": 1}), volume_id="vol_abc")["config"]
    assert config["mounts"] == [{"volume": "vol_abc", "path": VOLUME_MOUNT_PATH}]
    assert config["env"]["FLYSWARM_VOLUME_ROOT"] == VOLUME_MOUNT_PATH
    assert "mounts" not in build(make_session("chat"))["config"]
