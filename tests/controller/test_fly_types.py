"""Typed Fly shapes: tolerant parsing, no nulls on the wire, bodies valid against the spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.fly_types import (
    CreateMachineRequest,
    Lease,
    Machine,
    MachineCheck,
    MachineConfig,
    MachineEvent,
    MachineGuest,
    MachineInit,
    MachineRestart,
    MachineService,
    StopConfig,
    UpdateMachineRequest,
    go_duration,
)
from tests.controller.fly_contract import OpenAPIContract

SCHEMAS = "#/components/schemas/"


def full_config() -> MachineConfig:
    return MachineConfig(
        image="flyswarm-agent",
        env={"FLYSWARM_SESSION_ID": "s1"},
        metadata={"flyswarm_session": "s1", "flyswarm_managed": "true"},
        guest=MachineGuest(cpu_kind="shared", cpus=1, memory_mb=1024),
        auto_destroy=True,
        restart=MachineRestart(policy="on-failure", max_retries=3),
        stop_config=StopConfig(signal="SIGTERM", timeout="10s"),
        init=MachineInit(exec=["python", "-m", "agent"]),
        services=[MachineService(protocol="tcp", internal_port=8080, autostop=True)],
        checks={"alive": MachineCheck(type="tcp", port=8080, interval="15s")},
    )


def test_serialization_omits_absent_fields_everywhere() -> None:
    body = CreateMachineRequest(config=MachineConfig(image="x", guest=MachineGuest(cpus=1))).to_api()
    assert body == {"config": {"image": "x", "guest": {"cpus": 1}}}


def test_unknown_fields_survive_a_round_trip() -> None:
    raw = {
        "id": "m1",
        "state": "started",
        "config": {"image": "x", "files": [{"guest_path": "/a", "raw_value": "eA=="}], "dns": {"skip": None}},
        "brand_new_field": {"a": 1},
    }
    machine = Machine.model_validate(raw)
    assert machine.config is not None
    assert machine.config.to_api() == {
        "image": "x",
        "files": [{"guest_path": "/a", "raw_value": "eA=="}],
        "dns": {},
    }
    assert machine.to_api()["brand_new_field"] == {"a": 1}


def test_old_boolean_autostop_is_sent_in_the_string_form() -> None:
    service = MachineService.model_validate({"autostop": False, "internal_port": 80})
    assert service.to_api() == {"autostop": "off", "internal_port": 80}
    assert MachineService(autostop=True).to_api() == {"autostop": "stop"}


def test_request_bodies_validate_against_the_spec(openapi_path: Path) -> None:
    contract = OpenAPIContract(openapi_path)
    create = CreateMachineRequest(
        config=full_config(), name="n", region="fra", skip_launch=True, lease_ttl=13
    )
    update = UpdateMachineRequest(config=full_config(), current_version="01J0000000000000000000000")
    assert contract.schema_errors({"$ref": SCHEMAS + "CreateMachineRequest"}, create.to_api()) == []
    assert contract.schema_errors({"$ref": SCHEMAS + "UpdateMachineRequest"}, update.to_api()) == []


def test_a_null_would_have_been_rejected_by_the_spec(openapi_path: Path) -> None:
    # Guards the test above: the validator does catch the nulls we make sure never to send.
    contract = OpenAPIContract(openapi_path)
    errors = contract.schema_errors({"$ref": SCHEMAS + "CreateMachineRequest"}, {"config": {"image": None}})
    assert errors


def test_exit_event_helper_reads_exit_details() -> None:
    event = MachineEvent.model_validate(
        {
            "type": "exit",
            "status": "stopped",
            "source": "flyd",
            "timestamp": 1700000000000,
            "request": {
                "exit_event": {"exit_code": 3, "oom_killed": False, "signal": -1},
                "restart_count": 1,
            },
        }
    )
    assert event.exit_event is not None
    assert event.exit_event.exit_code == 3
    assert event.restart_count == 1
    assert MachineEvent(type="start", status="started").exit_event is None


def test_machine_helpers_give_metadata_version_and_last_exit() -> None:
    machine = Machine.model_validate(
        {
            "id": "m1",
            "instance_id": "v1",
            "config": {"metadata": {"k": "v"}},
            "events": [
                {"type": "exit", "timestamp": 1, "request": {"exit_event": {"exit_code": 1}}},
                {"type": "exit", "timestamp": 5, "request": {"exit_event": {"exit_code": 0}}},
                {"type": "start", "timestamp": 9},
            ],
        }
    )
    assert machine.metadata == {"k": "v"}
    assert machine.current_version == "v1"
    assert machine.last_exit is not None and machine.last_exit.exit_code == 0
    assert Machine(id="m2").metadata == {}


def test_lease_parses_both_the_envelope_and_the_bare_form() -> None:
    envelope = {"status": "success", "data": {"nonce": "abc", "expires_at": 17, "owner": "me"}}
    assert Lease.from_response(envelope).nonce == "abc"
    assert Lease.from_response({"nonce": "def"}).nonce == "def"


@pytest.mark.parametrize(("seconds", "text"), [(10, "10s"), (0, "0s"), (0.5, "500ms"), (1.25, "1250ms")])
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_go_duration_rejects_negative() -> None:
    with pytest.raises(ValueError):
        go_duration(-1)
