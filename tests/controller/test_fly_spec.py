"""Every request the Fly client can send validates against the official OpenAPI document.

The client runs a scenario that calls every public operation with every optional parameter set,
against the real emulator; a recording transport keeps the requests exactly as sent, and each is
checked for: a known (method, path template), only declared query parameters with values of the
declared type, required headers present, and a JSON body valid against the requestBody schema.
"""

from __future__ import annotations

from pathlib import Path

from controller.fly_types import MachineCheck, MachineGuest, MachineService, StopConfig
from tests.controller.fly_contract import KNOWN_SPEC_OMISSIONS, OpenAPIContract
from tests.controller.fly_harness import FlyHarness, sleeper_config

MACHINE = "/v1/apps/{app_name}/machines/{machine_id}"
EVERY_OPERATION = {
    ("GET", "/v1/apps/{app_name}/machines"),
    ("POST", "/v1/apps/{app_name}/machines"),
    ("GET", MACHINE),
    ("POST", MACHINE),
    ("DELETE", MACHINE),
    ("POST", MACHINE + "/start"),
    ("POST", MACHINE + "/stop"),
    ("POST", MACHINE + "/suspend"),
    ("POST", MACHINE + "/restart"),
    ("POST", MACHINE + "/signal"),
    ("POST", MACHINE + "/cordon"),
    ("POST", MACHINE + "/uncordon"),
    ("GET", MACHINE + "/wait"),
    ("GET", MACHINE + "/lease"),
    ("POST", MACHINE + "/lease"),
    ("DELETE", MACHINE + "/lease"),
    ("GET", MACHINE + "/events"),
    ("GET", MACHINE + "/metadata"),
    ("PATCH", MACHINE + "/metadata"),
    ("GET", MACHINE + "/metadata/{key}"),
    ("POST", MACHINE + "/metadata/{key}"),
    ("DELETE", MACHINE + "/metadata/{key}"),
}
MUTATIONS = {"POST", "PATCH", "DELETE"}


async def exercise_every_operation(fly: FlyHarness) -> None:
    client = fly.client(rate_limits=False)
    config = sleeper_config(
        {"flyswarm_session": "spec", "flyswarm_managed": "true"},
        env={"A": "1"},
        guest=MachineGuest(cpu_kind="shared", cpus=1, memory_mb=256),
        auto_destroy=False,
        services=[MachineService(protocol="tcp", internal_port=8080, autostart=True, autostop="suspend")],
        checks={"alive": MachineCheck(type="tcp", port=8080, interval="15s", timeout="2s")},
    )
    other = await client.create_machine(sleeper_config({"flyswarm_session": "spec"}), skip_launch=True)
    machine = await client.create_machine(
        config, name="spec-machine", region="fra", skip_service_registration=True, lease_ttl=30
    )
    assert machine.nonce
    nonce = machine.nonce
    await client.wait_machine(machine.id, ["started", "failed"], timeout=10, long_poll=5)
    await client.get_machine(machine.id, version=machine.version, include_leases=True)

    page = await client.list_machines(
        metadata={"flyswarm_session": "spec", "flyswarm_managed": "true"},
        include_deleted=True,
        include_leases=True,
        summary=True,
        region="fra",
        states=["started", "created"],
        limit=1,
    )
    first = await client.list_machines(metadata={"flyswarm_session": "spec"}, limit=1)
    assert first.next_cursor
    await client.list_machines(metadata={"flyswarm_session": "spec"}, limit=1, cursor=first.next_cursor)
    assert page.machines

    lease = await client.refresh_lease(machine.id, nonce, ttl=20)
    assert lease.nonce == nonce
    await client.get_lease(machine.id)
    current = await client.get_machine(machine.id)
    assert current.config is not None
    updated = await client.update_machine(
        machine.id,
        current.config.model_copy(update={"stop_config": StopConfig(signal="SIGINT", timeout="3s")}),
        current_version=current.version,
        skip_launch=False,
        region="fra",
        name="spec-machine",
        nonce=nonce,
    )
    started = await client.wait_machine(machine.id, "started", version=updated.version, timeout=10)
    await client.signal_machine(machine.id, "SIGUSR1", nonce=nonce)
    await client.restart_machine(machine.id, signal="SIGTERM", timeout=1.5, nonce=nonce)
    await client.wait_machine(machine.id, "started", timeout=10, from_event_id=started.event_id)
    await client.cordon_machine(machine.id, nonce=nonce)
    await client.uncordon_machine(machine.id, nonce=nonce)
    await client.set_metadata(machine.id, "phase", "running", nonce=nonce)
    await client.get_metadata_key(machine.id, "phase")
    await client.get_metadata(machine.id)
    await client.update_metadata(
        machine.id, {"phase": None, "x": "y"}, machine_version=updated.version, nonce=nonce
    )
    await client.delete_metadata(machine.id, "x", nonce=nonce)
    await client.list_events(machine.id, limit=10)
    await client.stop_machine(machine.id, signal="SIGTERM", timeout=2, nonce=nonce)
    await client.stop_machine(other.id)
    await client.wait_machine(machine.id, "stopped", version=updated.version, timeout=10)
    await client.start_machine(machine.id, nonce=nonce)
    await client.wait_machine(machine.id, "started", timeout=10)
    await client.suspend_machine(machine.id, nonce=nonce)
    await client.wait_machine(machine.id, "suspended", timeout=10)
    await client.release_lease(machine.id, nonce)
    async with client.lease(machine.id, ttl=13, description="spec") as held:
        await client.destroy_machine(machine.id, force=True, nonce=held)
    await client.wait_machine(machine.id, ["destroyed", "settled"], timeout=10)
    await client.destroy_machine(other.id)


async def test_every_request_the_client_sends_validates_against_the_spec(
    fly: FlyHarness, openapi_path: Path
) -> None:
    contract = OpenAPIContract(openapi_path)
    await exercise_every_operation(fly)
    problems = [p for e in fly.recorder.exchanges for p in contract.request_problems(e.request, e.body)]
    assert problems == []
    covered = set()
    for exchange in fly.recorder.exchanges:
        route = contract.route(exchange.request.method, exchange.request.url.path)
        assert route is not None
        covered.add((route.method, route.template))
    assert covered == EVERY_OPERATION
    # Everything succeeded: the scenario really exercised the happy path of each operation.
    failures = [
        (e.request.method, e.request.url.path, e.response_status)
        for e in fly.recorder.exchanges
        if e.response_status is None or e.response_status >= 400
    ]
    assert failures == []


async def test_the_nonce_goes_on_every_mutation_it_was_given_to(fly: FlyHarness) -> None:
    await exercise_every_operation(fly)
    leased_mutations = [
        e.request
        for e in fly.recorder.exchanges
        if e.request.method in MUTATIONS and "fly-machine-lease-nonce" in e.request.headers
    ]
    paths = {(r.method, r.url.path.rsplit("/", 1)[-1]) for r in leased_mutations}
    for action in (
        "start",
        "stop",
        "suspend",
        "restart",
        "signal",
        "cordon",
        "uncordon",
        "metadata",
        "lease",
    ):
        assert any(p[1] == action for p in paths), action
    assert any(r.method == "DELETE" and "/lease" not in r.url.path for r in leased_mutations)  # destroy
    assert all(r.headers["authorization"].startswith("Bearer ") for r in leased_mutations)


async def test_emulator_success_responses_match_the_spec(fly: FlyHarness, openapi_path: Path) -> None:
    contract = OpenAPIContract(openapi_path)
    await exercise_every_operation(fly)
    problems = [p for e in fly.recorder.exchanges for p in contract.response_problems(e)]
    assert problems == []


def test_forms_fly_go_sends_are_not_in_the_spec_so_we_do_not_send_them(openapi_path: Path) -> None:
    contract = OpenAPIContract(openapi_path)
    for method, template, param in KNOWN_SPEC_OMISSIONS:
        operation = contract.doc["paths"][template][method.lower()]
        declared = {p["name"] for p in operation.get("parameters", [])}
        assert param not in declared


def test_the_contract_checker_catches_what_the_spec_forbids(openapi_path: Path) -> None:
    import httpx

    contract = OpenAPIContract(openapi_path)
    base = "http://fly.test/v1/apps/a/machines"
    cases = [
        httpx.Request("DELETE", base + "/m1?kill=true"),
        httpx.Request("GET", base + "/m1/wait?timeout=soon"),
        httpx.Request("GET", base + "/m1/wait?state=running"),
        httpx.Request("DELETE", base + "/m1/lease"),
        httpx.Request("POST", base, json={"config": {"image": None}}),
        httpx.Request("GET", base + "/m1/nonexistent"),
        httpx.Request("POST", base + "/m1/stop", json={"signal": "SIGWHATEVER"}),
    ]
    for request in cases:
        assert contract.request_problems(request, request.read()), request
