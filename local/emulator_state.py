"""The emulated Fly world: machines, their lifecycle, leases, events and waits.

This module is the emulator minus HTTP. ``EmulatorState`` holds every machine of every app (apps
are local/emulator_apps.py's) and implements each Machines API operation as a method that either answers at
once or raises :class:`FlyError` with Fly's status and text. Handlers validate and change state
synchronously (nothing else runs in between on the event loop), then hand the slow part of a
transition (signals, timeouts, transient states that stay visible for ``transition_delay``) to
one background task per machine, exactly like flyd answers a request and finishes the work later.

States follow Fly's diagram (shared/reference/fly-machines-api.md §4):

    create ─► created ─► starting ─► started ─► stopping ─► stopped
                                       │  └─► suspending ─► suspended ─► starting (SIGCONT)
                                       ├─► restarting ─► starting
                                       └─► replacing (update) ─► starting
    any resting state ─► destroying ─► destroyed          starting ─► failed (cannot launch)

A resting state accepts the actions the diagram allows; a transient state refuses every action
with 412 ``unable to <action> machine from current state``, except a forced destroy, which cancels
whatever is in flight (the way out of a wedged machine on Fly too).

When a main process exits on its own, the exit is recorded as an ``exit`` event and the restart
policy decides: ``always`` restarts; ``on-failure`` (Fly's default, 10 retries) restarts non-zero
exits (each after a doubling backoff, as flyd does); otherwise ``auto_destroy`` destroys the
machine, else it rests in ``stopped``. A destroyed machine stays readable (GET, events, wait) for
``destroyed_retention`` seconds, as on Fly, so its exit code can still be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets as secrets_mod
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from api.logs import get_logger
from controller import machine_state as ms
from controller.machine_state import MachineState as S
from local.emulator_apps import AppRegistry
from local.emulator_config import check_guest, check_mounts, known_fields
from local.emulator_errors import FlyError, invalid, not_found, unable
from local.emulator_faults import FaultInjector, FaultSettings, RequestStats
from local.emulator_process import (
    ExitStatus,
    LaunchError,
    MachineProcess,
    build_env,
    check_allowed,
    resolve_command,
)
from local.emulator_settings import EmulatorSettings
from local.emulator_volumes import VolumeRegistry

log = get_logger("flyswarm.emulator")

#: What ``wait?state=settled`` accepts: any state a machine rests in, or gone.
SETTLED_FOR_WAIT = ms.RESTING | ms.GONE
WAITABLE_STATES = ms.WAITABLE
#: Transitions during which the main process's exit is expected (not a crash).
_STOPPING = frozenset({S.STOPPING, S.RESTARTING, S.REPLACING, S.DESTROYING, S.UPDATING})
DEFAULT_MAX_RETRIES = 10
EMBEDDED_EVENTS = 20

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_ADJECTIVES = ("quiet", "bold", "swift", "lucky", "misty", "rapid", "sunny", "wild", "calm", "brave")
_NOUNS = ("river", "forest", "meadow", "canyon", "harbor", "island", "summit", "valley", "glade", "dune")


# --- small value helpers ---------------------------------------------------------------------


def ulid() -> str:
    """A 26-character ULID (48-bit millisecond time + 80 random bits), Fly's version/event id format."""
    value = (int(time.time() * 1000) << 80) | secrets_mod.randbits(80)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_duration(value: Any, what: str) -> float | None:
    """Seconds from a Go duration (``10s``, ``1m30s``, ``500ms``) or a number of seconds; None if empty."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise invalid(f"{what} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for match in _DURATION_RE.finditer(text):
                if match.start() != pos:
                    raise invalid(f"{what}: invalid duration {value!r}")
                seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise invalid(f"{what}: invalid duration {value!r}")
    else:
        raise invalid(f"{what} is not a duration")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise invalid(f"{what}: invalid duration {value!r}")
    return seconds


def parse_signal(value: Any, what: str = "signal") -> int | None:
    """A signal number from ``"SIGTERM"``, ``"TERM"`` or an int (fly-go's Kill sends 9)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise invalid(f"{what}: invalid signal")
    if isinstance(value, int):
        if 0 < value < signal.NSIG:
            return value
        raise invalid(f"{what}: invalid signal {value}")
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return parse_signal(int(name), what)
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise invalid(f"{what}: invalid signal {value!r}") from None
    raise invalid(f"{what}: invalid signal")


def image_ref(image: str) -> dict[str, Any]:
    """Fly's ``image_ref``: the image split into registry, repository, tag and a digest."""
    ref, _, digest = image.partition("@")
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "registry-1.docker.io", ref
        if "/" not in path:
            path = f"library/{path}"
    repository, _, tag = path.partition(":")
    digest = digest or "sha256:" + hashlib.sha256(image.encode()).hexdigest()
    return {
        "registry": registry,
        "repository": repository,
        "tag": tag or "latest",
        "digest": digest,
        "labels": {},
    }


# --- request and config shapes (edge validation; raw dicts are stored and echoed) -----------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Init(_Lenient):
    exec: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None


class _Restart(_Lenient):
    policy: Literal["no", "always", "on-failure", ""] | None = None
    max_retries: int | None = None


class _StopConfig(_Lenient):
    signal: str | int | None = None
    timeout: str | int | float | None = None


class _Config(_Lenient):
    image: str | None = None
    env: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    init: _Init | None = None
    restart: _Restart | None = None
    stop_config: _StopConfig | None = None
    auto_destroy: bool | None = None
    guest: dict[str, Any] | None = None


class _CreateRequest(_Lenient):
    config: dict[str, Any] | None = None
    name: str | None = None
    region: str | None = None
    skip_launch: bool | None = None
    skip_secrets: bool | None = None
    lease_ttl: int | None = None
    current_version: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """What the emulator interprets from a machine config; the raw config is kept as sent."""

    image: str
    exec_: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    cmd: tuple[str, ...] | None
    env: Mapping[str, str]
    restart_policy: str
    max_retries: int
    auto_destroy: bool
    stop_signal: int
    stop_timeout: float | None


def _validation_message(exc: ValidationError, prefix: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
    return f"{where}: {err['msg']}"


def parse_config(raw: Any) -> tuple[dict[str, Any], RunSpec]:
    if not isinstance(raw, dict):
        raise invalid("config is required")
    try:
        config = _Config.model_validate(raw)
    except ValidationError as exc:
        raise invalid(_validation_message(exc, "config")) from None
    if not config.image:
        raise invalid("config.image is required")
    init = config.init or _Init()
    restart = config.restart or _Restart()
    policy = restart.policy or "on-failure"
    max_retries = restart.max_retries if restart.max_retries is not None else DEFAULT_MAX_RETRIES
    if max_retries < 0:
        raise invalid("config.restart.max_retries must be >= 0")
    stop = config.stop_config or _StopConfig()
    stop_signal = parse_signal(stop.signal, "config.stop_config.signal") or int(signal.SIGINT)
    stop_timeout = parse_duration(stop.timeout, "config.stop_config.timeout")
    check_mounts(raw.get("mounts"))
    # Fly keeps only the fields it knows and fills in a default guest; echo that, like Fly does.
    stored = known_fields(raw)
    stored["guest"] = check_guest(stored.get("guest"))
    spec = RunSpec(
        image=config.image,
        exec_=tuple(init.exec) if init.exec else None,
        entrypoint=tuple(init.entrypoint) if init.entrypoint else None,
        cmd=tuple(init.cmd) if init.cmd else None,
        env=dict(config.env or {}),
        restart_policy=policy,
        max_retries=max_retries,
        auto_destroy=bool(config.auto_destroy),
        stop_signal=stop_signal,
        stop_timeout=stop_timeout,
    )
    return stored, spec


def parse_request(body: Any) -> _CreateRequest:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    try:
        return _CreateRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid(_validation_message(exc, "")) from None


# --- the world -------------------------------------------------------------------------------


@dataclass
class Lease:
    nonce: str
    owner: str
    description: str
    expires_at: float
    version: str

    def data(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce,
            "expires_at": int(self.expires_at),
            "owner": self.owner,
            "description": self.description,
            "version": self.version,
        }


@dataclass
class ListQuery:
    include_deleted: bool = False
    include_leases: bool = False
    summary: bool = False
    region: str | None = None
    states: frozenset[str] | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    limit: int | None = None
    cursor: str | None = None


@dataclass(eq=False)
class Machine:
    id: str
    app: str
    name: str
    region: str
    config: dict[str, Any]
    spec: RunSpec
    version: str
    private_ip: str
    created_at: float
    created_mono: float
    skip_secrets: bool
    state: str = "created"
    updated_at: float = 0.0
    cordoned: bool = False
    lease: Lease | None = None
    process: MachineProcess | None = None
    task: asyncio.Task[None] | None = None
    launch_pending: bool = False
    restart_count: int = 0
    frozen: bool = False
    hung: bool = False
    memory_limit_mb: int | None = None
    destroyed_mono: float | None = None
    started_mono: float = 0.0
    restart_pending: bool = False  # exited; the restart policy's backoff is running
    backoff_streak: int = 0
    pre_destroy_state: str = "stopped"
    events: deque[dict[str, Any]] = field(default_factory=deque)
    versions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def workdir_name(self) -> str:
        return self.id

    def active_lease(self, now: float) -> Lease | None:
        if self.lease is not None and self.lease.expires_at <= now:
            self.lease = None
        return self.lease


class EmulatorState:
    """All emulated machines and the operations on them. Close it to kill every process it started."""

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.settings = settings or EmulatorSettings()
        self.faults = FaultInjector(self.settings.faults.model_copy())
        self.stats = RequestStats()
        self.secrets: dict[str, dict[str, str]] = {app: dict(v) for app, v in self.settings.secrets.items()}
        self.machines: dict[str, Machine] = {}
        self.apps = AppRegistry(self.settings.default_org)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spawning: set[asyncio.Future[MachineProcess]] = set()
        self._processes: set[MachineProcess] = set()
        self._closed = False
        self.task_failures = 0
        if self.settings.work_root is None:
            self.work_root = Path(tempfile.mkdtemp(prefix="flyswarm-emulator-"))
            self._owns_root = True
        else:
            self.work_root = self.settings.work_root.resolve()
            self.work_root.mkdir(parents=True, exist_ok=True)
            self._owns_root = False
        self.volumes = VolumeRegistry(
            self.work_root / "volumes", attached=self._volume_holder, regions=self.settings.regions
        )

    # -- bookkeeping ---------------------------------------------------------------------------

    def _volume_holder(self, volume_id: str) -> str | None:
        """The live machine whose config mounts ``volume_id`` (a volume's ``attached_machine_id``)."""
        for m in self.machines.values():
            if m.state != S.DESTROYED and any(
                mount.get("volume") == volume_id for mount in m.config.get("mounts") or []
            ):
                return m.id
        return None

    def _track(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # An emulator bug: counted so tests (and /_admin/health) can prove there were none.
            self.task_failures += 1
            log.error("emulator_task_failed", error=repr(task.exception()))

    def _run(self, m: Machine, coro: Coroutine[Any, Any, None]) -> None:
        """Run the slow part of a transition as the machine's one in-flight operation."""
        task = self._track(self._operation(m, coro))
        m.task = task

    async def _operation(self, m: Machine, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        finally:
            if m.task is asyncio.current_task():
                m.task = None

    def _cancel_operation(self, m: Machine) -> None:
        task, m.task = m.task, None
        m.launch_pending = False
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def _delay(self, state: str) -> float:
        return self.settings.transition_delays.get(state, self.settings.transition_delay)

    async def _linger(self, since: float, state: str) -> None:
        """Keep a transient state visible for at least its configured delay."""
        remaining = self._delay(state) - (time.monotonic() - since)
        if remaining > 0:
            await asyncio.sleep(remaining)

    def _touch(self, m: Machine) -> None:
        m.updated_at = time.time()
        m.changed.set()
        m.changed = asyncio.Event()

    def _set_state(self, m: Machine, state: str) -> None:
        if m.state == state:
            return
        if state == "destroying":
            m.pre_destroy_state = m.state
        m.state = state
        self._touch(m)
        log.debug("machine_state_changed", machine_id=m.id, app=m.app, state=state)

    def _event(
        self, m: Machine, type_: str, status: str, source: str, request: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        event = {
            "id": ulid(),
            "type": type_,
            "status": status,
            "source": source,
            "timestamp": int(time.time() * 1000),
            "request": request or {},
        }
        m.events.appendleft(event)
        while len(m.events) > self.settings.max_events:
            m.events.pop()
        self._touch(m)
        return event

    def _exit_event(self, m: Machine, status: ExitStatus, *, requested_stop: bool, restarting: bool) -> None:
        self._event(
            m,
            "exit",
            "stopped",
            "flyd",
            {
                "exit_event": {
                    "exit_code": status.exit_code,
                    "guest_exit_code": status.exit_code,
                    "guest_signal": status.signal,
                    "signal": status.signal,
                    "oom_killed": False,
                    "requested_stop": requested_stop,
                    "restarting": restarting,
                    "exited_at": rfc3339(time.time()),
                    # flyd's own failure and the guest init's; empty when the process just exited.
                    "error": "",
                    "guest_error": "",
                },
                "restart_count": m.restart_count,
            },
        )

    # -- lookup and guards ---------------------------------------------------------------------

    def _find(self, app: str, machine_id: str) -> Machine | None:
        m = self.machines.get(machine_id)
        if m is None or m.app != app:
            return None
        return m

    def machine(self, app: str, machine_id: str) -> Machine:
        """A live (not destroyed) machine of the app, else 404."""
        m = self._find(app, machine_id)
        if m is None or m.state == S.DESTROYED:
            raise not_found()
        return m

    def _visible(self, app: str, machine_id: str) -> Machine:
        """A machine GET can still see: live, or destroyed less than ``destroyed_retention`` ago.

        Fly keeps answering 200 with ``state: "destroyed"`` (and the events, exit code included)
        for a while after a destroy, so a client can read how an ``auto_destroy`` machine ended.
        """
        m = self._find(app, machine_id)
        if m is None or self._forgotten(m):
            raise not_found()
        return m

    def _forgotten(self, m: Machine) -> bool:
        return (
            m.destroyed_mono is not None
            and time.monotonic() - m.destroyed_mono >= self.settings.destroyed_retention
        )

    def _check_lease(self, m: Machine, nonce: str | None) -> None:
        lease = m.active_lease(time.time())
        if lease is not None and nonce != lease.nonce:
            raise FlyError(409, self._lease_held_text(m, lease))

    @staticmethod
    def _lease_held_text(m: Machine, lease: Lease) -> str:
        return (
            f"aborted: machine ID {m.id} lease currently held by {lease.owner}, "
            f"expires at {rfc3339(lease.expires_at)}"
        )

    def _mutable(self, app: str, machine_id: str, nonce: str | None) -> Machine:
        m = self.machine(app, machine_id)
        self._check_lease(m, nonce)
        return m

    # -- views ---------------------------------------------------------------------------------

    def view(
        self,
        m: Machine,
        *,
        summary: bool = False,
        include_lease: bool = False,
        state: str | None = None,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": m.id,
            "name": m.name,
            "state": state or m.state,
            "region": m.region,
            "instance_id": m.version,
            "version": m.version,
            "private_ip": m.private_ip,
            "image_ref": image_ref(m.spec.image),
            "created_at": rfc3339(m.created_at),
            "updated_at": rfc3339(m.updated_at),
            "cordoned": m.cordoned,
        }
        if not summary:
            out["config"] = m.config
            out["events"] = list(m.events)[:EMBEDDED_EVENTS]
            out["checks"] = []
            out["host_status"] = "ok"
            if nonce is not None:
                out["nonce"] = nonce
        if include_lease:
            lease = m.active_lease(time.time())
            if lease is not None:
                out["lease"] = {
                    "owner": lease.owner,
                    "description": lease.description,
                    "expires_at": int(lease.expires_at),
                }
        return out

    # -- machines: create, get, list, update -------------------------------------------------

    def create(self, app: str, body: Any, owner: str) -> tuple[Machine, str | None]:
        req = parse_request(body)
        config, spec = parse_config(req.config)
        mounted = self.volumes.volumes.get(str((config.get("mounts") or [{}])[0].get("volume")))
        # Without a region the machine goes where its volume is, as on Fly.
        region = req.region or (mounted.region if mounted else None) or self.settings.default_region
        if self.settings.regions and region not in self.settings.regions:
            raise FlyError(422, f"invalid_argument: region {region!r} not found")
        if self.faults.region_full(region):
            raise FlyError(
                422,
                f"insufficient resources available to fulfill request: no capacity in region {region}",
                "insufficient_capacity",
            )
        if req.lease_ttl is not None and req.lease_ttl <= 0:
            raise invalid("lease_ttl must be a positive number of seconds")
        self.volumes.check_mount(
            app, region, config.get("mounts"), machine_id=None, host_full=self.faults.volume_host_full
        )
        self.apps.ensure(app)
        live = [m for m in self.machines.values() if m.app == app and m.state != S.DESTROYED]
        if req.name and any(m.name == req.name for m in live):
            raise FlyError(409, f"already_exists: a machine named {req.name!r} already exists in app {app}")
        name = req.name or self._generate_name({m.name for m in live})
        now = time.time()
        version = ulid()
        m = Machine(
            id=self._generate_id(),
            app=app,
            name=name,
            region=region,
            config=config,
            spec=spec,
            version=version,
            private_ip=self._private_ip(app),
            created_at=now,
            created_mono=time.monotonic(),
            skip_secrets=bool(req.skip_secrets),
            updated_at=now,
        )
        m.versions.append((version, config))
        self.machines[m.id] = m
        nonce: str | None = None
        if req.lease_ttl is not None:
            nonce = secrets_mod.token_hex(6)
            m.lease = Lease(nonce, owner, "", now + req.lease_ttl, version)
        self._event(m, "launch", "created", "user")
        log.info("machine_created", machine_id=m.id, app=app, region=region, image=spec.image)
        if not req.skip_launch:
            m.launch_pending = True
            self._run(m, self._launch(m))
        if self.faults.create_times_out():
            # The machine exists and will boot; only the answer is lost (ambiguous failure).
            raise FlyError(408, "deadline_exceeded: request timed out while creating the machine")
        return m, nonce

    def _generate_id(self) -> str:
        while True:
            machine_id = secrets_mod.token_hex(7)
            if machine_id not in self.machines:
                return machine_id

    @staticmethod
    def _generate_name(taken: set[str]) -> str:
        while True:
            number = secrets_mod.randbelow(10000)
            name = f"{secrets_mod.choice(_ADJECTIVES)}-{secrets_mod.choice(_NOUNS)}-{number:04d}"
            if name not in taken:
                return name

    @staticmethod
    def _private_ip(app: str) -> str:
        app_hash = hashlib.sha256(app.encode()).hexdigest()
        host = secrets_mod.token_hex(6)
        return f"fdaa:0:{app_hash[:4]}:a7b:{host[:4]}:{host[4:8]}:{host[8:12]}:2"

    def get(
        self, app: str, machine_id: str, version: str | None = None, include_lease: bool = False
    ) -> dict[str, Any]:
        m = self._visible(app, machine_id)
        if version and version != m.version:
            for old_version, old_config in m.versions:
                if old_version == version:
                    out = self.view(m, include_lease=include_lease, state="replaced")
                    out.update({"version": old_version, "instance_id": old_version, "config": old_config})
                    return out
            raise FlyError(404, "machine version not found")
        return self.view(m, include_lease=include_lease)

    def list_machines(self, app: str, query: ListQuery) -> tuple[list[dict[str, Any]], str | None]:
        if query.limit is not None and not 1 <= query.limit <= 1000:
            raise invalid("limit must be between 1 and 1000")
        if query.cursor is not None and query.limit is None:
            raise invalid("cursor requires limit")
        lag = self.faults.settings.list_lag_seconds
        now = time.monotonic()
        rows: list[tuple[Machine, str]] = []
        for m in self.machines.values():
            if m.app != app:
                continue
            state = m.state
            if lag > 0:
                if now - m.created_mono < lag:
                    continue  # not yet replicated to the store list reads from
                if m.destroyed_mono is not None and now - m.destroyed_mono < lag:
                    state = m.pre_destroy_state
            if state == "destroyed" and not query.include_deleted:
                continue
            if query.region and m.region != query.region:
                continue
            if query.states is not None and state not in query.states:
                continue
            metadata = m.config.get("metadata") or {}
            if any(metadata.get(k) != v for k, v in query.metadata.items()):
                continue
            rows.append((m, state))
        if query.cursor is not None:
            after = _decode_cursor(query.cursor)
            # Resume after the cursor's machine in creation order, even if it no longer matches.
            order = {machine_id: i for i, machine_id in enumerate(self.machines)}
            if after not in order:
                raise invalid("invalid cursor")
            rows = [(m, s) for m, s in rows if order[m.id] > order[after]]
        next_cursor = None
        if query.limit is not None and len(rows) > query.limit:
            rows = rows[: query.limit]
            next_cursor = _encode_cursor(rows[-1][0].id)
        views = [
            self.view(m, summary=query.summary, include_lease=query.include_leases, state=state)
            for m, state in rows
        ]
        return views, next_cursor

    def update(self, app: str, machine_id: str, body: Any, nonce: str | None) -> dict[str, Any]:
        m = self._mutable(app, machine_id, nonce)
        req = parse_request(body)
        if req.current_version and req.current_version != m.version:
            raise FlyError(
                409,
                f"aborted: machine version {m.version} does not match current_version {req.current_version}",
            )
        if m.state not in ("started", "stopped", "suspended", "failed", "created"):
            raise unable("update")
        if req.config is None:
            # Fly replaces the whole config; an update without one would only restart the machine.
            raise invalid("config is required")
        config, spec = parse_config(req.config)
        self.volumes.check_mount(
            app, m.region, config.get("mounts"), machine_id=m.id, host_full=self.faults.volume_host_full
        )
        previous, old_spec = m.state, m.spec
        was_pending = m.launch_pending
        self._cancel_operation(m)
        m.config, m.spec = config, spec
        m.version = ulid()
        m.versions.append((m.version, config))
        m.restart_count = 0
        if req.skip_secrets is not None:
            m.skip_secrets = req.skip_secrets
        self._event(m, "update", "replacing" if previous == "started" else "updating", "user")
        launch = not req.skip_launch
        if previous == "started":
            self._set_state(m, S.REPLACING)
            self._run(m, self._replace(m, old_spec, relaunch=launch))
        else:
            self._set_state(m, S.UPDATING)
            after = "stopped" if previous in ("stopped", "suspended", "failed") else "created"
            relaunch = previous == "created" and was_pending and launch
            self._run(m, self._update_resting(m, after, relaunch=relaunch))
        log.info("machine_updated", machine_id=m.id, app=app, version=m.version)
        return self.view(m)

    async def _replace(self, m: Machine, old_spec: RunSpec, *, relaunch: bool) -> None:
        since = time.monotonic()
        status = await self._stop_process(m, old_spec.stop_signal, self._stop_timeout(old_spec, None))
        if status is not None:
            self._exit_event(m, status, requested_stop=True, restarting=relaunch)
        await self._linger(since, "replacing")
        if relaunch:
            await self._boot(m)
        else:
            self._set_state(m, S.STOPPED)

    async def _update_resting(self, m: Machine, after: str, *, relaunch: bool) -> None:
        since = time.monotonic()
        if m.process is not None:
            # A suspended machine's snapshot is discarded by an update.
            await self._kill_process(m)
        await self._linger(since, "updating")
        if relaunch:
            await self._boot(m)
        else:
            self._set_state(m, after)

    # -- lifecycle actions ---------------------------------------------------------------------

    def start(self, app: str, machine_id: str, nonce: str | None) -> dict[str, Any]:
        m = self._mutable(app, machine_id, nonce)
        previous = m.state
        if previous == "created" and m.launch_pending:
            # The launch that create scheduled will start it; starting twice would be wrong.
            return {"previous_state": previous, "migrated": False, "new_host": ""}
        if previous not in ("created", "stopped", "failed", "suspended"):
            raise unable("start")
        if self.faults.region_full(m.region) and previous != "suspended":
            raise FlyError(
                409,
                "aborted: could not reserve resource for machine: "
                "insufficient memory available to fulfill request",
            )
        self._event(m, "start", "starting", "user")
        m.restart_count = 0
        if previous == "suspended":
            self._set_state(m, S.STARTING)
            self._run(m, self._resume(m))
        else:
            self._set_state(m, S.STARTING)
            self._run(m, self._boot(m))
        return {"previous_state": previous, "migrated": False, "new_host": ""}

    def stop(self, app: str, machine_id: str, body: Any, nonce: str | None) -> None:
        m = self._mutable(app, machine_id, nonce)
        if body is not None and not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        body = body or {}
        sig = parse_signal(body.get("signal"), "signal")
        timeout = parse_duration(body.get("timeout"), "timeout")
        if m.state not in ("started", "suspended", "failed", "created") and not m.restart_pending:
            raise unable("stop")
        previous = m.state
        self._cancel_operation(m)
        self._event(m, "stop", "stopping", "user")
        self._set_state(m, S.STOPPING)
        self._run(m, self._stop(m, sig, timeout, previous))

    def suspend(self, app: str, machine_id: str, nonce: str | None) -> None:
        m = self._mutable(app, machine_id, nonce)
        if m.state != S.STARTED or m.process is None:
            raise unable("suspend")
        self._event(m, "suspend", "suspending", "user")
        self._set_state(m, S.SUSPENDING)
        self._run(m, self._suspend(m))

    def restart(
        self, app: str, machine_id: str, nonce: str | None, timeout: Any, sig: Any, force_stop: bool
    ) -> None:
        m = self._mutable(app, machine_id, nonce)
        timeout_s = parse_duration(timeout, "timeout")
        signum = parse_signal(sig, "signal")
        if m.state != S.STARTED:
            raise unable("restart")
        if force_stop:
            signum = int(signal.SIGKILL)
        self._event(m, "restart", "restarting", "user")
        self._set_state(m, S.RESTARTING)
        self._run(m, self._restart(m, signum, timeout_s))

    def destroy(self, app: str, machine_id: str, nonce: str | None, force: bool) -> None:
        m = self._mutable(app, machine_id, nonce)
        at_rest = m.state in ("stopped", "suspended", "failed", "created") or m.restart_pending
        if not force and not at_rest:
            raise FlyError(
                412,
                "failed_precondition: unable to destroy machine, "
                "not currently stopped, suspended, failed or created",
            )
        if m.state == S.DESTROYING:
            return
        self._cancel_operation(m)
        self._event(m, "destroy", "destroying", "user")
        self._set_state(m, S.DESTROYING)
        self._run(m, self._destroy(m))

    def signal(self, app: str, machine_id: str, body: Any, nonce: str | None) -> None:
        m = self._mutable(app, machine_id, nonce)
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        signum = parse_signal(body.get("signal"), "signal")
        if signum is None:
            raise invalid("signal is required")
        if m.state != S.STARTED or m.process is None:
            raise unable("signal")
        m.process.send(signum)

    def cordon(self, app: str, machine_id: str, nonce: str | None, cordoned: bool) -> None:
        m = self._mutable(app, machine_id, nonce)
        m.cordoned = cordoned
        self._touch(m)

    # -- the slow halves ---------------------------------------------------------------------

    async def _launch(self, m: Machine) -> None:
        # ``created`` stays visible for a moment before flyd boots the machine.
        await asyncio.sleep(self._delay("created"))
        m.launch_pending = False
        await self._boot(m)

    async def _boot(self, m: Machine) -> None:
        """starting -> started (a fresh main process), or failed when it cannot launch."""
        since = time.monotonic()
        self._set_state(m, S.STARTING)
        await self._linger(since, "starting")
        try:
            argv = resolve_command(
                m.spec.image, m.spec.exec_, m.spec.entrypoint, m.spec.cmd, self.settings.images
            )
            env = self._machine_env(m)
            check_allowed(argv[0], env, self.settings.allowed_executables)
            process = await self._spawn(m, argv, env)
        except LaunchError as exc:
            log.warning("machine_launch_failed", machine_id=m.id, app=m.app, error=str(exc))
            self._event(
                m,
                "exit",
                "failed",
                "flyd",
                {
                    "error": str(exc),
                    "exit_event": {
                        "exit_code": 127,
                        "guest_exit_code": 127,
                        "signal": -1,
                        "guest_signal": -1,
                        "oom_killed": False,
                        "requested_stop": False,
                        "restarting": False,
                        "exited_at": rfc3339(time.time()),
                        "error": f"failed to launch VM: {exc}",
                        "guest_error": "",
                    },
                    "restart_count": m.restart_count,
                },
            )
            self._set_state(m, S.FAILED)
            return
        m.process = process
        m.frozen = m.hung = False
        m.started_mono = time.monotonic()
        self._track(self._monitor(m, process))
        self._set_state(m, S.STARTED)
        self._event(m, "start", "started", "flyd")
        log.info("machine_started", machine_id=m.id, app=m.app, pid=process.pid)

    async def _spawn(self, m: Machine, argv: list[str], env: dict[str, str]) -> MachineProcess:
        if self._closed:
            raise LaunchError("emulator is shutting down")
        future = asyncio.ensure_future(
            MachineProcess.spawn(argv, cwd=self.work_root / m.workdir_name, env=env)
        )
        self._spawning.add(future)
        future.add_done_callback(self._spawned)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The operation was cancelled (forced destroy, shutdown) while the process was being
            # born: make sure it does not outlive us.
            future.add_done_callback(self._orphaned)
            raise

    def _spawned(self, future: asyncio.Future[MachineProcess]) -> None:
        self._spawning.discard(future)
        if not future.cancelled() and future.exception() is None:
            self._processes.add(future.result())

    def _orphaned(self, future: asyncio.Future[MachineProcess]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        process = future.result()
        process.expected_exit = True
        process.kill_group(signal.SIGKILL)
        self._track(self._reap(process))

    async def _reap(self, process: MachineProcess) -> ExitStatus:
        try:
            return await process.wait()
        finally:
            self._processes.discard(process)

    def _machine_env(self, m: Machine) -> dict[str, str]:
        fly_env = {
            "FLY_MACHINE_ID": m.id,
            "FLY_ALLOC_ID": m.id,
            "FLY_APP_NAME": m.app,
            "FLY_REGION": m.region,
            "FLY_IMAGE_REF": m.spec.image,
            "FLY_PRIVATE_IP": m.private_ip,
            "FLY_MACHINE_VERSION": m.version,
        }
        group = (m.config.get("metadata") or {}).get("fly_process_group")
        if isinstance(group, str):
            fly_env["FLY_PROCESS_GROUP"] = group
        return build_env(
            host_env=os.environ,
            inherit=self.settings.inherit_env,
            home=self.work_root / m.workdir_name,
            config_env=self.volumes.guest_env(m.spec.env, m.config.get("mounts")),
            secrets={} if m.skip_secrets else self.secrets.get(m.app, {}),
            fly_env=fly_env,
        )

    async def _monitor(self, m: Machine, process: MachineProcess) -> None:
        """Reap the main process; an exit nobody asked for goes through the restart policy."""
        status = await self._reap(process)
        if process.expected_exit or m.process is not process or self._closed or m.state in _STOPPING:
            # An operation in flight (stop, restart, destroy, update) owns this exit.
            return
        m.process = None
        log.info(
            "machine_exited", machine_id=m.id, app=m.app, exit_code=status.exit_code, signal=status.signal
        )
        self._cancel_operation(m)
        self._run(m, self._after_exit(m, status))

    async def _after_exit(self, m: Machine, status: ExitStatus) -> None:
        spec = m.spec
        will_restart = spec.restart_policy == "always" or (
            spec.restart_policy == "on-failure"
            and status.exit_code != 0
            and m.restart_count < spec.max_retries
        )
        self._exit_event(m, status, requested_stop=False, restarting=will_restart)
        if will_restart:
            m.restart_count += 1
            await self._back_off(m)
            await self._boot(m)
        elif spec.auto_destroy:
            self._event(m, "destroy", "destroying", "flyd")
            self._set_state(m, S.DESTROYING)
            await self._destroy(m)
        else:
            self._set_state(m, S.STOPPED)

    async def _back_off(self, m: Machine) -> None:
        """flyd waits before each policy restart, doubling while the machine keeps crashing.

        The machine shows ``starting`` meanwhile (``always`` never rests in ``stopped``); a stop or
        destroy cancels the pending restart. A run longer than the cap resets the streak.
        """
        ran = time.monotonic() - m.started_mono
        settings = self.settings
        m.backoff_streak = 1 if ran >= settings.restart_backoff_max else m.backoff_streak + 1
        delay = min(settings.restart_backoff * 2 ** (m.backoff_streak - 1), settings.restart_backoff_max)
        self._set_state(m, S.STARTING)
        m.restart_pending = True
        try:
            await asyncio.sleep(delay)
        finally:
            m.restart_pending = False

    def _stop_timeout(self, spec: RunSpec, requested: float | None) -> float:
        # fly-go always sends "0s": zero means "use the machine's stop_config".
        if requested:
            return requested
        if spec.stop_timeout:
            return spec.stop_timeout
        return self.settings.stop_timeout

    async def _stop_process(self, m: Machine, sig: int, timeout: float) -> ExitStatus | None:
        """Signal the main process, SIGKILL the group after the timeout; None when nothing ran."""
        process = m.process
        if process is None:
            return None
        process.expected_exit = True
        if sig == signal.SIGKILL:
            process.kill_group(signal.SIGKILL)
        else:
            process.send(sig)
        try:
            status = await asyncio.wait_for(process.exited(), timeout)
        except TimeoutError:
            process.kill_group(signal.SIGKILL)
            status = await process.exited()
        m.process = None
        m.frozen = m.hung = False
        return status

    async def _kill_process(self, m: Machine) -> ExitStatus | None:
        process = m.process
        if process is None:
            return None
        process.expected_exit = True
        process.kill_group(signal.SIGKILL)
        status = await process.exited()
        m.process = None
        m.frozen = m.hung = False
        return status

    async def _stop(self, m: Machine, sig: int | None, timeout: float | None, previous: str) -> None:
        since = time.monotonic()
        signum = sig or m.spec.stop_signal
        if previous == "suspended":
            # Stopping a suspended machine discards its snapshot: the frozen process just dies.
            status = await self._kill_process(m)
        else:
            status = await self._stop_process(m, signum, self._stop_timeout(m.spec, timeout))
        if status is not None:
            self._exit_event(m, status, requested_stop=True, restarting=False)
        await self._linger(since, "stopping")
        self._set_state(m, S.STOPPED)
        log.info("machine_stopped", machine_id=m.id, app=m.app)

    async def _suspend(self, m: Machine) -> None:
        since = time.monotonic()
        if m.process is not None:
            m.process.kill_group(signal.SIGSTOP)
            m.frozen = True
            await m.process.settle_stop(True)
        await self._linger(since, "suspending")
        self._set_state(m, S.SUSPENDED)
        self._event(m, "suspend", "suspended", "flyd")

    async def _resume(self, m: Machine) -> None:
        since = time.monotonic()
        if m.process is None or not m.process.running:
            await self._boot(m)  # resume is not guaranteed on Fly either: cold boot
            return
        # As on Fly, the snapshot is restored first (the ``starting`` time) and only then do the
        # machine's processes run again.
        await self._linger(since, "starting")
        m.process.kill_group(signal.SIGCONT)
        m.frozen = m.hung = False
        await m.process.settle_stop(False)
        self._set_state(m, S.STARTED)
        self._event(m, "start", "started", "flyd", {"resumed": True})

    async def _restart(self, m: Machine, sig: int | None, timeout: float | None) -> None:
        since = time.monotonic()
        status = await self._stop_process(m, sig or m.spec.stop_signal, self._stop_timeout(m.spec, timeout))
        if status is not None:
            self._exit_event(m, status, requested_stop=True, restarting=True)
        await self._linger(since, "restarting")
        await self._boot(m)

    async def _destroy(self, m: Machine) -> None:
        since = time.monotonic()
        status = await self._kill_process(m)
        if status is not None:
            self._exit_event(m, status, requested_stop=True, restarting=False)
        await self._linger(since, "destroying")
        m.lease = None
        m.destroyed_mono = time.monotonic()
        self._set_state(m, S.DESTROYED)
        self._event(m, "destroy", "destroyed", "flyd")
        log.info("machine_destroyed", machine_id=m.id, app=m.app)

    # -- wait ----------------------------------------------------------------------------------

    async def wait(
        self, app: str, machine_id: str, states: Iterable[str], timeout: float, version: str | None
    ) -> dict[str, Any]:
        m = self._visible(app, machine_id)
        wanted = frozenset(states)
        if m.state == S.DESTROYED and not wanted & {"destroyed", "settled"}:
            raise not_found()
        if version and version != m.version:
            if any(v == version for v, _ in m.versions):
                raise invalid(f"machine version {version} currently replaced")
            raise invalid(f"unknown machine version {version}")

        def satisfied() -> bool:
            return m.state in wanted or ("settled" in wanted and m.state in SETTLED_FOR_WAIT)

        deadline = time.monotonic() + timeout
        while not satisfied():
            if m.state == S.DESTROYED:
                raise not_found()
            changed = m.changed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FlyError(
                    408, f"deadline_exceeded: machine did not reach state {','.join(sorted(wanted))}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        event_id = m.events[0]["id"] if m.events else ""
        return {"ok": True, "state": m.state, "version": m.version, "event_id": event_id}

    # -- leases --------------------------------------------------------------------------------

    def acquire_lease(
        self, app: str, machine_id: str, nonce: str | None, ttl: int, description: str, owner: str
    ) -> dict[str, Any]:
        m = self.machine(app, machine_id)
        if ttl <= 0:
            raise invalid("ttl must be a positive number of seconds")
        now = time.time()
        lease = m.active_lease(now)
        if lease is not None:
            if nonce != lease.nonce:
                raise FlyError(409, self._lease_held_text(m, lease))
            lease.expires_at = now + ttl
            if description:
                lease.description = description
        else:
            lease = Lease(secrets_mod.token_hex(6), owner, description, now + ttl, m.version)
            m.lease = lease
        self._touch(m)
        return {"status": "success", "data": lease.data()}

    def show_lease(self, app: str, machine_id: str) -> dict[str, Any]:
        m = self.machine(app, machine_id)
        lease = m.active_lease(time.time())
        if lease is None:
            raise FlyError(404, "lease not found")
        return {"status": "success", "data": lease.data()}

    def release_lease(self, app: str, machine_id: str, nonce: str | None) -> dict[str, Any]:
        m = self.machine(app, machine_id)
        if not nonce:
            raise invalid("fly-machine-lease-nonce header is required")
        lease = m.active_lease(time.time())
        if lease is None:
            raise FlyError(404, "lease not found")
        if nonce != lease.nonce:
            raise FlyError(409, self._lease_held_text(m, lease))
        m.lease = None
        self._touch(m)
        return {"status": "success", "data": {"ok": True}}

    # -- events, metadata, versions ------------------------------------------------------------

    def events(self, app: str, machine_id: str, limit: int | None) -> list[dict[str, Any]]:
        m = self._visible(app, machine_id)
        if limit is None or limit <= 0:
            limit = 20
        return list(m.events)[: min(limit, 50)]

    def versions(self, app: str, machine_id: str) -> list[dict[str, Any]]:
        m = self.machine(app, machine_id)
        return [{"version": v, "user_config": c} for v, c in reversed(m.versions)]

    def metadata(self, app: str, machine_id: str) -> dict[str, str]:
        m = self.machine(app, machine_id)
        return dict(m.config.get("metadata") or {})

    def metadata_key(self, app: str, machine_id: str, key: str) -> dict[str, str]:
        value = self.metadata(app, machine_id).get(key)
        if value is None:
            raise FlyError(404, "metadata key not found")
        return {"value": value}

    def update_metadata(self, app: str, machine_id: str, body: Any, nonce: str | None) -> None:
        m = self._mutable(app, machine_id, nonce)
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        changes = body.get("metadata") or {}
        expected = body.get("machine_version")
        if not isinstance(changes, dict) or any(
            not isinstance(k, str) or not (v is None or isinstance(v, str)) for k, v in changes.items()
        ):
            raise invalid("metadata must map keys to strings")
        if expected is not None and not isinstance(expected, str):
            raise invalid("machine_version must be a string")
        if expected and expected != m.version:
            raise FlyError(412, f"failed_precondition: machine version {m.version} does not match {expected}")
        metadata = dict(m.config.get("metadata") or {})
        for key, value in changes.items():
            if value:
                metadata[key] = value
            else:
                metadata.pop(key, None)
        self._set_metadata(m, metadata)

    def upsert_metadata(self, app: str, machine_id: str, key: str, body: Any, nonce: str | None) -> None:
        m = self._mutable(app, machine_id, nonce)
        if not isinstance(body, dict) or not isinstance(body.get("value"), str):
            raise invalid("value must be a string")
        metadata = dict(m.config.get("metadata") or {})
        metadata[key] = body["value"]
        self._set_metadata(m, metadata)

    def delete_metadata(self, app: str, machine_id: str, key: str, nonce: str | None) -> None:
        m = self._mutable(app, machine_id, nonce)
        metadata = dict(m.config.get("metadata") or {})
        metadata.pop(key, None)
        self._set_metadata(m, metadata)

    def _set_metadata(self, m: Machine, metadata: dict[str, str]) -> None:
        # Metadata edits need no new version (Fly keeps them outside the versioned config).
        m.config = {**m.config, "metadata": metadata}
        self._touch(m)

    def processes(self, app: str, machine_id: str) -> list[dict[str, Any]]:
        """``ps`` inside the machine: the main process and everything in its process group."""
        m = self.machine(app, machine_id)
        if m.process is None or not m.process.running:
            return []
        return [stat for stat in _group_stats(m.process.pid)]

    def memory(self, app: str, machine_id: str) -> dict[str, int]:
        m = self.machine(app, machine_id)
        guest = m.config.get("guest") or {}
        memory_mb = guest.get("memory_mb") if isinstance(guest, dict) else None
        total = memory_mb if isinstance(memory_mb, int) else 256
        limit = m.memory_limit_mb if m.memory_limit_mb is not None else total
        return {"available_mb": total, "limit_mb": limit}

    def set_memory(self, app: str, machine_id: str, limit_mb: Any, nonce: str | None) -> dict[str, int]:
        m = self._mutable(app, machine_id, nonce)
        if isinstance(limit_mb, bool) or not isinstance(limit_mb, int) or limit_mb <= 0:
            raise invalid("limit_mb must be a positive integer")
        m.memory_limit_mb = limit_mb
        return self.memory(app, machine_id)

    # -- admin ---------------------------------------------------------------------------------

    def admin_machine(self, machine_id: str) -> Machine:
        m = self.machines.get(machine_id)
        if m is None:
            raise not_found()
        return m

    def admin_view(self, m: Machine) -> dict[str, Any]:
        return {
            "id": m.id,
            "app": m.app,
            "name": m.name,
            "state": m.state,
            "version": m.version,
            "pid": m.process.pid if m.process is not None else None,
            # Each machine leads its own session, so its process group id is its pid.
            "pgid": m.process.pid if m.process is not None else None,
            "frozen": m.frozen,
            "hung": m.hung,
            "restart_count": m.restart_count,
            "workdir": str(self.work_root / m.workdir_name),
            "log_path": str(self.work_root / m.workdir_name / "machine.log"),
        }

    def crash(self, machine_id: str) -> None:
        """SIGKILL the machine's processes, as a crash would: the restart policy applies."""
        m = self.admin_machine(machine_id)
        if m.process is None:
            raise unable("crash")
        m.process.kill_group(signal.SIGKILL)

    async def hang(self, machine_id: str, hung: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the machine's processes while Fly still reports ``started``."""
        m = self.admin_machine(machine_id)
        if m.process is None:
            raise unable("hang")
        m.process.kill_group(signal.SIGSTOP if hung else signal.SIGCONT)
        # Not ``frozen``: Fly does not know, so a stop still sends its signal and waits the timeout.
        m.hung = hung
        await m.process.settle_stop(hung)

    def read_log(self, machine_id: str, tail: int) -> bytes:
        m = self.admin_machine(machine_id)
        path = self.work_root / m.workdir_name / "machine.log"
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - tail))
                return fh.read()
        except FileNotFoundError:
            return b""

    def set_faults(self, faults: FaultSettings) -> None:
        self.faults.replace(faults)

    async def reset(self) -> None:
        """Forget every machine (killing their processes) and reset stats, faults and secrets."""
        await self._kill_everything()
        self.machines.clear()
        self.volumes.clear()
        self.apps.clear()
        self.stats.reset()
        self.faults.replace(self.settings.faults.model_copy())
        self.secrets = {app: dict(v) for app, v in self.settings.secrets.items()}

    # -- shutdown ------------------------------------------------------------------------------

    async def _kill_everything(self) -> None:
        for m in self.machines.values():
            self._cancel_operation(m)
        if self._spawning:
            await asyncio.gather(*list(self._spawning), return_exceptions=True)
        processes = list(self._processes)
        for process in processes:
            process.expected_exit = True
            process.kill_group(signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await asyncio.wait_for(process.proc.wait(), 5.0)
            self._processes.discard(process)
        for m in self.machines.values():
            m.process = None
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Kill every process the emulator started (whole process groups) and wait for them."""
        if self._closed:
            return
        self._closed = True
        await self._kill_everything()
        if self._owns_root:
            shutil.rmtree(self.work_root, ignore_errors=True)
        log.info("emulator_closed")

    def close(self) -> None:
        """Synchronous last resort (atexit, signal handlers): SIGKILL every process group now."""
        self._closed = True
        for process in list(self._processes):
            process.expected_exit = True
            process.kill_group(signal.SIGKILL)

    @property
    def pids(self) -> list[int]:
        """Pids of the main processes currently alive (for tests and the admin endpoint)."""
        return [p.pid for p in self._processes if p.running]


def _group_stats(pgid: int) -> list[dict[str, Any]]:
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
    ticks = os.sysconf("SC_CLK_TCK")
    stats: list[dict[str, Any]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cwd = os.readlink(entry / "cwd")
            rss_pages = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        utime, stime = int(fields[11]), int(fields[12])
        stats.append(
            {
                "pid": int(entry.name),
                "command": cmdline,
                "directory": cwd,
                "cpu": 0,
                "rss": rss_pages * page_kb * 1024,
                "rtime": (utime + stime) * 1000 // ticks,
                "stime": stime * 1000 // ticks,
                "listen_sockets": [],
            }
        )
    return sorted(stats, key=lambda s: int(s["pid"]))


def _encode_cursor(machine_id: str) -> str:
    return f"c1.{machine_id}"


def _decode_cursor(cursor: str) -> str:
    if not cursor.startswith("c1."):
        raise invalid("invalid cursor")
    return cursor[3:]
