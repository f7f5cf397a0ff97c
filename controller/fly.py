"""The Fly Machines client: the only code in flyswarm that talks HTTP to Fly.

One ``httpx.AsyncClient`` per :class:`FlyClient`, shared by every call. The same code drives
``https://api.machines.dev`` and the local emulator; only ``FLY_API_HOSTNAME`` differs.

Every call goes through :meth:`FlyClient._call`, which

1. takes a token from a client-side bucket keyed by (action, machine-or-app) at Fly's published
   limits (every action 1 req/s burst 3, scoped per machine, or per app for ``create``;
   ``GET`` machine 5 req/s burst 10), so we wait for our turn instead of bouncing off a 429.
   ``list`` is not in Fly's table; we treat it as an ordinary per-app action (1/s burst 3),
   which one paginated list per reconcile pass never notices. Buckets run at ``rate_margin``
   (default 90 %) of Fly's rate, so jitter in arrival times cannot push us over;
2. sends the request with a timeout, bounded by the call's overall deadline;
3. maps error responses to the types in :mod:`controller.fly_errors`;
4. retries ``Transient`` errors (408, 429, 5xx, connection errors, timeouts) with jittered
   exponential backoff, honouring ``Retry-After``, until the deadline. Creates are never
   retried once the request may have reached Fly: a 408/5xx/timeout/reset after sending
   becomes :class:`AmbiguousCreate` and the caller must look the machine up by metadata.
   Creates *are* retried after a 429 or a connection error before sending (nothing happened).
   Other mutations are retried: a repeated destroy answers 404 (success), a repeated start or
   stop at worst answers 412, which the caller sees;
5. reports ``on_response(action, status, seconds)`` for metrics (``status`` is the HTTP code as a
   string, or ``"timeout"`` / ``"connection_error"``).

Requests follow shared/fly/openapi.json; tests validate every request the client can send
against it. Where Fly's own clients use forms the spec omits, we stay with the spec:

- destroy sends ``force`` (fly-go sends ``kill``, which the spec does not declare);
- leases send ``ttl`` in the JSON body (fly-go sends a ``ttl`` query parameter and no body);
- restart does not send ``force_stop`` (fly-go does; undeclared);
- ``fly-machine-lease-nonce`` is declared only on the lease endpoints, but Fly requires it on every
  mutation of a leased machine (flyctl PR #2014), so every mutation sends it when given one;
- wait sends several states as repeated ``state`` parameters (each one valid against the enum;
  the comma form the description also allows would not validate).

Several agent apps (``FlyClientConfig.apps``, see :mod:`controller.fly_apps`): ``list`` and
``create`` name their app and take that app's bucket; every other call goes to the app of its
machine, which the client remembers from creates and lists (and finds by asking each app once when
it has not seen the machine).

The token goes only into the ``Authorization`` header. It never appears in a log line, a repr
or an exception message (error texts are scrubbed of it before they are stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from api.logs import get_logger
from controller.backoff import exponential_delay
from controller.fly_errors import (
    AmbiguousCreate,
    FlyError,
    LeaseHeld,
    NotFound,
    RateLimited,
    Transient,
    WaitTimeout,
    error_for_status,
    parse_error_body,
)
from controller.fly_types import (
    CreateLeaseRequest,
    CreateMachineRequest,
    Lease,
    Machine,
    MachineConfig,
    MachineEvent,
    StopRequest,
    UpdateMachineRequest,
    UpdateMetadataRequest,
    UpsertMetadataKeyRequest,
    WaitResult,
    go_duration,
)
from controller.machine_state import WAITABLE
from controller.ratelimit import Clock, KeyedRateLimiter, Limit, Sleep

DEFAULT_BASE_URL = "https://api.machines.dev"
#: Fly's published limits (shared/reference/fly-machines-api.md §5).
FLY_ACTION_LIMIT = Limit(rate=1.0, burst=3)
FLY_GET_MACHINE_LIMIT = Limit(rate=5.0, burst=10)
#: flyctl's lease TTL: a crashed holder blocks others for at most this long.
DEFAULT_LEASE_TTL = 13
#: Fly's bounds for one ``wait`` request, in seconds.
WAIT_MIN_SECONDS = 1
WAIT_MAX_SECONDS = 60
#: Extra read time on top of a ``wait`` long-poll, so our HTTP timeout never fires first.
_WAIT_READ_MARGIN = 10.0
_LEASE_RELEASE_DEADLINE = 5.0
_MAX_PAGES = 10_000
_EVENTS_MAX = 50

OnResponse = Callable[[str, str, float], None]

_log = get_logger("controller.fly")


@dataclass(frozen=True)
class FlyClientConfig:
    """Everything the client needs; the controller's settings build one of these."""

    #: The app of machines whose app nothing else tells (the single-app setting; launch records
    #: written before apps were recorded); also the default of list and create.
    app_name: str
    api_token: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    #: Seconds to establish a connection.
    connect_timeout: float = 5.0
    #: Seconds to wait for a response to an ordinary (non long-poll) request.
    request_timeout: float = 30.0
    #: Default overall deadline of one client call: rate-limit waits, retries and backoff included.
    call_deadline: float = 30.0
    #: Client-side token buckets on/off (off only for tests that want to see Fly's 429s).
    rate_limits: bool = True
    #: Fraction of Fly's rate our buckets run at.
    rate_margin: float = 0.9
    backoff_base: float = 0.2
    backoff_max: float = 5.0
    #: Metrics hook: ``on_response(action, status, seconds)``; must not raise or block.
    on_response: OnResponse | None = field(default=None, compare=False)
    user_agent: str = "flyswarm"
    #: The agent apps creates are spread over (``controller.fly_apps``); empty means ``(app_name,)``.
    apps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.apps:
            object.__setattr__(self, "apps", (self.app_name,))

    @classmethod
    def from_env(
        cls, app_name: str, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> FlyClientConfig:
        """Base URL from ``FLY_API_HOSTNAME`` and token from ``FLY_API_TOKEN``."""
        env = os.environ if environ is None else environ
        base = normalize_base_url(env.get("FLY_API_HOSTNAME") or DEFAULT_BASE_URL)
        values: dict[str, Any] = {
            "app_name": app_name,
            "api_token": env.get("FLY_API_TOKEN", ""),
            "base_url": base,
        }
        values.update(overrides)
        return cls(**values)


def normalize_base_url(value: str) -> str:
    """``api.machines.dev`` → ``https://api.machines.dev``; loopback hosts default to http."""
    value = value.strip().rstrip("/")
    if "://" in value:
        return value
    host = value.split(":", 1)[0]
    scheme = "http" if host in ("localhost", "127.0.0.1", "::1", "[::1]", "_api.internal") else "https"
    return f"{scheme}://{value}"


@dataclass(frozen=True)
class _Op:
    """One kind of call: its metrics/log name, its rate-limit bucket, and what the bucket is per."""

    name: str
    bucket: str
    per_machine: bool = True


_LIST = _Op("list", "list", per_machine=False)
_CREATE = _Op("create", "create", per_machine=False)
_GET = _Op("get", "get")
_UPDATE = _Op("update", "update")
_START = _Op("start", "start")
_STOP = _Op("stop", "stop")
_SUSPEND = _Op("suspend", "suspend")
_RESTART = _Op("restart", "restart")
_DESTROY = _Op("destroy", "destroy")
_SIGNAL = _Op("signal", "signal")
_WAIT = _Op("wait", "wait")
_LEASE_ACQUIRE = _Op("lease_acquire", "lease")
_LEASE_REFRESH = _Op("lease_refresh", "lease")
_LEASE_RELEASE = _Op("lease_release", "lease_release")
_LEASE_GET = _Op("lease_get", "lease_get")
_EVENTS = _Op("events", "events")
_CORDON = _Op("cordon", "cordon")
_UNCORDON = _Op("uncordon", "uncordon")
_METADATA_GET = _Op("metadata_get", "metadata_get")
_METADATA_SET = _Op("metadata_set", "metadata_set")
_METADATA_DELETE = _Op("metadata_delete", "metadata_delete")
_METADATA_UPDATE = _Op("metadata_update", "metadata_update")


@dataclass(frozen=True)
class MachinePage:
    """One page of ``list``; ``next_cursor`` is None on the last page."""

    machines: list[Machine]
    next_cursor: str | None


class FlyClient:
    """Async client for the Fly Machines API of the agent apps.

    ``list_machines`` and ``create_machine`` take the ``app`` they address (default
    ``config.app_name``). Every call on one machine goes to the machine's own app: the client
    remembers the app of each machine it created or listed (:meth:`app_of`, :meth:`remember`);
    for a machine it has not seen (a controller that just started) it asks each known app once
    (:meth:`locate`), so a machine is never taken for gone because it was looked for in the wrong app.

    Use as ``async with FlyClient(config) as fly:`` or call :meth:`aclose`. ``transport`` lets
    tests run it in-process against the emulator (``httpx.ASGITransport``); ``clock``, ``sleep``
    and ``rng`` make timing deterministic in tests.
    """

    def __init__(
        self,
        config: FlyClientConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        #: machine id -> (its app, monotonic time we learnt it); and how many machines per app
        self._homes: dict[str, tuple[str, float]] = {}
        self._per_app: dict[str, int] = {}
        headers = {"User-Agent": config.user_agent}
        token = config.api_token
        if token:
            # Macaroon tokens from `fly tokens create` carry their own scheme ("FlyV1 fm2_...").
            headers["Authorization"] = token if token.startswith("FlyV1 ") else f"Bearer {token}"
        self._http = httpx.AsyncClient(
            base_url=normalize_base_url(config.base_url),
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(config.request_timeout, connect=config.connect_timeout),
        )
        self._limiter: KeyedRateLimiter | None = None
        if config.rate_limits:
            margin = config.rate_margin
            self._limiter = KeyedRateLimiter(
                {_GET.bucket: FLY_GET_MACHINE_LIMIT.scaled(margin)},
                FLY_ACTION_LIMIT.scaled(margin),
                clock=clock,
                sleep=sleep,
            )

    def set_app_share(self, share: float) -> None:
        """Run the per-app buckets (create, list) at ``share`` of Fly's rate.

        Fly limits creates and lists per app, not per caller: N controller replicas each take 1/N.
        Per-machine buckets stay whole - a machine belongs to one session, so to one replica.
        """
        if self._limiter is None:
            return
        limit = FLY_ACTION_LIMIT.scaled(self.config.rate_margin).shared(share)
        for op in (_LIST, _CREATE):
            self._limiter.set_limit(op.bucket, limit)

    def __repr__(self) -> str:
        return f"FlyClient(apps={self.config.apps!r}, base_url={self.config.base_url!r})"

    async def __aenter__(self) -> FlyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- machines ---------------------------------------------------------------------------

    async def list_machines(
        self,
        *,
        metadata: Mapping[str, str] | None = None,
        include_deleted: bool = False,
        include_leases: bool = False,
        summary: bool = False,
        region: str | None = None,
        states: Sequence[str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        deadline: float | None = None,
        app: str | None = None,
    ) -> MachinePage:
        """One page of machines of ``app``. ``metadata`` filters are AND-ed exact matches.

        Without ``limit`` Fly answers every machine at once and ``next_cursor`` is None.
        """
        app = app or self.config.app_name
        params: list[tuple[str, str]] = []
        if include_deleted:
            params.append(("include_deleted", "true"))
        if include_leases:
            params.append(("include_leases", "true"))
        if summary:
            params.append(("summary", "true"))
        if region:
            params.append(("region", region))
        if states:
            params.append(("state", ",".join(states)))
        for key, value in (metadata or {}).items():
            params.append((f"metadata.{key}", value))
        if limit is not None:
            if not 1 <= limit <= 1000:
                raise ValueError("limit must be between 1 and 1000")
            params.append(("limit", str(limit)))
        if cursor:
            if limit is None:
                raise ValueError("a cursor requires a limit")
            params.append(("cursor", cursor))
        response = await self._call(
            _LIST, "GET", self._machines_path(), params=params, deadline=deadline, app=app
        )
        body = _json(response, _LIST)
        machines = [Machine.model_validate(item) for item in body or []]
        for machine in machines:
            self.remember(machine.id, app)
        return MachinePage(machines, response.headers.get("fly-next-cursor") or None)

    async def iter_machines(
        self,
        *,
        metadata: Mapping[str, str] | None = None,
        include_deleted: bool = False,
        include_leases: bool = False,
        summary: bool = False,
        region: str | None = None,
        states: Sequence[str] | None = None,
        page_size: int = 100,
        deadline: float | None = None,
        on_page: Callable[[], object] | None = None,
        app: str | None = None,
    ) -> AsyncIterator[Machine]:
        """Every matching machine, following ``fly-next-cursor`` page by page.

        Pages may be short or even empty while more remain (Fly's ``limit`` is advisory), so
        only the absence of a cursor ends the walk. ``deadline`` applies to each page;
        ``on_page`` is called once per page fetched (the controller counts its list calls).
        """
        cursor: str | None = None
        seen_cursors: set[str] = set()
        for _ in range(_MAX_PAGES):
            page = await self.list_machines(
                metadata=metadata,
                include_deleted=include_deleted,
                include_leases=include_leases,
                summary=summary,
                region=region,
                states=states,
                limit=page_size,
                cursor=cursor,
                deadline=deadline,
                app=app,
            )
            if on_page is not None:
                on_page()
            for machine in page.machines:
                yield machine
            if page.next_cursor is None or page.next_cursor in seen_cursors:
                return
            seen_cursors.add(page.next_cursor)
            cursor = page.next_cursor
        raise FlyError(f"list did not end after {_MAX_PAGES} pages", action=_LIST.name)

    async def list_all_machines(
        self,
        *,
        metadata: Mapping[str, str] | None = None,
        include_deleted: bool = False,
        include_leases: bool = False,
        summary: bool = False,
        region: str | None = None,
        states: Sequence[str] | None = None,
        page_size: int = 100,
        deadline: float | None = None,
        app: str | None = None,
    ) -> list[Machine]:
        """:meth:`iter_machines` collected into a list (machines seen twice across pages kept once)."""
        found: dict[str, Machine] = {}
        async for machine in self.iter_machines(
            metadata=metadata,
            include_deleted=include_deleted,
            include_leases=include_leases,
            summary=summary,
            region=region,
            states=states,
            page_size=page_size,
            deadline=deadline,
            app=app,
        ):
            found[machine.id] = machine
        return list(found.values())

    async def create_machine(
        self,
        config: MachineConfig,
        *,
        name: str | None = None,
        region: str | None = None,
        skip_launch: bool | None = None,
        skip_service_registration: bool | None = None,
        lease_ttl: int | None = None,
        deadline: float | None = None,
        app: str | None = None,
    ) -> Machine:
        """Create a machine in ``app``. NOT idempotent: see :class:`AmbiguousCreate`.

        With ``lease_ttl`` the machine comes back leased to us and ``Machine.nonce`` is set.
        """
        app = app or self.config.app_name
        request = CreateMachineRequest(
            config=config,
            name=name,
            region=region,
            skip_launch=skip_launch,
            skip_service_registration=skip_service_registration,
            lease_ttl=lease_ttl,
        )
        response = await self._call(
            _CREATE,
            "POST",
            self._machines_path(),
            json=request.to_api(),
            deadline=deadline,
            create_metadata=dict(config.metadata or {}),
            app=app,
        )
        machine = Machine.model_validate(
            _json(response, _CREATE, create_metadata=dict(config.metadata or {}))
        )
        self.remember(machine.id, app)
        return machine

    async def get_machine(
        self,
        machine_id: str,
        *,
        version: str | None = None,
        include_leases: bool = False,
        deadline: float | None = None,
    ) -> Machine:
        params: list[tuple[str, str]] = []
        if version:
            params.append(("version", version))
        if include_leases:
            params.append(("include_leases", "true"))
        response = await self._call(
            _GET,
            "GET",
            self._machine_path(machine_id),
            machine_id=machine_id,
            params=params,
            deadline=deadline,
        )
        return Machine.model_validate(_json(response, _GET, machine_id=machine_id))

    async def update_machine(
        self,
        machine_id: str,
        config: MachineConfig,
        *,
        current_version: str | None = None,
        skip_launch: bool | None = None,
        region: str | None = None,
        name: str | None = None,
        nonce: str | None = None,
        deadline: float | None = None,
    ) -> Machine:
        """Replace the machine's config (a full config, not a patch).

        ``current_version`` makes it conditional: a stale version raises ``Conflict``.
        """
        request = UpdateMachineRequest(
            config=config, current_version=current_version, skip_launch=skip_launch, region=region, name=name
        )
        response = await self._call(
            _UPDATE,
            "POST",
            self._machine_path(machine_id),
            machine_id=machine_id,
            json=request.to_api(),
            nonce=nonce,
            deadline=deadline,
        )
        return Machine.model_validate(_json(response, _UPDATE, machine_id=machine_id))

    async def _post_verb(
        self, action: _Op, machine_id: str, verb: str, *, nonce: str | None, deadline: float | None
    ) -> None:
        """``POST /machines/{id}/{verb}`` with no body: start, suspend, cordon, uncordon."""
        await self._call(
            action,
            "POST",
            self._machine_path(machine_id, verb),
            machine_id=machine_id,
            nonce=nonce,
            deadline=deadline,
        )

    async def start_machine(
        self, machine_id: str, *, nonce: str | None = None, deadline: float | None = None
    ) -> None:
        await self._post_verb(_START, machine_id, "start", nonce=nonce, deadline=deadline)

    async def stop_machine(
        self,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout: float | None = None,
        nonce: str | None = None,
        deadline: float | None = None,
    ) -> None:
        """Stop: ``signal`` (default the config's ``stop_config``), SIGKILL after ``timeout`` seconds."""
        body = StopRequest(signal=signal, timeout=go_duration(timeout) if timeout is not None else None)
        await self._call(
            _STOP,
            "POST",
            self._machine_path(machine_id, "stop"),
            machine_id=machine_id,
            json=body.to_api(),
            nonce=nonce,
            deadline=deadline,
        )

    async def suspend_machine(
        self, machine_id: str, *, nonce: str | None = None, deadline: float | None = None
    ) -> None:
        await self._post_verb(_SUSPEND, machine_id, "suspend", nonce=nonce, deadline=deadline)

    async def restart_machine(
        self,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout: float | None = None,
        nonce: str | None = None,
        deadline: float | None = None,
    ) -> None:
        params: list[tuple[str, str]] = []
        if timeout is not None:
            params.append(("timeout", go_duration(timeout)))
        if signal:
            params.append(("signal", signal))
        await self._call(
            _RESTART,
            "POST",
            self._machine_path(machine_id, "restart"),
            machine_id=machine_id,
            params=params,
            nonce=nonce,
            deadline=deadline,
        )

    async def destroy_machine(
        self, machine_id: str, *, force: bool = False, nonce: str | None = None, deadline: float | None = None
    ) -> bool:
        """Destroy; True if this call destroyed it, False if it was already gone (404 is success).

        Without ``force`` Fly refuses a running machine (412 ``PreconditionFailed``).
        """
        params = [("force", "true")] if force else []
        try:
            await self._call(
                _DESTROY,
                "DELETE",
                self._machine_path(machine_id),
                machine_id=machine_id,
                params=params,
                nonce=nonce,
                deadline=deadline,
            )
        except NotFound:
            self._forget(machine_id)
            return False
        self._forget(machine_id)
        return True

    async def signal_machine(
        self, machine_id: str, signal: str, *, nonce: str | None = None, deadline: float | None = None
    ) -> None:
        await self._call(
            _SIGNAL,
            "POST",
            self._machine_path(machine_id, "signal"),
            machine_id=machine_id,
            json={"signal": signal},
            nonce=nonce,
            deadline=deadline,
        )

    async def wait_machine(
        self,
        machine_id: str,
        states: str | Sequence[str] = "started",
        *,
        version: str | None = None,
        from_event_id: str | None = None,
        timeout: float = 60.0,
        long_poll: int = WAIT_MAX_SECONDS,
    ) -> WaitResult:
        """Block until the machine reaches one of ``states`` or ``timeout`` seconds pass.

        Each request asks Fly to wait up to ``long_poll`` seconds (clamped to Fly's bounds, 1-60);
        a 408 (that wait expired) is followed by another request until the overall deadline,
        then :class:`WaitTimeout`. A 404 while
        waiting for ``destroyed`` counts as reached. Fly answers 400 to a wait for ``stopped``
        without ``version``, so that is refused here before any request: pass the version you stopped.
        """
        wanted = [states] if isinstance(states, str) else list(states)
        if not wanted or any(s not in WAITABLE for s in wanted):
            raise ValueError(f"wait states must be among {sorted(WAITABLE)}")
        if "stopped" in wanted and not version:
            raise ValueError("Fly requires the machine version to wait for stopped: pass version=")
        deadline_at = self._clock() + timeout
        while True:
            remaining = deadline_at - self._clock()
            if remaining <= 0:
                raise WaitTimeout(
                    f"machine did not reach {'|'.join(wanted)} within {timeout:g}s",
                    status=408,
                    action=_WAIT.name,
                    machine_id=machine_id,
                )
            per_request = max(WAIT_MIN_SECONDS, min(WAIT_MAX_SECONDS, long_poll, math.ceil(remaining)))
            params: list[tuple[str, str]] = [("state", s) for s in wanted]
            params.append(("timeout", str(per_request)))
            if version:
                params.append(("version", version))
            if from_event_id:
                params.append(("from_event_id", from_event_id))
            try:
                response = await self._call(
                    _WAIT,
                    "GET",
                    self._machine_path(machine_id, "wait"),
                    machine_id=machine_id,
                    params=params,
                    deadline=remaining + _WAIT_READ_MARGIN,
                    read_timeout=per_request + _WAIT_READ_MARGIN,
                    passthrough=frozenset({408}),
                )
            except NotFound:
                if "destroyed" in wanted:
                    return WaitResult(ok=True, state="destroyed")
                raise
            except Transient as err:
                if err.status == 408:
                    continue
                raise
            return WaitResult.model_validate(_json(response, _WAIT, machine_id=machine_id) or {})

    async def list_events(
        self, machine_id: str, *, limit: int | None = None, deadline: float | None = None
    ) -> list[MachineEvent]:
        """The machine's events, newest first as Fly returns them (``limit`` at most 50)."""
        params = [("limit", str(max(1, min(_EVENTS_MAX, limit))))] if limit is not None else []
        response = await self._call(
            _EVENTS,
            "GET",
            self._machine_path(machine_id, "events"),
            machine_id=machine_id,
            params=params,
            deadline=deadline,
        )
        return [MachineEvent.model_validate(e) for e in _json(response, _EVENTS, machine_id=machine_id) or []]

    async def cordon_machine(
        self, machine_id: str, *, nonce: str | None = None, deadline: float | None = None
    ) -> None:
        await self._post_verb(_CORDON, machine_id, "cordon", nonce=nonce, deadline=deadline)

    async def uncordon_machine(
        self, machine_id: str, *, nonce: str | None = None, deadline: float | None = None
    ) -> None:
        await self._post_verb(_UNCORDON, machine_id, "uncordon", nonce=nonce, deadline=deadline)

    # --- metadata ---------------------------------------------------------------------------

    async def get_metadata(self, machine_id: str, *, deadline: float | None = None) -> dict[str, str]:
        response = await self._call(
            _METADATA_GET,
            "GET",
            self._machine_path(machine_id, "metadata"),
            machine_id=machine_id,
            deadline=deadline,
        )
        body = _json(response, _METADATA_GET, machine_id=machine_id) or {}
        return {str(k): str(v) for k, v in body.items()}

    async def get_metadata_key(
        self, machine_id: str, key: str, *, deadline: float | None = None
    ) -> str | None:
        """The value of one key, or None when the key is absent (404)."""
        try:
            response = await self._call(
                _METADATA_GET,
                "GET",
                self._machine_path(machine_id, "metadata", key),
                machine_id=machine_id,
                deadline=deadline,
            )
        except NotFound:
            return None
        value = (_json(response, _METADATA_GET, machine_id=machine_id) or {}).get("value")
        return None if value is None else str(value)

    async def set_metadata(
        self,
        machine_id: str,
        key: str,
        value: str,
        *,
        nonce: str | None = None,
        deadline: float | None = None,
    ) -> None:
        await self._call(
            _METADATA_SET,
            "POST",
            self._machine_path(machine_id, "metadata", key),
            machine_id=machine_id,
            json=UpsertMetadataKeyRequest(value=value).to_api(),
            nonce=nonce,
            deadline=deadline,
        )

    async def delete_metadata(
        self, machine_id: str, key: str, *, nonce: str | None = None, deadline: float | None = None
    ) -> None:
        await self._call(
            _METADATA_DELETE,
            "DELETE",
            self._machine_path(machine_id, "metadata", key),
            machine_id=machine_id,
            nonce=nonce,
            deadline=deadline,
        )

    async def update_metadata(
        self,
        machine_id: str,
        changes: Mapping[str, str | None],
        *,
        machine_version: str | None = None,
        nonce: str | None = None,
        deadline: float | None = None,
    ) -> None:
        """Set several keys at once; a None value removes the key (sent as ``""``, which the spec
        allows, since the schema has no nullable strings). A stale ``machine_version`` raises
        ``PreconditionFailed``."""
        body = UpdateMetadataRequest(
            metadata={k: ("" if v is None else v) for k, v in changes.items()},
            machine_version=machine_version,
        )
        await self._call(
            _METADATA_UPDATE,
            "PATCH",
            self._machine_path(machine_id, "metadata"),
            machine_id=machine_id,
            json=body.to_api(),
            nonce=nonce,
            deadline=deadline,
        )

    # --- leases -----------------------------------------------------------------------------

    async def acquire_lease(
        self,
        machine_id: str,
        *,
        ttl: int = DEFAULT_LEASE_TTL,
        description: str | None = None,
        deadline: float | None = None,
    ) -> Lease:
        """Take the machine's lease; raises ``LeaseHeld`` when someone else holds it."""
        response = await self._call(
            _LEASE_ACQUIRE,
            "POST",
            self._machine_path(machine_id, "lease"),
            machine_id=machine_id,
            json=CreateLeaseRequest(ttl=ttl, description=description).to_api(),
            deadline=deadline,
        )
        return Lease.from_response(_json(response, _LEASE_ACQUIRE, machine_id=machine_id))

    async def refresh_lease(
        self, machine_id: str, nonce: str, *, ttl: int = DEFAULT_LEASE_TTL, deadline: float | None = None
    ) -> Lease:
        """Extend our lease by ``ttl`` seconds from now."""
        response = await self._call(
            _LEASE_REFRESH,
            "POST",
            self._machine_path(machine_id, "lease"),
            machine_id=machine_id,
            json=CreateLeaseRequest(ttl=ttl).to_api(),
            nonce=nonce,
            deadline=deadline,
        )
        return Lease.from_response(_json(response, _LEASE_REFRESH, machine_id=machine_id))

    async def release_lease(self, machine_id: str, nonce: str, *, deadline: float | None = None) -> None:
        """Give the lease back; a lease that already expired ("lease not found", 404) is fine."""
        try:
            await self._call(
                _LEASE_RELEASE,
                "DELETE",
                self._machine_path(machine_id, "lease"),
                machine_id=machine_id,
                nonce=nonce,
                deadline=deadline,
            )
        except NotFound:
            return
        except FlyError as err:
            if "lease not found" in err.message.lower():
                return
            raise

    async def get_lease(self, machine_id: str, *, deadline: float | None = None) -> Lease | None:
        """The current lease (owner, expiry, nonce), or None when the machine has none."""
        try:
            response = await self._call(
                _LEASE_GET,
                "GET",
                self._machine_path(machine_id, "lease"),
                machine_id=machine_id,
                deadline=deadline,
            )
        except NotFound:
            return None
        return Lease.from_response(_json(response, _LEASE_GET, machine_id=machine_id))

    @contextlib.asynccontextmanager
    async def lease(
        self, machine_id: str, *, ttl: int = DEFAULT_LEASE_TTL, description: str | None = None
    ) -> AsyncIterator[str]:
        """``async with fly.lease(machine_id) as nonce:`` hold the lease for the block.

        Refreshes in the background about every ``ttl/3`` seconds (flyctl's rhythm: two chances
        to refresh before expiry) and always releases on exit, even when the block fails or is
        cancelled. Pass the nonce to every mutation inside the block. If a refresh finds the
        lease gone, mutations with the nonce will answer ``LeaseHeld``; the block sees that.
        """
        acquired = await self.acquire_lease(machine_id, ttl=ttl, description=description)
        nonce = acquired.nonce
        if not nonce:
            raise FlyError("lease answer carried no nonce", action=_LEASE_ACQUIRE.name, machine_id=machine_id)
        keeper = asyncio.create_task(self._keep_lease(machine_id, nonce, ttl), name=f"fly-lease-{machine_id}")
        try:
            yield nonce
        finally:
            keeper.cancel()
            await asyncio.wait([keeper])
            # Shielded so that a second cancellation does not abandon the release half-way.
            await asyncio.shield(self._release_quietly(machine_id, nonce))

    async def _keep_lease(self, machine_id: str, nonce: str, ttl: int) -> None:
        while True:
            await self._sleep(max(0.5, ttl / 3) * self._rng.uniform(0.9, 1.0))
            try:
                await self.refresh_lease(machine_id, nonce, ttl=ttl, deadline=max(1.0, ttl / 3))
            except (LeaseHeld, NotFound) as err:
                _log.warning("fly_lease_lost", machine_id=machine_id, error=str(err))
                return
            except FlyError as err:
                _log.warning("fly_lease_refresh_failed", machine_id=machine_id, error=str(err))

    async def _release_quietly(self, machine_id: str, nonce: str) -> None:
        try:
            await self.release_lease(machine_id, nonce, deadline=_LEASE_RELEASE_DEADLINE)
        except FlyError as err:
            # The lease expires on its own within ttl; nothing else to do.
            _log.warning("fly_lease_release_failed", machine_id=machine_id, error=str(err))

    # --- which app a machine lives in ------------------------------------------------------

    def remember(self, machine_id: str, app: str) -> None:
        """``machine_id`` lives in ``app`` (seen in its list, created there, or read from a launch record)."""
        before = self._homes.get(machine_id)
        self._homes[machine_id] = (app, self._clock())
        if before is None or before[0] != app:
            if before is not None:
                self._per_app[before[0]] -= 1
            self._per_app[app] = self._per_app.get(app, 0) + 1

    def _forget(self, machine_id: str) -> None:
        before = self._homes.pop(machine_id, None)
        if before is not None:
            self._per_app[before[0]] -= 1

    def app_of(self, machine_id: str) -> str | None:
        """The app we know ``machine_id`` lives in, or None."""
        home = self._homes.get(machine_id)
        return home[0] if home is not None else None

    def machine_counts(self) -> dict[str, int]:
        """How many machines we know per app (the spreading's load figure)."""
        return {**dict.fromkeys(self.config.apps, 0), **self._per_app}

    def retain_listed(self, app: str, machine_ids: Iterable[str], listed_from: float) -> None:
        """A whole list of ``app`` (started at monotonic ``listed_from``) showed ``machine_ids``:
        forget the other machines of that app learnt before the list began (destroyed by others)."""
        keep = set(machine_ids)
        stale = [
            mid
            for mid, (home, learnt) in self._homes.items()
            if home == app and mid not in keep and learnt < listed_from
        ]
        for mid in stale:
            self._forget(mid)

    def known_apps(self) -> tuple[str, ...]:
        """The configured apps, the default app, then any other app a machine was seen in."""
        apps = list(self.config.apps)
        for app in (self.config.app_name, *(app for app, count in self._per_app.items() if count > 0)):
            if app not in apps:
                apps.append(app)
        return tuple(apps)

    async def locate(self, machine_id: str, *, deadline: float | None = None) -> str | None:
        """Find the app of a machine we have not seen, by asking each known app (None: in none)."""
        for app in self.known_apps():
            try:
                await self._call(
                    _GET,
                    "GET",
                    self._machine_path(machine_id),
                    machine_id=machine_id,
                    deadline=deadline,
                    app=app,
                )
            except NotFound:
                continue
            self.remember(machine_id, app)
            return app
        return None

    async def _home_of(self, machine_id: str, deadline: float | None) -> str:
        home = self._homes.get(machine_id)
        if home is not None:
            return home[0]
        if len(self.known_apps()) == 1:
            return self.config.app_name
        # Not found anywhere: address the default app, whose 404 tells the caller it is gone.
        return await self.locate(machine_id, deadline=deadline) or self.config.app_name

    # --- the one request path ---------------------------------------------------------------

    @staticmethod
    def _machines_path() -> str:
        return "/machines"

    @staticmethod
    def _machine_path(machine_id: str, *rest: str) -> str:
        parts = [quote(machine_id, safe="")] + [quote(p, safe="") for p in rest]
        return "/machines/" + "/".join(parts)

    async def _call(
        self,
        op: _Op,
        method: str,
        path: str,
        *,
        machine_id: str | None = None,
        params: Iterable[tuple[str, str]] = (),
        json: Any = None,
        nonce: str | None = None,
        deadline: float | None = None,
        read_timeout: float | None = None,
        passthrough: frozenset[int] = frozenset(),
        create_metadata: dict[str, str] | None = None,
        app: str | None = None,
    ) -> httpx.Response:
        """Send one logical call: rate limit, timeouts, error mapping, bounded retries.

        ``path`` is relative to the app (``/machines...``). The app is ``app``, else the machine's
        own (:meth:`_home_of`), else ``config.app_name``.
        ``passthrough`` statuses are raised at once instead of retried (``wait`` handles its 408s).
        ``create_metadata`` marks a create: once it may have reached Fly it is never re-sent.
        """
        is_create = create_metadata is not None
        budget = self.config.call_deadline if deadline is None else deadline
        deadline_at = self._clock() + budget
        if app is None:
            app = await self._home_of(machine_id, budget) if machine_id else self.config.app_name
        path = f"/v1/apps/{quote(app, safe='')}{path}"
        # Creates and lists are limited per app, everything else per machine.
        scope = machine_id if op.per_machine and machine_id else app
        headers = {"fly-machine-lease-nonce": nonce} if nonce else {}
        query = httpx.QueryParams(list(params))
        attempt = 0
        err: FlyError
        while True:
            await self._take_token(op, scope, deadline_at, machine_id)
            remaining = max(0.1, deadline_at - self._clock())
            timeout = httpx.Timeout(
                min(read_timeout or self.config.request_timeout, remaining),
                connect=min(self.config.connect_timeout, remaining),
            )
            started = self._clock()
            try:
                response = await self._http.request(
                    method, path, params=query, json=json, headers=headers, timeout=timeout
                )
            except httpx.TransportError as exc:
                err = self._transport_error(op, exc, started, machine_id)
                sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
                if is_create and sent:
                    raise self._ambiguous(err, create_metadata) from exc
            else:
                self._report(op, str(response.status_code), started)
                if response.is_success:
                    return response
                err = self._response_error(op, response, machine_id)
                if response.status_code == 429:
                    _log.warning("fly_rate_limited", action=op.name, machine_id=machine_id)
                    if self._limiter is not None:
                        self._limiter.penalize(op.bucket, scope)
                if response.status_code in passthrough:
                    raise err
                if is_create and isinstance(err, Transient) and response.status_code != 429:
                    raise self._ambiguous(err, create_metadata)
            if not isinstance(err, Transient):
                raise err
            attempt += 1
            delay = backoff_delay(
                attempt, self.config.backoff_base, self.config.backoff_max, self._rng, err.retry_after
            )
            if self._clock() + delay >= deadline_at:
                raise err
            _log.info(
                "fly_call_retried",
                action=op.name,
                machine_id=machine_id,
                status=err.status,
                attempt=attempt,
                delay_seconds=round(delay, 3),
                error=err.message,
            )
            await self._sleep(delay)

    async def _take_token(self, op: _Op, scope: str, deadline_at: float, machine_id: str | None) -> None:
        if self._limiter is None:
            return
        waited = await self._limiter.acquire(op.bucket, scope, max_wait=max(0.0, deadline_at - self._clock()))
        if waited is None:
            raise RateLimited(
                "client-side rate limit: no token before the call's deadline",
                action=op.name,
                machine_id=machine_id,
            )

    def _report(self, op: _Op, status: str, started: float) -> None:
        hook = self.config.on_response
        if hook is None:
            return
        try:
            hook(op.name, status, max(0.0, self._clock() - started))
        except Exception as exc:  # a metrics bug must not break Fly calls
            _log.warning("fly_metrics_hook_failed", action=op.name, error=type(exc).__name__)

    def _scrub(self, text: str) -> str:
        token = self.config.api_token
        return text.replace(token, "***") if token else text

    def _response_error(self, op: _Op, response: httpx.Response, machine_id: str | None) -> FlyError:
        message, error_status = parse_error_body(response.text)
        return error_for_status(
            response.status_code,
            self._scrub(message),
            error_status=error_status,
            fly_request_id=response.headers.get("fly-request-id"),
            action=op.name,
            machine_id=machine_id,
            retry_after=retry_after_seconds(response.headers.get("retry-after")),
        )

    def _transport_error(
        self, op: _Op, exc: httpx.TransportError, started: float, machine_id: str | None
    ) -> Transient:
        timed_out = isinstance(exc, httpx.TimeoutException)
        self._report(op, "timeout" if timed_out else "connection_error", started)
        detail = self._scrub(str(exc)) or "no detail"
        return Transient(f"{type(exc).__name__}: {detail}", action=op.name, machine_id=machine_id)

    def _ambiguous(self, err: FlyError, metadata: dict[str, str] | None) -> AmbiguousCreate:
        return AmbiguousCreate(
            f"create may have happened ({err.message}); look the machine up by metadata before retrying",
            metadata=metadata,
            status=err.status,
            error_status=err.error_status,
            fly_request_id=err.fly_request_id,
            action=_CREATE.name,
        )


def _json(
    response: httpx.Response,
    op: _Op,
    *,
    machine_id: str | None = None,
    create_metadata: dict[str, str] | None = None,
) -> Any:
    """The decoded body; an undecodable success is Transient (or ambiguous, for a create)."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        message = f"undecodable {response.status_code} response body"
        if create_metadata is not None:
            raise AmbiguousCreate(message, metadata=create_metadata, status=response.status_code) from None
        raise Transient(message, status=response.status_code, action=op.name, machine_id=machine_id) from None


def backoff_delay(
    attempt: int, base: float, cap: float, rng: random.Random, retry_after: float | None = None
) -> float:
    """Seconds before retry number ``attempt`` (1-based): exponential, capped, jittered to 50-100 %.

    A ``Retry-After`` from the server is a floor: we never come back sooner than asked.
    """
    delay = exponential_delay(attempt, base=base, cap=cap, jitter=0.5, rng=rng)
    return max(delay, retry_after) if retry_after is not None else delay


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
