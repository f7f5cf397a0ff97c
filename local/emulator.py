"""The Fly Machines emulator: our ``kind`` for Fly. An ASGI app that serves ``/v1/apps/{app}/machines``.

Also the Apps API (``/v1/apps``, local/emulator_apps.py) and ``/v1/orgs/{org}/machines``.

Machines are real local subprocesses (local/emulator_process.py) driven through Fly's states,
events, leases, waits and restart policies (local/emulator_state.py), behind the same HTTP surface
as ``https://api.machines.dev`` (shared/fly/openapi.json), including the forms real clients send
that the spec omits: ``kill`` as well as ``force`` on destroy, lease ``ttl`` in the query or the
body, a stop body with ``"timeout": "0s"``, and the lease envelope ``{"status": "success", ...}``.

Every ``/v1`` request goes through the same gate, in Fly's order: authentication (401 when an API
token is configured), injected latency, the rate limiter (429, token buckets per
(operation, machine-or-app)), injected 5xx, then the operation. Admin endpoints live outside
``/v1`` (``/_admin/...``) so tests can flip fault knobs, crash or hang machines, set app secrets
and read request stats mid-run; see local/EMULATOR.md.

Run it with ``flyswarm emulator --port 4280`` or ``python -m local.emulator --port 4280``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import hashlib
import hmac
import json
import os
import secrets as secrets_mod
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from api.logs import configure_logging, get_logger
from local.emulator_errors import FlyError, invalid
from local.emulator_faults import FaultSettings
from local.emulator_settings import EmulatorSettings
from local.emulator_state import WAITABLE_STATES, EmulatorState, ListQuery, parse_duration

__all__ = [
    "EmulatorSettings",
    "EmulatorState",
    "FaultSettings",
    "create_app",
    "emulator_state",
    "main",
    "serve",
]

log = get_logger("flyswarm.emulator")

NONCE_HEADER = "fly-machine-lease-nonce"
MACHINES = "/v1/apps/{app_name}/machines"
MACHINE = MACHINES + "/{machine_id}"
DEFAULT_LEASE_TTL = 30

Handler = Callable[[Request, EmulatorState], Awaitable[Response]]


# --- request helpers -------------------------------------------------------------------------


def _ok(body: Any = None, status: int = 200) -> JSONResponse:
    return JSONResponse({"ok": True} if body is None else body, status_code=status)


async def _json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("request body is not valid JSON") from None


def _bool(request: Request, *names: str) -> bool:
    """Go's strconv.ParseBool over the first of ``names`` present in the query."""
    for name in names:
        value = request.query_params.get(name)
        if value is None:
            continue
        if value in ("1", "t", "T", "true", "TRUE", "True"):
            return True
        if value in ("0", "f", "F", "false", "FALSE", "False", ""):
            return False
        raise invalid(f"{name}: invalid boolean {value!r}")
    return False


def _int(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise invalid(f"{name}: invalid integer {value!r}") from None


def _nonce(request: Request) -> str | None:
    return request.headers.get(NONCE_HEADER) or None


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    for scheme in ("Bearer ", "FlyV1 "):
        if header.startswith(scheme):
            return header[len(scheme) :].strip()
    return None


def _owner(request: Request) -> str:
    """Lease owner: who holds the token (a hash of it; the token itself never leaves)."""
    token = _token(request)
    if not token:
        return "anonymous@tokens.fly.io"
    return hashlib.sha256(token.encode()).hexdigest()[:12] + "@tokens.fly.io"


def _authorize(request: Request, state: EmulatorState) -> None:
    expected = state.settings.api_token
    if expected is None:
        return
    token = _token(request) or ""
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise FlyError(401, "unauthorized: missing or invalid API token")


def emulator_state(app: Starlette) -> EmulatorState:
    """The state behind an app made by :func:`create_app` (tests close it with ``await ...aclose()``)."""
    state = app.state.emulator
    assert isinstance(state, EmulatorState)
    return state


def _state(request: Request) -> EmulatorState:
    state = request.app.state.emulator
    assert isinstance(state, EmulatorState)
    return state


# --- the /v1 gate ----------------------------------------------------------------------------


def _v1(operation: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        started = time.time()
        state = _state(request)
        app_name = request.path_params.get("app_name", "")
        machine_id = request.path_params.get("machine_id") or request.path_params.get("volume_id")
        # Fly scopes creates (and lists) per app, every other action per machine.
        scope = (
            f"{app_name}/{machine_id}" if machine_id else app_name or request.path_params.get("org_slug", "")
        )
        try:
            _authorize(request, state)
            # The request has fully arrived before any injected latency: a client that gives up
            # during the delay leaves an ambiguous outcome (the work still happens), as on Fly.
            await request.body()
            faults = state.faults
            if faults.settings.latency_ms > 0:
                await asyncio.sleep(faults.settings.latency_ms / 1000)
            if not faults.allow(operation, scope):
                raise FlyError(429, "resource_exhausted: rate limit exceeded")
            injected = faults.server_error()
            if injected is not None:
                raise FlyError(injected, "unavailable: injected server error (emulator fault)")
            response = await handler(request, state)
        except FlyError as exc:
            response = JSONResponse(exc.body(), status_code=exc.http_status)
        except ClientDisconnect:
            # Nobody is listening any more; nginx's 499 keeps it apart in the stats.
            response = JSONResponse({"error": "client closed request"}, status_code=499)
        except Exception as exc:  # an emulator bug must still answer like a server, and be loud in logs
            log.exception("emulator_request_failed", operation=operation, error=repr(exc))
            response = JSONResponse({"error": f"internal: {type(exc).__name__}"}, status_code=500)
        state.stats.record(
            request.method,
            operation,
            scope,
            response.status_code,
            started=started,
            caller=request.headers.get("user-agent", ""),
        )
        response.headers["fly-request-id"] = secrets_mod.token_hex(10)
        return response

    endpoint.__name__ = operation
    return endpoint


# --- machines handlers -----------------------------------------------------------------------


async def list_machines(request: Request, state: EmulatorState) -> Response:
    states_param = request.query_params.get("state")
    states = frozenset(s.strip() for s in states_param.split(",") if s.strip()) if states_param else None
    metadata = {
        k[len("metadata.") :]: v for k, v in request.query_params.multi_items() if k.startswith("metadata.")
    }
    query = ListQuery(
        include_deleted=_bool(request, "include_deleted"),
        include_leases=_bool(request, "include_leases"),
        summary=_bool(request, "summary"),
        region=request.query_params.get("region") or None,
        states=states,
        metadata=metadata,
        limit=_int(request, "limit"),
        cursor=request.query_params.get("cursor") or None,
    )
    machines, next_cursor = state.list_machines(request.path_params["app_name"], query)
    response = JSONResponse(machines)
    if next_cursor is not None:
        response.headers["fly-next-cursor"] = next_cursor
    return response


async def create_machine(request: Request, state: EmulatorState) -> Response:
    app_name = request.path_params["app_name"]
    machine, nonce = state.create(app_name, await _json(request), _owner(request))
    return JSONResponse(state.view(machine, nonce=nonce))


async def show_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    version = request.query_params.get("version") or None
    return JSONResponse(state.get(p["app_name"], p["machine_id"], version, _bool(request, "include_leases")))


async def update_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    body = await _json(request)
    return JSONResponse(state.update(p["app_name"], p["machine_id"], body, _nonce(request)))


async def destroy_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    # fly-go sends ?kill=true, the spec documents ?force=true: either forces.
    force = _bool(request, "force") or _bool(request, "kill")
    state.destroy(p["app_name"], p["machine_id"], _nonce(request), force)
    return _ok()


async def start_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.start(p["app_name"], p["machine_id"], _nonce(request)))


async def stop_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.stop(p["app_name"], p["machine_id"], await _json(request), _nonce(request))
    return _ok()


async def suspend_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.suspend(p["app_name"], p["machine_id"], _nonce(request))
    return _ok()


async def restart_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    q = request.query_params
    state.restart(
        p["app_name"],
        p["machine_id"],
        _nonce(request),
        q.get("timeout"),
        q.get("signal"),
        _bool(request, "force_stop"),
    )
    return _ok()


async def signal_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.signal(p["app_name"], p["machine_id"], await _json(request), _nonce(request))
    return _ok()


async def cordon_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.cordon(p["app_name"], p["machine_id"], _nonce(request), True)
    return _ok()


async def uncordon_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.cordon(p["app_name"], p["machine_id"], _nonce(request), False)
    return _ok()


async def wait_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    states: list[str] = []
    for value in request.query_params.getlist("state"):
        states.extend(s.strip() for s in value.split(",") if s.strip())
    states = states or ["started"]
    unknown = [s for s in states if s not in WAITABLE_STATES]
    if unknown:
        raise invalid(f"state: unsupported state {unknown[0]!r}")
    raw_timeout = request.query_params.get("timeout")
    timeout = 60.0
    if raw_timeout not in (None, ""):
        parsed = parse_duration(raw_timeout, "timeout")
        assert parsed is not None
        timeout = parsed
    if not 1 <= timeout <= 60:
        raise invalid("timeout must be between 1 and 60 seconds")
    version = request.query_params.get("version") or request.query_params.get("instance_id") or None
    if "stopped" in states and version is None:
        # Fly only knows which stop you mean for a given version: without one it refuses.
        raise invalid("version (or instance_id) is required when waiting for state stopped")
    return JSONResponse(await state.wait(p["app_name"], p["machine_id"], states, timeout, version))


async def show_lease(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.show_lease(p["app_name"], p["machine_id"]))


async def acquire_lease(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    body = await _json(request)
    if body is not None and not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    body = body or {}
    ttl: Any = request.query_params.get("ttl") or body.get("ttl") or DEFAULT_LEASE_TTL
    if isinstance(ttl, bool) or not isinstance(ttl, int | str):
        raise invalid("ttl must be an integer number of seconds")
    try:
        ttl_seconds = int(ttl)
    except ValueError:
        raise invalid(f"ttl: invalid integer {ttl!r}") from None
    description = body.get("description") or ""
    if not isinstance(description, str):
        raise invalid("description must be a string")
    data = state.acquire_lease(
        p["app_name"], p["machine_id"], _nonce(request), ttl_seconds, description, _owner(request)
    )
    return JSONResponse(data, status_code=201)


async def release_lease(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.release_lease(p["app_name"], p["machine_id"], _nonce(request)))


async def list_events(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.events(p["app_name"], p["machine_id"], _int(request, "limit")))


async def list_versions(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.versions(p["app_name"], p["machine_id"]))


async def show_metadata(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.metadata(p["app_name"], p["machine_id"]))


async def update_metadata(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.update_metadata(p["app_name"], p["machine_id"], await _json(request), _nonce(request))
    return Response(status_code=204)


async def show_metadata_key(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.metadata_key(p["app_name"], p["machine_id"], p["key"]))


async def upsert_metadata_key(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.upsert_metadata(p["app_name"], p["machine_id"], p["key"], await _json(request), _nonce(request))
    return Response(status_code=204)


async def delete_metadata_key(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.delete_metadata(p["app_name"], p["machine_id"], p["key"], _nonce(request))
    return Response(status_code=204)


async def list_processes(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.processes(p["app_name"], p["machine_id"]))


async def exec_machine(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.machine(p["app_name"], p["machine_id"])
    raise invalid("exec is not supported by the emulator")


async def show_memory(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.memory(p["app_name"], p["machine_id"]))


async def set_memory(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    body = await _json(request)
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    return JSONResponse(
        state.set_memory(p["app_name"], p["machine_id"], body.get("limit_mb"), _nonce(request))
    )


async def reclaim_memory(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    state.machine(p["app_name"], p["machine_id"])
    return JSONResponse({"actual_mb": 0})


# --- apps and the org-wide machine list (local/emulator_apps.py) -------------------------------


async def list_apps(request: Request, state: EmulatorState) -> Response:
    q = request.query_params
    machines = list(state.machines.values())
    return JSONResponse(
        state.apps.list(q.get("org_slug"), _int(request, "limit"), q.get("cursor") or None, machines)
    )


async def create_app_(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.apps.create(await _json(request)), status_code=201)


async def show_app(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.apps.show(request.path_params["app_name"], state.machines.values()))


async def list_org_machines(request: Request, state: EmulatorState) -> Response:
    q = request.query_params
    states_param = q.get("state")
    return JSONResponse(
        state.apps.org_machines(
            request.path_params["org_slug"],
            state.machines.values(),
            include_deleted=_bool(request, "include_deleted"),
            summary=_bool(request, "summary"),
            region=q.get("region") or None,
            states=frozenset(s.strip() for s in states_param.split(",") if s.strip())
            if states_param
            else None,
            updated_after=q.get("updated_after") or None,
            limit=_int(request, "limit"),
            cursor=q.get("cursor") or None,
        )
    )


def _apps_routes() -> list[Route]:
    table: Sequence[tuple[str, str, str, Handler]] = (
        ("GET", "/v1/apps", "Apps_list", list_apps),
        ("POST", "/v1/apps", "Apps_create", create_app_),
        ("GET", "/v1/apps/{app_name}", "Apps_show", show_app),
        ("GET", "/v1/orgs/{org_slug}/machines", "Machines_org_list", list_org_machines),
    )
    return _routes(table)


def _routes(table: Sequence[tuple[str, str, str, Handler]]) -> list[Route]:
    """One route per path serving all its methods, so a wrong method's 405 lists them in ``Allow``."""
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for method, path, op, handler in table:
        by_path.setdefault(path, {})[method] = _v1(op, handler)
    routes = []
    for path, endpoints in by_path.items():

        async def dispatch(
            request: Request, endpoints: dict[str, Callable[[Request], Awaitable[Response]]] = endpoints
        ) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            return await endpoints[method](request)

        routes.append(Route(path, dispatch, methods=list(endpoints)))
    return routes


# --- volumes (local/emulator_volumes.py) ---------------------------------------------------------

VOLUMES = "/v1/apps/{app_name}/volumes"
VOLUME = VOLUMES + "/{volume_id}"


async def list_volumes(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.volumes.list_volumes(request.path_params["app_name"]))


async def create_volume(request: Request, state: EmulatorState) -> Response:
    app_name = request.path_params["app_name"]
    volume = state.volumes.create(app_name, await _json(request), region_full=state.faults.region_full)
    state.apps.ensure(app_name)
    return JSONResponse(volume)


async def show_volume(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.volumes.view(state.volumes.get(p["app_name"], p["volume_id"])))


async def update_volume(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.volumes.update(p["app_name"], p["volume_id"], await _json(request)))


async def extend_volume(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.volumes.extend(p["app_name"], p["volume_id"], await _json(request)))


async def delete_volume(request: Request, state: EmulatorState) -> Response:
    p = request.path_params
    return JSONResponse(state.volumes.delete(p["app_name"], p["volume_id"]))


def _volumes_routes() -> list[Route]:
    table: Sequence[tuple[str, str, str, Handler]] = (
        ("GET", VOLUMES, "Volumes_list", list_volumes),
        ("POST", VOLUMES, "Volumes_create", create_volume),
        ("GET", VOLUME, "Volumes_get_by_id", show_volume),
        ("PUT", VOLUME, "Volumes_update", update_volume),
        ("DELETE", VOLUME, "Volume_delete", delete_volume),
        ("PUT", VOLUME + "/extend", "Volumes_extend", extend_volume),
    )
    return _routes(table)


def _machines_routes() -> list[Route]:
    table: Sequence[tuple[str, str, str, Handler]] = (
        ("GET", MACHINES, "Machines_list", list_machines),
        ("POST", MACHINES, "Machines_create", create_machine),
        ("GET", MACHINE, "Machines_show", show_machine),
        ("POST", MACHINE, "Machines_update", update_machine),
        ("DELETE", MACHINE, "Machines_delete", destroy_machine),
        ("POST", MACHINE + "/start", "Machines_start", start_machine),
        ("POST", MACHINE + "/stop", "Machines_stop", stop_machine),
        ("POST", MACHINE + "/suspend", "Machines_suspend", suspend_machine),
        ("POST", MACHINE + "/restart", "Machines_restart", restart_machine),
        ("POST", MACHINE + "/signal", "Machines_signal", signal_machine),
        ("POST", MACHINE + "/cordon", "Machines_cordon", cordon_machine),
        ("POST", MACHINE + "/uncordon", "Machines_uncordon", uncordon_machine),
        ("GET", MACHINE + "/wait", "Machines_wait", wait_machine),
        ("GET", MACHINE + "/lease", "Machines_show_lease", show_lease),
        ("POST", MACHINE + "/lease", "Machines_create_lease", acquire_lease),
        ("DELETE", MACHINE + "/lease", "Machines_release_lease", release_lease),
        ("GET", MACHINE + "/events", "Machines_list_events", list_events),
        ("GET", MACHINE + "/versions", "Machines_list_versions", list_versions),
        ("GET", MACHINE + "/metadata", "Machines_show_metadata", show_metadata),
        ("PATCH", MACHINE + "/metadata", "Machines_update_metadata", update_metadata),
        ("PUT", MACHINE + "/metadata", "Machines_update_metadata_deprecated", update_metadata),
        ("GET", MACHINE + "/metadata/{key}", "Machines_get_metadata_key", show_metadata_key),
        ("POST", MACHINE + "/metadata/{key}", "Machines_upsert_metadata", upsert_metadata_key),
        ("DELETE", MACHINE + "/metadata/{key}", "Machines_delete_metadata", delete_metadata_key),
        ("GET", MACHINE + "/ps", "Machines_list_processes", list_processes),
        ("POST", MACHINE + "/exec", "Machines_exec", exec_machine),
        ("GET", MACHINE + "/memory", "Machines_get_memory", show_memory),
        ("PUT", MACHINE + "/memory", "Machines_set_memory_limit", set_memory),
        ("POST", MACHINE + "/memory/reclaim", "Machines_reclaim_memory", reclaim_memory),
    )
    return _routes(table)


# --- admin (outside /v1: no rate limits, no injected faults) ----------------------------------


def _admin(handler: Handler, *, public: bool = False) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        state = _state(request)
        try:
            if not public:
                _authorize(request, state)
            return await handler(request, state)
        except FlyError as exc:
            return JSONResponse(exc.body(), status_code=exc.http_status)

    endpoint.__name__ = handler.__name__
    return endpoint


async def admin_health(request: Request, state: EmulatorState) -> Response:
    return _ok(
        {
            "ok": True,
            "machines": len(state.machines),
            "processes": len(state.pids),
            "task_failures": state.task_failures,
        }
    )


async def admin_get_faults(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.faults.settings.model_dump(mode="json"))


async def admin_put_faults(request: Request, state: EmulatorState) -> Response:
    """PUT replaces every knob (absent ones reset to defaults); PATCH changes only those given."""
    body = await _json(request)
    if not isinstance(body, dict):
        raise invalid("faults must be a JSON object")
    if request.method == "PATCH":
        body = {**state.faults.settings.model_dump(), **body}
    try:
        faults = FaultSettings.model_validate(body)
    except ValidationError as exc:
        raise invalid(str(exc.errors()[0]["msg"])) from None
    state.set_faults(faults)
    log.info("emulator_faults_set", **faults.model_dump(mode="json"))
    return JSONResponse(faults.model_dump(mode="json"))


async def admin_stats(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.stats.snapshot())


async def admin_reset_stats(request: Request, state: EmulatorState) -> Response:
    state.stats.reset()
    return _ok()


async def admin_secrets(request: Request, state: EmulatorState) -> Response:
    """Names only: secret values never leave the emulator, as on Fly."""
    return JSONResponse(
        {
            "app": request.path_params["app"],
            "names": sorted(state.secrets.get(request.path_params["app"], {})),
        }
    )


async def admin_set_secrets(request: Request, state: EmulatorState) -> Response:
    body = await _json(request)
    if not isinstance(body, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in body.items()
    ):
        raise invalid("secrets must be a JSON object of strings")
    app = request.path_params["app"]
    state.secrets.setdefault(app, {}).update(body)
    log.info("emulator_secrets_set", app=app, names=sorted(body))
    return JSONResponse({"app": app, "names": sorted(state.secrets[app])})


async def admin_delete_secret(request: Request, state: EmulatorState) -> Response:
    state.secrets.get(request.path_params["app"], {}).pop(request.path_params["name"], None)
    return _ok()


async def admin_machines(request: Request, state: EmulatorState) -> Response:
    return JSONResponse([state.admin_view(m) for m in state.machines.values()])


async def admin_machine(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.admin_view(state.admin_machine(request.path_params["machine_id"])))


async def admin_logs(request: Request, state: EmulatorState) -> Response:
    tail = _int(request, "tail") or 65536
    data = state.read_log(request.path_params["machine_id"], max(1, tail))
    return PlainTextResponse(data.decode("utf-8", errors="replace"))


async def admin_crash(request: Request, state: EmulatorState) -> Response:
    state.crash(request.path_params["machine_id"])
    return _ok()


async def admin_hang(request: Request, state: EmulatorState) -> Response:
    await state.hang(request.path_params["machine_id"], True)
    return _ok()


async def admin_unhang(request: Request, state: EmulatorState) -> Response:
    await state.hang(request.path_params["machine_id"], False)
    return _ok()


async def admin_reset(request: Request, state: EmulatorState) -> Response:
    await state.reset()
    return _ok()


def _admin_routes() -> list[Route]:
    table: Sequence[tuple[str, str, Handler]] = (
        ("GET", "/_admin/health", admin_health),
        ("GET", "/_admin/faults", admin_get_faults),
        ("PUT", "/_admin/faults", admin_put_faults),
        ("PATCH", "/_admin/faults", admin_put_faults),
        ("GET", "/_admin/stats", admin_stats),
        ("DELETE", "/_admin/stats", admin_reset_stats),
        ("GET", "/_admin/secrets/{app}", admin_secrets),
        ("PUT", "/_admin/secrets/{app}", admin_set_secrets),
        ("POST", "/_admin/secrets/{app}", admin_set_secrets),
        ("DELETE", "/_admin/secrets/{app}/{name}", admin_delete_secret),
        ("GET", "/_admin/machines", admin_machines),
        ("GET", "/_admin/machines/{machine_id}", admin_machine),
        ("GET", "/_admin/machines/{machine_id}/logs", admin_logs),
        ("POST", "/_admin/machines/{machine_id}/crash", admin_crash),
        ("POST", "/_admin/machines/{machine_id}/hang", admin_hang),
        ("POST", "/_admin/machines/{machine_id}/unhang", admin_unhang),
        ("POST", "/_admin/reset", admin_reset),
    )
    # Health stays open so supervisors can probe readiness without the token.
    return [
        Route(path, _admin(handler, public=handler is admin_health), methods=[method])
        for method, path, handler in table
    ]


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "not found"}, status_code=404)


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    # Starlette's exception carries the route's methods in ``Allow``, which RFC 9110 requires.
    headers = getattr(exc, "headers", None) or {}
    return JSONResponse({"error": "method not allowed"}, status_code=405, headers=dict(headers))


# --- app, server, CLI ------------------------------------------------------------------------


def create_app(settings: EmulatorSettings | None = None) -> Starlette:
    """The emulator as an ASGI app; its state is ``emulator_state(app)``.

    The state needs no lifespan to work (httpx's ASGITransport sends none); with a lifespan
    (uvicorn), shutdown kills every machine process.
    """
    state = EmulatorState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await state.aclose()

    app = Starlette(
        routes=[*_apps_routes(), *_machines_routes(), *_volumes_routes(), *_admin_routes()],
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _method_not_allowed},
    )
    app.state.emulator = state
    return app


def serve(host: str = "127.0.0.1", port: int = 4280, settings: EmulatorSettings | None = None) -> None:
    """Run the emulator until SIGINT/SIGTERM; every machine process dies with it."""
    app = create_app(settings)
    state = emulator_state(app)
    # Belt and braces: the lifespan shutdown kills everything; atexit covers odd exits.
    atexit.register(state.close)
    log.info("emulator_starting", host=host, port=port, work_root=str(state.work_root))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        # Long-polling waits would otherwise hold shutdown for up to 60 s.
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local.emulator", description="Fly Machines emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4280)
    parser.add_argument(
        "--work-root", type=Path, default=None, help="per-machine work dirs (default: a temp dir)"
    )
    parser.add_argument("--transition-delay", type=float, default=None, help="seconds transient states last")
    parser.add_argument("--rate-limits", action="store_true", default=None, help="enforce Fly's rate limits")
    parser.add_argument("--log-level", default=os.environ.get("FLYSWARM_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    settings = EmulatorSettings()
    if args.work_root is not None:
        settings.work_root = args.work_root
    if args.transition_delay is not None:
        settings.transition_delay = args.transition_delay
    if args.rate_limits:
        settings.faults = settings.faults.model_copy(update={"rate_limits": True})
    serve(args.host, args.port, settings)


if __name__ == "__main__":
    main()
