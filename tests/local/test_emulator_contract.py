"""The emulator agrees with the official Fly Machines OpenAPI document (shared/fly/openapi.json).

Two angles:

* scenarios that call every machines, apps and org endpoint the emulator serves, in the forms real clients
  send, and validates every response body against the schema the spec declares for its status
  (undeclared error statuses must still be Fly's ``ErrorResponse``);
* schemathesis generating requests from the spec for every machines operation, against the
  emulator running as a server, asserting no 5xx and no response-schema violation.

Documented exclusions (the spec is wrong relative to Fly's real behaviour):
* Lease responses are an envelope ``{"status": "success", "data": {...}}`` on real Fly (docs
  examples, fly-go's ``MachineLease``), while the spec's ``Lease`` schema is the bare object. The
  envelope happens to validate (every ``Lease`` property is optional, extra keys are allowed), so
  no operation is excluded; the inner ``data`` is additionally checked against ``Lease`` here.
* ``Machines_exec`` is not emulated (arbitrary command execution); it answers 400 ErrorResponse,
  which the spec declares.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_schema_validator import OAS30Validator

from local.emulator import EmulatorSettings, create_app, emulator_state
from tests.local.test_emulator_server import running_emulator

MACHINES_PREFIX = "/v1/apps/{app_name}/machines"
#: Every path the emulator serves under /v1: the machines API, the Apps API, the org machine list,
#: volumes (tests/local/test_emulator_volumes.py).
SERVED = re.compile(
    r"^/v1/apps(/\{app_name\}(/machines.*|/volumes(/\{volume_id\}(/extend)?)?)?)?$|^/v1/orgs/\{org_slug\}/machines$"
)
SLEEP = (
    "import signal, time\n"
    "signal.signal(signal.SIGUSR2, lambda *a: None)\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(0.05)"
)


class SpecValidator:
    """Validates responses against the response schemas of the machines operations."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.components = spec["components"]
        self.routes: list[tuple[re.Pattern[str], str]] = []
        for template in spec["paths"]:
            if SERVED.match(template):
                pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
                self.routes.append((re.compile(pattern), template))
        # Most specific first (literal segments beat parameters).
        self.routes.sort(key=lambda route: (route[1].count("{"), -len(route[1])))
        self.seen: set[tuple[str, str, int]] = set()

    def template(self, path: str) -> str:
        for pattern, template in self.routes:
            if pattern.match(path):
                return template
        raise AssertionError(f"no spec path for {path}")

    def schema(self, ref_or_schema: dict[str, Any]) -> OAS30Validator:
        return OAS30Validator({**ref_or_schema, "components": self.components})

    def validate(self, method: str, path: str, status: int, body: bytes, headers: httpx.Headers) -> None:
        template = self.template(path)
        operation = self.spec["paths"][template].get(method.lower())
        if operation is None:  # a method the path does not have: 405 with Fly's error shape
            assert status == 405, f"{method} {template} -> {status}"
            self.schema({"$ref": "#/components/schemas/ErrorResponse"}).validate(json.loads(body))
            return
        self.seen.add((operation["operationId"], method, status))
        declared = operation["responses"].get(str(status))
        payload: Any = json.loads(body) if body else None
        where = f"{method} {template} -> {status}: {body[:300]!r}"
        if declared is None:
            assert status >= 400, f"undeclared success status {where}"
            self.schema({"$ref": "#/components/schemas/ErrorResponse"}).validate(payload)
            assert isinstance(payload["error"], str), where
            return
        content = (declared.get("content") or {}).get("application/json")
        if content and "schema" in content:
            errors = list(self.schema(content["schema"]).iter_errors(payload))
            assert not errors, f"{where}: {errors[0].message}"
        for name, header in (declared.get("headers") or {}).items():
            if name in headers:
                self.schema(header["schema"]).validate(headers[name])
        if operation["operationId"] in ("Machines_show_lease", "Machines_create_lease") and status < 300:
            assert payload["status"] == "success"
            self.schema({"$ref": "#/components/schemas/Lease"}).validate(payload["data"])


@pytest.fixture
def spec(openapi_path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(openapi_path.read_text())
    return loaded


@pytest.fixture
async def validated_client(
    spec: dict[str, Any], tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, SpecValidator]]:
    validator = SpecValidator(spec)
    app = create_app(EmulatorSettings(transition_delay=0.01, work_root=tmp_path / "work", stop_timeout=2))

    async def check(response: httpx.Response) -> None:
        await response.aread()
        if response.request.url.path.startswith("/v1/"):
            validator.validate(
                response.request.method,
                response.request.url.path,
                response.status_code,
                response.content,
                response.headers,
            )

    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://emulator",
        timeout=70,
        event_hooks={"response": [check]},
    )
    try:
        yield client, validator
    finally:
        await client.aclose()
        await emulator_state(app).aclose()


async def test_every_machines_endpoint_answers_per_the_spec(
    validated_client: tuple[httpx.AsyncClient, SpecValidator],
) -> None:
    client, validator = validated_client
    config = {
        "image": "python:3.11-slim",
        "init": {"exec": [sys.executable, "-c", SLEEP]},
        "restart": {"policy": "no"},
        "metadata": {"flyswarm_session": "s1"},
        "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
        "stop_config": {"signal": "SIGTERM", "timeout": "2s"},
    }
    base = "/v1/apps/contract/machines"

    async def call(method: str, url: str, expected: int, **kwargs: Any) -> httpx.Response:
        r = await client.request(method, url, **kwargs)
        assert r.status_code == expected, f"{method} {url}: {r.status_code} {r.text}"
        return r

    machine = (
        await call("POST", base, 200, json={"config": config, "region": "fra", "lease_ttl": 30})
    ).json()
    mid, nonce = machine["id"], machine["nonce"]
    m = f"{base}/{mid}"
    lease = {"fly-machine-lease-nonce": nonce}
    await call("GET", f"{m}/wait", 200, params={"state": "started", "timeout": 20})
    for _ in range(500):  # the script must have installed its SIGUSR2 handler before we signal it
        if "ready" in (await client.get(f"/_admin/machines/{mid}/logs")).text:
            break
        await asyncio.sleep(0.02)
    await call(
        "GET",
        base,
        200,
        params={"metadata.flyswarm_session": "s1", "summary": "true", "include_leases": "true"},
    )
    await call("GET", base, 200, params={"limit": 1, "include_deleted": "true", "state": "started,stopped"})
    await call("GET", m, 200, params={"include_leases": "true"})
    await call("GET", m, 200, params={"version": machine["version"]})
    await call("GET", f"{m}/lease", 200)
    await call("POST", f"{m}/lease", 409, json={"ttl": 10})
    await call("POST", f"{m}/lease", 201, params={"ttl": 20}, headers=lease)
    await call("POST", f"{m}/stop", 409)
    await call("POST", f"{m}/cordon", 200, headers=lease)
    await call("POST", f"{m}/uncordon", 200, headers=lease)
    await call("POST", f"{m}/signal", 200, json={"signal": "SIGUSR2"}, headers=lease)
    await call("GET", f"{m}/events", 200, params={"limit": 5})
    await call("GET", f"{m}/metadata", 200)
    await call(
        "PATCH",
        f"{m}/metadata",
        204,
        json={"metadata": {"a": "1"}, "machine_version": machine["version"]},
        headers=lease,
    )
    await call(
        "PUT", f"{m}/metadata", 412, json={"metadata": {"a": "1"}, "machine_version": "0" * 26}, headers=lease
    )
    await call("POST", f"{m}/metadata/b", 204, json={"value": "2"}, headers=lease)
    await call("GET", f"{m}/metadata/b", 200)
    await call("DELETE", f"{m}/metadata/b", 204, headers=lease)
    await call("GET", f"{m}/metadata/b", 404)
    await call("GET", f"{m}/ps", 200)
    await call("GET", f"{m}/memory", 200)
    await call("PUT", f"{m}/memory", 200, json={"limit_mb": 128}, headers=lease)
    await call("POST", f"{m}/memory/reclaim", 200, json={"amount_mb": 10})
    await call("POST", f"{m}/exec", 400, json={"command": ["true"]})
    await call("POST", f"{m}/suspend", 200, headers=lease)
    await call("GET", f"{m}/wait", 200, params={"state": "suspended", "timeout": 20})
    await call("POST", f"{m}/start", 200, headers=lease)
    await call("GET", f"{m}/wait", 200, params=[("state", "started"), ("timeout", "20")])
    await call(
        "POST",
        f"{m}/restart",
        200,
        params={"timeout": "1s", "signal": "SIGTERM", "force_stop": "false"},
        headers=lease,
    )
    await call("GET", f"{m}/wait", 200, params={"state": "started", "timeout": 20})
    await call("DELETE", m, 412, headers=lease)
    updated = (
        await call(
            "POST",
            m,
            200,
            json={"config": {**config, "env": {"V": "2"}}, "current_version": machine["version"]},
            headers=lease,
        )
    ).json()
    await call("POST", m, 409, json={"config": config, "current_version": machine["version"]}, headers=lease)
    await call("GET", f"{m}/versions", 200)
    await call(
        "GET", f"{m}/wait", 200, params={"state": "started", "timeout": 20, "version": updated["version"]}
    )
    await call("GET", f"{m}/wait", 400, params={"state": "started", "timeout": 61})
    current = {"version": updated["version"]}
    await call("GET", f"{m}/wait", 400, params={"state": "stopped", "timeout": 1})  # no version
    await call("GET", f"{m}/wait", 408, params={"state": "stopped", "timeout": 1, **current})
    await call("POST", f"{m}/stop", 200, json={"timeout": "0s", "signal": "SIGTERM"}, headers=lease)
    await call("GET", f"{m}/wait", 200, params={"state": "stopped", "timeout": 20, **current})
    await call("POST", f"{m}/suspend", 412, headers=lease)
    await call("DELETE", f"{m}/lease", 400)
    await call("DELETE", f"{m}/lease", 200, headers=lease)
    await call("DELETE", m, 200, params={"force": "false"})
    await call("GET", f"{m}/wait", 200, params={"state": "destroyed", "timeout": 20})
    assert (await call("GET", m, 200)).json()["state"] == "destroyed"  # for a while, as on Fly
    await call("GET", f"{m}/events", 200)
    await call("POST", f"{m}/start", 404)
    await call("GET", base, 200, params={"include_deleted": "true"})
    await call("POST", base, 400, json={"config": {"env": {}}})

    operations = {op for op, _, _ in validator.seen}
    expected = {
        op["operationId"]
        for template, item in validator.spec["paths"].items()
        if template.startswith(MACHINES_PREFIX)
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert operations == expected


# --- schemathesis ---------------------------------------------------------------------------------


def _run_schemathesis(
    spec: dict[str, Any], base_url: str, examples: int, fixed: Callable[[str], dict[str, Any]]
) -> list[str]:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.result import Ok
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_dict(spec).include(path_regex=r"^/v1/apps/\{app_name\}/machines")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) >= 25
    for operation in operations:
        label = operation.label
        overrides = fixed(label)

        @given(case=operation.as_strategy(**overrides))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        def exercise(case: Any) -> None:
            response = case.call(base_url=base_url, timeout=70)
            try:
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
            except Exception as exc:  # collect every failure, report them together
                failures.append(f"{label} -> {response.status_code}: {exc}"[:800])  # noqa: B023 (runs now)

        exercise()
    return failures


@pytest.mark.timeout(120)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(spec: dict[str, Any], tmp_path: Path) -> None:
    # Generated configs may name any executable: the allowlist keeps the emulator from running them.
    with running_emulator(tmp_path, allowed_executables="[]", work_root=str(tmp_path / "work")) as server:
        # Pass 1: everything generated (unknown apps and machine ids, odd bodies).
        failures = _run_schemathesis(spec, server.base_url, 12, lambda label: {})

        # Pass 2: a real app and a fresh machine per operation, so operations get past the 404
        # and hit their logic (a generated destroy must not starve the operations after it).
        def real_machine(label: str) -> dict[str, Any]:
            body = {
                "config": {"image": "python", "init": {"exec": [sys.executable, "-c", SLEEP]}},
                "skip_launch": True,
            }
            machine = httpx.post(f"{server.base_url}/v1/apps/st/machines", json=body).json()
            overrides: dict[str, Any] = {"path_parameters": {"app_name": "st"}}
            if "{machine_id}" in label:
                overrides["path_parameters"]["machine_id"] = machine["id"]
            if label.endswith("/wait"):
                overrides["query"] = {"timeout": 1}
            return overrides

        failures += _run_schemathesis(spec, server.base_url, 12, real_machine)
        stats = httpx.get(f"{server.base_url}/_admin/stats").json()
    assert not failures, "\n".join(failures[:20])
    assert stats["server_errors"] == 0
    assert stats["total"] >= 300


async def test_apps_and_org_endpoints_answer_per_the_spec(
    validated_client: tuple[httpx.AsyncClient, SpecValidator],
) -> None:
    client, validator = validated_client

    async def call(method: str, url: str, expected: int, **kwargs: Any) -> httpx.Response:
        r = await client.request(method, url, **kwargs)
        assert r.status_code == expected, f"{method} {url}: {r.status_code} {r.text}"
        return r

    created = (await call("POST", "/v1/apps", 201, json={"name": "alpha", "org_slug": "acme"})).json()
    again = {"name": "beta", "org_slug": "acme", "idempotency_key": "k1"}
    first = (await call("POST", "/v1/apps", 201, json=again)).json()
    assert (await call("POST", "/v1/apps", 201, json=again)).json() == first  # a safe retry
    taken = (await call("POST", "/v1/apps", 422, json={"name": "alpha", "org_slug": "acme"})).json()
    assert taken["status"] == "name_taken"
    await call("POST", "/v1/apps", 400, json={"name": "gamma", "idempotency_key": "k1"})
    await call("POST", "/v1/apps", 400, json={"name": "Not Valid"})
    await call("POST", "/v1/apps", 400, json={"org_slug": "acme"})
    app = (await call("GET", "/v1/apps/alpha", 200)).json()
    assert (app["id"], app["name"], app["organization"]["slug"]) == (created["id"], "alpha", "acme")
    assert app["machine_count"] == 0
    await call("GET", "/v1/apps/nope", 404)

    config = {"image": "python", "init": {"exec": [sys.executable, "-c", SLEEP]}, "metadata": {"k": "v"}}
    ids = []
    for _ in range(3):
        r = await call("POST", "/v1/apps/alpha/machines", 200, json={"config": config, "skip_launch": True})
        ids.append(r.json()["id"])
    await call("POST", "/v1/apps/implicit/machines", 200, json={"config": config, "skip_launch": True})
    assert (await call("GET", "/v1/apps/alpha", 200)).json()["machine_count"] == 3
    implicit = (await call("GET", "/v1/apps/implicit", 200)).json()
    assert implicit["organization"]["slug"] == "personal"

    listed = (await call("GET", "/v1/apps", 200, params={"org_slug": "acme"})).json()
    assert [a["name"] for a in listed["apps"]] == ["alpha", "beta"] and listed["total_apps"] == 2
    page = (await call("GET", "/v1/apps", 200, params={"org_slug": "acme", "limit": 1})).json()
    assert [a["name"] for a in page["apps"]] == ["alpha"]
    rest = await call(
        "GET", "/v1/apps", 200, params={"org_slug": "acme", "limit": 1, "cursor": page["next_cursor"]}
    )
    assert [a["name"] for a in rest.json()["apps"]] == ["beta"] and "next_cursor" not in rest.json()
    await call("GET", "/v1/apps", 400)

    await call("DELETE", f"/v1/apps/alpha/machines/{ids[0]}", 200)
    await call("GET", f"/v1/apps/alpha/machines/{ids[0]}/wait", 200, params={"state": "destroyed"})
    org = (await call("GET", "/v1/orgs/acme/machines", 200)).json()
    assert sorted(m["id"] for m in org["machines"]) == sorted(ids[1:])
    assert all(m["app_name"] == "alpha" and m["config"]["metadata"] == {"k": "v"} for m in org["machines"])
    assert org["last_machine_id"] == org["machines"][-1]["id"]
    deleted = (await call("GET", "/v1/orgs/acme/machines", 200, params={"include_deleted": "true"})).json()
    assert len(deleted["machines"]) == 3
    summary = (
        await call("GET", "/v1/orgs/acme/machines", 200, params={"summary": "true", "limit": 1})
    ).json()
    assert "config" not in summary["machines"][0] and summary["next_cursor"]
    later = await call("GET", "/v1/orgs/acme/machines", 200, params={"updated_after": "2999-01-01T00:00:00Z"})
    assert later.json()["machines"] == []
    await call("GET", "/v1/orgs/acme/machines", 400, params={"updated_after": "yesterday"})
    await call("GET", "/v1/orgs/nobody/machines", 404)
    personal = (await call("GET", "/v1/orgs/personal/machines", 200)).json()
    assert [m["app_name"] for m in personal["machines"]] == ["implicit"]

    operations = {op for op, _, _ in validator.seen}
    assert {"Apps_create", "Apps_show", "Apps_list", "Machines_org_list"} <= operations


async def test_a_wrong_method_answers_405_with_allow(
    validated_client: tuple[httpx.AsyncClient, SpecValidator],
) -> None:
    client, _ = validated_client
    r = await client.request("PATCH", "/v1/apps/demo/machines")
    assert r.status_code == 405
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}
    r = await client.request("PUT", "/v1/apps/demo/machines/0123456789abcd/lease")
    assert r.status_code == 405
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST", "DELETE"}
    assert r.json() == {"error": "method not allowed"}
