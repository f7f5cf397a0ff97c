"""Typed shapes of the Fly Machines API (pydantic v2), as shared/fly/openapi.json defines them.

These are edge models: they parse what Fly (or the emulator) answers and build what we send.

- Unknown fields are kept (``extra="allow"``): Fly adds fields often, and a config read from a
  machine must survive a round trip through ``update`` without losing what we did not model.
- Every field is optional, as in the spec; ``None`` means "absent". :meth:`FlyModel.to_api`
  drops ``None`` everywhere, because the real API rejects or misreads explicit nulls in places.
- Names are Fly's own snake_case, so no aliases are needed; ``populate_by_name`` is on anyway.

The state sets at the bottom classify Fly's machine states (shared/reference/fly-machines-api.md §4),
so the controller can tell "resting", "in flight" and "gone" apart without string lists of its own.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, field_serializer


class FlyModel(BaseModel):
    """Base for every Fly shape: tolerant when parsing, no nulls when serializing."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_api(self) -> dict[str, Any]:
        """The JSON body Fly expects: ``None`` fields omitted (also inside nested models)."""
        body: dict[str, Any] = _drop_none(self.model_dump(mode="json", exclude_none=True, by_alias=True))
        return body


def _drop_none(value: Any) -> Any:
    # exclude_none does not reach into plain dicts (e.g. extra fields holding dicts); do it here.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def go_duration(seconds: float) -> str:
    """A Go duration string as Fly expects (``10s``, ``500ms``, ``0s``)."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number of seconds >= 0")
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


# --- machine config -------------------------------------------------------------------------


class MachineGuest(FlyModel):
    cpu_kind: str | None = None  # "shared" | "performance"
    cpus: int | None = None
    memory_mb: int | None = None
    gpu_kind: str | None = None
    gpus: int | None = None
    kernel_args: list[str] | None = None
    max_memory_mb: int | None = None
    host_dedication_id: str | None = None


class MachineRestart(FlyModel):
    policy: str | None = None  # "no" | "always" | "on-failure"
    max_retries: int | None = None


class StopConfig(FlyModel):
    signal: str | None = None  # SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGUSR1, SIGUSR2, SIGTERM
    timeout: str | None = None  # Go duration, e.g. "10s"


class MachineInit(FlyModel):
    exec: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    tty: bool | None = None
    swap_size_mb: int | None = None
    kernel_args: list[str] | None = None


class MachinePort(FlyModel):
    port: int | None = None
    start_port: int | None = None
    end_port: int | None = None
    handlers: list[str] | None = None
    force_https: bool | None = None


class MachineService(FlyModel):
    protocol: str | None = None
    internal_port: int | None = None
    ports: list[MachinePort] | None = None
    autostart: bool | None = None
    # Responses may carry the old boolean form; we always send the string form the spec declares.
    autostop: str | bool | None = None
    min_machines_running: int | None = None
    concurrency: dict[str, Any] | None = None
    checks: list[dict[str, Any]] | None = None

    @field_serializer("autostop")
    def _autostop_as_string(self, value: str | bool | None) -> str | None:
        if isinstance(value, bool):
            return "stop" if value else "off"
        return value


class MachineCheck(FlyModel):
    type: str | None = None  # "tcp" | "http"
    port: int | None = None
    interval: str | None = None
    timeout: str | None = None
    grace_period: str | None = None
    method: str | None = None
    path: str | None = None
    protocol: str | None = None
    kind: str | None = None  # "informational" | "readiness"
    headers: list[dict[str, Any]] | None = None


class MachineConfig(FlyModel):
    """``fly.MachineConfig``: the fields we use are typed; any other field is kept as is."""

    image: str | None = None
    env: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    guest: MachineGuest | None = None
    auto_destroy: bool | None = None
    restart: MachineRestart | None = None
    stop_config: StopConfig | None = None
    init: MachineInit | None = None
    services: list[MachineService] | None = None
    checks: dict[str, MachineCheck] | None = None
    schedule: str | None = None


# --- machine ------------------------------------------------------------------------------


class ExitEvent(FlyModel):
    """``request.exit_event`` of an exit event: how the main process ended."""

    exit_code: int | None = None
    guest_exit_code: int | None = None
    guest_signal: int | None = None
    oom_killed: bool | None = None
    requested_stop: bool | None = None
    restarting: bool | None = None
    signal: int | None = None
    exited_at: str | None = None


class MachineEvent(FlyModel):
    id: str | None = None
    type: str | None = None  # launch, start, stop, exit, update, restart, destroy, ...
    status: str | None = None
    source: str | None = None  # user | flyd
    timestamp: int | None = None  # unix milliseconds
    request: dict[str, Any] | None = None

    @property
    def exit_event(self) -> ExitEvent | None:
        """The exit details when this is an exit event that carries them."""
        raw = (self.request or {}).get("exit_event")
        return ExitEvent.model_validate(raw) if isinstance(raw, dict) else None

    @property
    def restart_count(self) -> int | None:
        value = (self.request or {}).get("restart_count")
        return value if isinstance(value, int) else None


class CheckStatus(FlyModel):
    name: str | None = None
    status: str | None = None
    output: str | None = None
    updated_at: str | None = None


class StrippedLease(FlyModel):
    owner: str | None = None
    description: str | None = None
    expires_at: int | None = None


class Machine(FlyModel):
    id: str
    name: str | None = None
    state: str | None = None
    region: str | None = None
    instance_id: str | None = None  # deprecated alias of version
    version: str | None = None
    private_ip: str | None = None
    config: MachineConfig | None = None
    incomplete_config: MachineConfig | None = None
    image_ref: dict[str, Any] | None = None
    created_at: str | None = None
    updated_at: str | None = None
    events: list[MachineEvent] | None = None
    checks: list[CheckStatus] | None = None
    host_status: str | None = None  # ok | unknown | unreachable
    host_features: list[str] | None = None
    cordoned: bool | None = None
    lease: StrippedLease | None = None
    nonce: str | None = None  # only on create with lease_ttl

    @property
    def metadata(self) -> dict[str, str]:
        """``config.metadata`` (empty when absent, e.g. in summary listings without config)."""
        config = self.config or self.incomplete_config
        return dict(config.metadata or {}) if config else {}

    @property
    def current_version(self) -> str | None:
        return self.version or self.instance_id

    @property
    def last_exit(self) -> ExitEvent | None:
        """The newest exit event's details, from the events embedded in the machine."""
        exits = [e for e in self.events or [] if e.exit_event is not None]
        if not exits:
            return None
        newest = max(exits, key=lambda e: e.timestamp or 0)
        return newest.exit_event


# --- requests and small responses -----------------------------------------------------------


class CreateMachineRequest(FlyModel):
    config: MachineConfig
    name: str | None = None
    region: str | None = None
    skip_launch: bool | None = None
    skip_service_registration: bool | None = None
    skip_secrets: bool | None = None
    min_secrets_version: int | None = None
    lease_ttl: int | None = None


class UpdateMachineRequest(CreateMachineRequest):
    current_version: str | None = None


class StopRequest(FlyModel):
    signal: str | None = None
    timeout: str | None = None


class CreateLeaseRequest(FlyModel):
    ttl: int | None = None
    description: str | None = None


class Lease(FlyModel):
    nonce: str | None = None
    expires_at: int | None = None  # unix seconds
    owner: str | None = None
    description: str | None = None
    version: str | None = None

    @classmethod
    def from_response(cls, body: Any) -> Lease:
        """Fly wraps lease answers as ``{"status": "success", "data": {...}}``; the spec says bare."""
        if isinstance(body, dict) and isinstance(body.get("data"), dict):
            return cls.model_validate(body["data"])
        return cls.model_validate(body if isinstance(body, dict) else {})


class WaitResult(FlyModel):
    ok: bool | None = None
    state: str | None = None
    version: str | None = None
    event_id: str | None = None


class UpdateMetadataRequest(FlyModel):
    metadata: dict[str, str]
    machine_version: str | None = None
    updated_at: str | None = None


class UpsertMetadataKeyRequest(FlyModel):
    value: str
    updated_at: str | None = None


# --- states ---------------------------------------------------------------------------------
# One definition of every machine state and its classification: controller/machine_state.py.
