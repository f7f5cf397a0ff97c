"""Pool waiting mode: an agent booted ahead of any session, parked until a claim hands it one.

A pool machine (see ``api/pool_models.py``) starts the agent with a pool slot token
(``FLYSWARM_POOL_TOKEN``, :mod:`api.pool_token`) and no session: nothing session-specific is in a
machine config that every reader of the Fly app can see. The agent then:

1. hands the slot token out of its environment (:mod:`agent.token_handoff`, as for a session token);
2. looks once for an assignment (a *stopped* pool machine started by a claim finds it at once and
   skips the rest);
3. imports everything a session's first turn needs (:func:`warm_imports`: the SDK, the task and
   chat loops, anyio's asyncio backend) - the cost a claim must not pay - and only then
4. reports ``booted`` (``POST /agent/v1/pool/booted``): the controller then suspends or stops it;
5. long-polls ``GET /agent/v1/pool/assignment``. A suspend freezes it mid-poll; on resume the poll
   reads the gateway's "look again" (204), or finds its connection cut by the suspend, or - a
   connection dead without a word - hears nothing: a resume detector (:class:`FreezeWatch`, a
   ticker that finds itself seconds late) abandons a request still silent a second after a resume.
   All three mean ask again at once. The gateway hands the assignment only to a fresh request (see
   :mod:`gateway.pool_routes`), and takes it once, revoking the slot token;
6. becomes the session: the assignment's env (the session id, the launch id, the spec's variables)
   goes into its environment for the CLI it starts, the session token into its settings, and it
   runs exactly as an agent started fresh with them (:func:`agent.runner.amain`).

A revoked slot token (the pool shrank, the machine is being replaced) ends the wait: exit 4, like a
refused session token. SIGTERM while waiting (a stopped pool machine) exits 0: nothing to report.

The slot token is spent by the claim. A claimed machine that boots again (a crash restart, a wake
from ``sleep: stop``, a resume that fell back to a cold boot) still has only the pool environment
in its config, so it would exit 4: before booting a claimed machine again, the controller must give
it a session machine's config (a Fly update with the session's env and a fresh session token, as
for a fresh machine), after which it is a session machine like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.outcome import EXIT_CONFIG, EXIT_UNREACHABLE
from agent.token_handoff import FORBIDDEN_ENV, POOL_TOKEN_ENV, POOL_TOKEN_FD_ENV
from api.logs import get_logger
from api.store_errors import StoreAuthFailed, StoreUnavailable

log = get_logger("agent.pool")
T = TypeVar("T")

PREFIX = "/agent/v1/pool"
#: What a session's first turn imports: imported while the machine is still unclaimed.
WARM_MODULES = (
    "claude_agent_sdk",
    "agent.context",
    "agent.task",
    "agent.chat",
    "anyio._backends._asyncio",
    "concurrent.futures.thread",  # asyncio.to_thread's pool: the runner's first import goes through it
)
# After a failed poll: at once first (a suspend cut the connection), then back off a little.
_RETRY_SECONDS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
# The resume detector: a tick that comes this much later than due means the process was frozen.
_TICK_SECONDS = 0.5
_FROZEN_SECONDS = 2.0
# After a resume, how long the poll in flight may still answer (the gateway's "look again" sitting
# in the socket) before its connection is taken for dead.
_RESUME_GRACE_SECONDS = 1.0
# Never taken from an assignment's env: the credentials the machine must not hold, and ours.
_NOT_FROM_ASSIGNMENT = frozenset(
    {*FORBIDDEN_ENV, POOL_TOKEN_ENV, POOL_TOKEN_FD_ENV, "FLYSWARM_SESSION_TOKEN", "FLYSWARM_SESSION_TOKEN_FD"}
)


class PoolWaitSettings(BaseSettings):
    """The environment of a waiting pool agent (the session's settings come with its assignment)."""

    model_config = SettingsConfigDict(env_prefix="FLYSWARM_", extra="ignore", use_attribute_docstrings=True)

    control_url: str
    """The gateway as this machine reaches it (``FLYSWARM_CONTROL_URL``)."""

    machine_id: str | None = Field(
        default=None, validation_alias=AliasChoices("FLYSWARM_MACHINE_ID", "FLY_MACHINE_ID")
    )
    """The Fly machine id, for the log."""

    pool_wait_ms: int = Field(default=1000, ge=100, le=30_000)
    """One assignment long-poll (``FLYSWARM_POOL_WAIT_MS``); the agent asks again at once after it.
    Short on purpose: only an agent between its booted mark and its suspend waits live (a parked
    one is frozen and asks nothing), and a parked agent's last poll then ends at the gateway a
    second after the suspend, so no request of a parked machine is held open (a gateway restart
    has nothing to wait for)."""

    control_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    """Timeout of one request to the control plane (a long-poll adds its wait)."""

    @field_validator("control_url")
    @classmethod
    def _control_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


@dataclass(frozen=True)
class Assignment:
    """The session a claim handed this machine. ``session_token`` is secret (``repr`` hides it)."""

    session_id: str
    session_token: str
    env: dict[str, str]

    def __repr__(self) -> str:
        return f"Assignment(session_id={self.session_id!r}, session_token='***', env=<{len(self.env)}>)"

    __str__ = __repr__


class PoolSlotChannel:
    """The two pool routes of the agent channel, with the slot token; errors as :class:`AgentChannel`'s."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"x-api-key": token},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            follow_redirects=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, PREFIX + path, **kwargs)
        except httpx.HTTPError as exc:  # connect errors, timeouts, a connection cut by a suspend
            raise StoreUnavailable(f"the control plane is unreachable ({type(exc).__name__})") from exc
        if response.status_code in (401, 403):
            raise StoreAuthFailed(f"the control plane refused the pool slot token ({response.status_code})")
        if response.status_code >= 300:
            raise StoreUnavailable(f"the control plane answered {response.status_code}")
        return response

    async def booted(self) -> None:
        await self._request("POST", "/booted")

    async def assignment(self, wait_ms: int) -> Assignment | None:
        """The slot's assignment (taken once), or None after up to ``wait_ms`` without one."""
        response = await self._request(
            "GET", "/assignment", params={"waitMs": wait_ms}, timeout=self.timeout + wait_ms / 1000
        )
        if response.status_code == 204:
            return None
        body = response.json()
        return Assignment(
            session_id=str(body["sessionId"]),
            session_token=str(body["sessionToken"]),
            env={str(k): str(v) for k, v in dict(body.get("env") or {}).items()},
        )


def warm_imports(modules: Iterable[str] = WARM_MODULES) -> tuple[float, int]:
    """Import ``modules`` now; the seconds it took and how many modules that loaded."""
    before, started = len(sys.modules), time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    return time.perf_counter() - started, len(sys.modules) - before


async def wait_for_assignment(
    channel: PoolSlotChannel, settings: PoolWaitSettings, *, warm: Callable[[], tuple[float, int]] | None
) -> Assignment | int:
    """Boot, report booted, wait; the assignment, or the exit code when the slot was revoked."""
    try:
        # A claimed *stopped* machine boots straight into its assignment: no warm-up, no booted mark.
        got = await channel.assignment(0)
        if got is not None:
            return got
    except StoreUnavailable:
        pass  # the wait below retries
    except StoreAuthFailed:
        log.error("pool_slot_revoked")
        return EXIT_UNREACHABLE
    if warm is not None:
        seconds, modules = warm()
        log.info("pool_agent_warmed", seconds=round(seconds, 3), modules=modules)
    # Started after the warm-up: the imports hold the loop for seconds, which is no freeze.
    watch = FreezeWatch()
    watch.start()
    try:
        if await _retrying(lambda: watch.guard(channel.booted())) is not None:
            return EXIT_UNREACHABLE
        log.info("pool_agent_booted")
        failures = 0
        while True:
            try:
                got = await watch.guard(channel.assignment(settings.pool_wait_ms))
            except StoreUnavailable as exc:
                # A suspend/resume cuts connections: ask again at once, then back off a little.
                log.info("pool_assignment_poll_failed", error=str(exc)[:200])
                await asyncio.sleep(_RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)])
                failures += 1
                continue
            except StoreAuthFailed:
                log.error("pool_slot_revoked")
                return EXIT_UNREACHABLE
            failures = 0
            if got is not None:
                return got
    finally:
        await watch.stop()


class FreezeWatch:
    """Notices a resume: a ticker that finds itself seconds late was frozen (a suspend).

    A connection a suspend cut may never say so (no reset reaches a frozen machine), so a request
    in flight across a resume that is still silent shortly after it is abandoned (:meth:`guard`),
    and the caller asks again at once on a new connection.
    """

    def __init__(self) -> None:
        self._resumed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick(), name="pool-freeze-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tick(self) -> None:
        while True:
            due_mono, due_wall = time.monotonic() + _TICK_SECONDS, time.time() + _TICK_SECONDS
            await asyncio.sleep(_TICK_SECONDS)
            # Either clock may be the one that jumps over a freeze (a VM snapshot vs a SIGSTOP).
            late = max(time.monotonic() - due_mono, time.time() - due_wall)
            if late > _FROZEN_SECONDS:
                log.info("pool_agent_resumed", frozen_seconds=round(late, 1))
                self._resumed.set()

    async def guard(self, request: Awaitable[T]) -> T:
        """``request``'s result; :class:`StoreUnavailable` if it is still silent a moment after a resume."""
        self._resumed.clear()
        call = asyncio.ensure_future(request)
        resumed = asyncio.ensure_future(self._resumed.wait())
        try:
            await asyncio.wait({call, resumed}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                # Frozen meanwhile: an answer already in the socket (the gateway's "look again")
                # still arrives; a dead connection gets a grace and is then given up.
                await asyncio.wait({call}, timeout=_RESUME_GRACE_SECONDS)
            if call.done():
                return call.result()
            raise StoreUnavailable("the request in flight did not survive the suspend")
        finally:
            resumed.cancel()
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, StoreUnavailable, StoreAuthFailed):
                    await call


async def _retrying(call: Callable[[], Awaitable[Any]]) -> int | None:
    """Run ``call`` until the control plane answers; an exit code if it refuses the slot token."""
    failures = 0
    while True:
        try:
            await call()
            return None
        except StoreUnavailable:
            await asyncio.sleep(_RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)])
            failures += 1
        except StoreAuthFailed:
            log.error("pool_slot_revoked")
            return EXIT_UNREACHABLE


def become(assignment: Assignment) -> None:
    """Take on the session's environment (its id, launch id and variables, for the CLI it starts)."""
    for name, value in assignment.env.items():
        if name not in _NOT_FROM_ASSIGNMENT:
            os.environ[name] = value


def exit_quietly_on_sigterm() -> None:
    """While waiting nothing is at stake: a stop of the pool machine just ends the process."""

    def stop(signum: int, frame: Any) -> None:
        log.info("pool_agent_stopped", signal=signal.Signals(signum).name)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def restore_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


async def claim(pool_token: str, *, warm: Callable[[], tuple[float, int]] | None) -> Assignment | int:
    """The whole wait, from the environment: the assignment, or an exit code (2 bad env, 4 revoked)."""
    from pydantic import ValidationError

    try:
        settings = PoolWaitSettings()  # from the environment
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "env", "error": e["msg"]} for e in exc.errors()
        ]
        log.error("agent_config_invalid", errors=errors)
        return EXIT_CONFIG
    exit_quietly_on_sigterm()
    channel = PoolSlotChannel(settings.control_url, pool_token, timeout=settings.control_timeout_seconds)
    try:
        got = await wait_for_assignment(channel, settings, warm=warm)
    finally:
        await channel.close()
    restore_signals()
    if isinstance(got, Assignment):
        log.info("pool_agent_assigned", session_id=got.session_id)
    return got
