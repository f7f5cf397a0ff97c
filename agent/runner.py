"""The agent process: start-up checks, the run, signals, the final report, the exit code.

``python -m agent`` (and ``flyswarm agent``) call :func:`main`. The order of things:

0. A pool machine's agent (``FLYSWARM_POOL_TOKEN``, no session token) first waits parked for a
   claim (:mod:`agent.pool_wait`), then takes on the session's env and token and goes on from 1.
1. Read the environment (:class:`agent.settings.AgentSettings`) and scrub the secrets out of it.
   Invalid configuration: one ``agent_config_invalid`` log line, exit 2.
   Before that, :func:`agent.token_handoff.hand_off` re-executes the process so that its
   environment (``/proc/<pid>/environ``) no longer holds the session token.
2. Load the session from the control plane (:class:`agent.channel.AgentChannel`, retrying an
   unreachable one, or a refused token - the controller may not have stored it yet - for the
   start-up window). Deleted session or invalid spec: one ``session_not_found`` /
   ``session_spec_invalid`` log line, exit 3 (an invalid spec is also reported as
   ``error``/``SpecInvalid``). Unreachable, or the token still refused: exit 4.
3. Report ``running`` with the machine id, start the heartbeat and the event publisher, emit
   ``agent_started``. Only then import the SDK (1-2 s) in a thread: heartbeats already flow.
4. Run the task or the chat (:mod:`agent.task`, :mod:`agent.chat`) inside a cancel scope.
5. Report the outcome - retried until the control plane stores it, through outages and restarts, unless a
   signal says to stop -, beat a last time, flush the events, exit (0 done, 1 error, 128+signal
   when a signal interrupted work, 0 when a signal stopped an idle chat).

SIGTERM/SIGINT: the report is locked to ``interrupted`` at once (so it is stored whatever happens
next), a chat turn in flight is interrupted through the SDK and given a moment to end (its
transcript is flushed; the message stays unacknowledged and is replayed), then the run is
cancelled (the SDK terminates the CLI), and the events are flushed. A watchdog thread ends the
process at the stop timeout whatever state it is in. A second signal cancels at once.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from pydantic import ValidationError

from agent import token_handoff
from agent.channel import AgentChannel
from agent.children import signal_children
from agent.diagnostics import CliDiagnostics
from agent.files import serve_files
from agent.heartbeat import Heartbeat
from agent.outcome import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_SESSION,
    EXIT_SIGNAL_BASE,
    EXIT_UNREACHABLE,
    Outcome,
)
from agent.publisher import EventPublisher
from agent.reporter import Reporter
from agent.settings import AgentSettings, scrub_environment
from agent.workspace import finish_step, for_session, prepare_step
from api.logs import configure_logging, get_logger, register_secret
from api.models import AgentReport, Session
from api.store_errors import StoreAuthFailed, StorePermissionDenied, StoreUnavailable

if TYPE_CHECKING:
    from agent.context import AgentContext

log = get_logger("agent")


async def load_session(store: AgentChannel, settings: AgentSettings) -> Session | int:
    """The session to run, or the exit code that refuses to run it."""
    deadline = time.monotonic() + settings.startup_timeout_seconds
    delay = 0.2
    while True:
        try:
            session = await store.get(settings.session_id)
            break
        except ValueError as exc:  # pydantic ValidationError, broken JSON
            log.error("session_spec_invalid", error=str(exc)[:2000])
            report = AgentReport(
                state="error", machineId=settings.machine_id, reason="SpecInvalid", message=str(exc)[:1000]
            )
            try:
                await store.write_agent_report(settings.session_id, report)
            except StoreUnavailable:
                pass
            return EXIT_SESSION
        except StoreAuthFailed:
            # A token refused is retried for the start-up window like an unreachable control plane.
            if time.monotonic() >= deadline:
                log.error("session_token_refused")
                return EXIT_UNREACHABLE
            log.warning("session_token_refused_retrying", retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        except StorePermissionDenied:
            # A valid token of another session: this machine was handed the wrong one.
            log.error("session_token_of_another_session")
            return EXIT_UNREACHABLE
        except StoreUnavailable:
            if time.monotonic() >= deadline:
                log.error("control_plane_unreachable", waited_seconds=settings.startup_timeout_seconds)
                return EXIT_UNREACHABLE
            log.warning("control_plane_unavailable_retrying", retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        except Exception as exc:  # a refused request: a bug on one side
            log.error("control_plane_error", error_type=type(exc).__name__, error=str(exc)[:300])
            return EXIT_UNREACHABLE
    if session is None:
        log.error("session_not_found")
        return EXIT_SESSION
    return session


class AgentProcess:
    """One run of the agent for one session."""

    def __init__(self, settings: AgentSettings, store: AgentChannel, session: Session) -> None:
        self.settings = settings
        self.store = store
        self.session = session
        previous = session.agent or AgentReport()
        self.previous = previous
        #: Set when the machine is told to stop (a signal): durable writes stop retrying forever.
        self.give_up = asyncio.Event()
        self.reporter = Reporter(store, session.id, previous, give_up=self.give_up)
        self.publisher = EventPublisher(store, session.id)
        self.heartbeat = Heartbeat(
            store,
            session.id,
            settings.machine_id,
            interval=settings.heartbeat_interval_seconds,
            ttl=settings.heartbeat_ttl_seconds,
            state=lambda: self.reporter.state,
        )
        self.ctx: AgentContext | None = None
        self.scope: anyio.CancelScope | None = None
        self.stopping = asyncio.Event()
        self.stop_signal: signal.Signals | None = None
        self.work_was_interrupted = False
        self.finishing = False
        self._stop_task: asyncio.Task[None] | None = None
        self._files_task: asyncio.Task[None] | None = None
        self._watchdog: threading.Timer | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def _prepare_dirs(self) -> Path | None:
        for path in (self.settings.work_dir, self.settings.home_dir, self.settings.config_dir):
            path.mkdir(parents=True, exist_ok=True)
        # The CLI logs an error on every start when its config file is missing; an empty one is valid.
        config_file = self.settings.config_dir / ".claude.json"
        if not config_file.exists():
            config_file.write_text("{}\n")
        return self.settings.session_dir / "cli-debug.log" if self.settings.cli_debug_log else None

    def _emit(self, type_: str, message: str | None = None, **data: Any) -> None:
        self.publisher.emit_lifecycle(type_, message, **data)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        chat = self.session.spec.mode == "chat"
        self.publisher.start()
        # Beat before the first report: the report wakes the controller, which should then find a
        # live heartbeat and show Running at once instead of waiting for its next resync.
        await self.heartbeat.beat()
        await self.reporter.update(
            state="running",
            machineId=self.settings.machine_id,
            reason=None,
            message=None,
            stderrTail=None,
            turns=self.previous.turns if chat else 0,
            resultText=self.previous.resultText if chat else None,
        )
        self.heartbeat.start()
        # Live-file requests are answered by a task of their own: during turns too.
        self._files_task = asyncio.create_task(
            serve_files(self.store, self.settings.work_dir, log, wait_ms=self.settings.inbox_block_ms),
            name="agent-files",
        )
        self._emit(
            "agent_started",
            self.session.spec.mode,
            machineId=self.settings.machine_id,
            mode=self.session.spec.mode,
            pid=os.getpid(),
            resumeFrom=self.previous.claudeSessionId if chat else None,
        )
        log.info("agent_started", mode=self.session.spec.mode)
        try:
            outcome = await self._run_mode(chat)
        except Exception as exc:
            log.exception("agent_failed")
            outcome = Outcome.error("AgentError", f"{type(exc).__name__}: {exc}"[:500])
        return await self._finish(outcome)

    async def _run_mode(self, chat: bool) -> Outcome | None:
        debug_log = self._prepare_dirs()
        workspace = for_session(self.session, self.settings)
        # The workspace's git processes run while the SDK is imported (both wait on something else).
        preparing = asyncio.create_task(prepare_step(workspace, self._emit)) if workspace else None
        try:
            # The SDK import takes 1-2 s; off the loop, so heartbeats and signals are served meanwhile.
            context_mod = await asyncio.to_thread(importlib.import_module, "agent.context")
            mode_mod = await asyncio.to_thread(
                importlib.import_module, "agent.chat" if chat else "agent.task"
            )
            failed = await preparing if preparing is not None else None
        finally:
            if preparing is not None:
                preparing.cancel()
        if failed is not None:
            return failed  # a model run on a missing tree would be worth nothing
        from claude_agent_sdk import fold_session_summary

        diagnostics = CliDiagnostics(
            lines=self.settings.stderr_tail_lines, chars=self.settings.stderr_tail_chars, debug_log=debug_log
        )
        diagnostics.reset_debug_log()
        ctx: AgentContext = context_mod.AgentContext(
            settings=self.settings,
            store=self.store,
            session=self.session,
            reporter=self.reporter,
            publisher=self.publisher,
            heartbeat=self.heartbeat,
            transcripts=self.store.transcripts(self.session.id, fold=fold_session_summary),
            diagnostics=diagnostics,
            log=log,
            base_cost=self.previous.costUsd or 0.0,
            stopping=self.stopping,
        )
        self.ctx = ctx
        if self.stopping.is_set():
            return None
        with anyio.CancelScope() as scope:
            self.scope = scope
            result: Outcome = await (mode_mod.run_chat(ctx) if chat else mode_mod.run_task(ctx))
            if workspace is not None and not chat and not self.stopping.is_set():
                result = await finish_step(workspace, ctx, result)
            return result
        return None  # cancelled by a signal

    def _interrupted_outcome(self) -> Outcome:
        name = self.stop_signal.name if self.stop_signal else "signal"
        if self.work_was_interrupted:
            code = EXIT_SIGNAL_BASE + int(self.stop_signal or signal.SIGTERM)
            return Outcome("interrupted", "Signal", f"interrupted by {name} during a turn", code)
        return Outcome("interrupted", "Signal", f"stopped by {name} while idle", EXIT_OK)

    async def _finish(self, outcome: Outcome | None) -> int:
        self.finishing = True
        if self._files_task is not None:
            self._files_task.cancel()
        if self.stopping.is_set():
            # Whatever the run ended with, a signal stopped it (stopping the CLI can look like a crash).
            outcome = self._interrupted_outcome()
        elif outcome is None:
            outcome = Outcome.error("AgentError", "the run ended without an outcome")
        ctx = self.ctx
        fields: dict[str, Any] = {
            "state": outcome.state,
            "reason": outcome.reason,
            "message": outcome.message,
        }
        if ctx is not None:
            fields["costUsd"] = ctx.total_cost
            if outcome.state == "error":
                fields["stderrTail"] = ctx.diagnostics.tail()
        self._emit(
            "agent_finished",
            outcome.state,
            state=outcome.state,
            reason=outcome.reason,
            exitCode=outcome.exit_code,
            costUsd=fields.get("costUsd"),
        )
        log.info("agent_finished", state=outcome.state, reason=outcome.reason, exit_code=outcome.exit_code)
        # Events first: once the final report is stored the controller may finish the session and
        # revoke its token, after which the control plane refuses this agent's writes.
        await self.publisher.flush(timeout=max(0.5, self.settings.stop_timeout_seconds * 0.1))
        await self.publisher.stop()
        # Retried until stored (heartbeats keep flowing meanwhile): a result lost here would be
        # computed again by the next machine.
        await self.reporter.update(durable=True, **fields)
        await self.heartbeat.stop()
        await self.heartbeat.beat()
        return outcome.exit_code

    # -- signals ----------------------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        self.give_up.set()
        if self.finishing:
            # The outcome is already decided; its report may still be retrying against an
            # unreachable control plane: a few more attempts, and the stop timeout ends the process.
            log.info("signal_while_finishing", signal=sig.name)
            if self._watchdog is None:
                self._start_watchdog(EXIT_SIGNAL_BASE + int(sig))
            return
        if self.stopping.is_set():
            log.warning("second_signal_cancelling", signal=sig.name)
            if self.scope is not None:
                self.scope.cancel()
            return
        self.stopping.set()
        self.stop_signal = sig
        ctx = self.ctx
        self.work_was_interrupted = ctx is None or ctx.turn_in_flight or self.session.spec.mode == "task"
        log.info("agent_stopping", signal=sig.name, turn_in_flight=self.work_was_interrupted)
        self._start_watchdog(EXIT_SIGNAL_BASE + int(sig))
        self._stop_task = asyncio.create_task(self._stop(sig), name="agent-stop")

    def _start_watchdog(self, code: int) -> None:
        self._watchdog = threading.Timer(
            max(0.1, self.settings.stop_timeout_seconds - 0.2), self._force_exit, args=(code,)
        )
        self._watchdog.daemon = True
        self._watchdog.start()

    def _force_exit(self, code: int) -> None:
        log.error("stop_timeout_exceeded", exit_code=code)
        os._exit(code)

    async def _stop(self, sig: signal.Signals) -> None:
        budget = self.settings.stop_timeout_seconds
        started = time.monotonic()
        self.reporter.lock_state("interrupted")
        outcome = self._interrupted_outcome()
        # First make the report say so: whatever happens next, the controller knows.
        await self.reporter.update(reason="Signal", message=outcome.message)
        self.heartbeat.poke()
        self._emit("agent_stopping", sig.name, signal=sig.name, turnInFlight=self.work_was_interrupted)
        ctx = self.ctx
        if ctx is not None and ctx.client is not None and ctx.turn_in_flight:
            # Chat: let the CLI stop the turn itself (it ends the turn and flushes the transcript).
            with anyio.move_on_after(budget * 0.4 - (time.monotonic() - started)):
                await ctx.client.interrupt()
                await ctx.turn_idle.wait()
        if self.scope is not None:
            if ctx is None or ctx.turn_in_flight:
                # A CLI busy with a tool ignores stdin EOF for seconds: ask it to stop now.
                signal_children(signal.SIGTERM)
            # Whatever still runs when most of the budget is gone is killed.
            asyncio.get_running_loop().call_later(budget * 0.5, signal_children, signal.SIGKILL)
            self.scope.cancel()


async def amain(settings: AgentSettings) -> int:
    structlog.contextvars.bind_contextvars(session_id=settings.session_id, machine_id=settings.machine_id)
    store = AgentChannel(
        settings.control_url,
        settings.session_token.get_secret_value(),
        settings.session_id,
        timeout=settings.control_timeout_seconds,
    )
    try:
        loaded = await load_session(store, settings)
        if isinstance(loaded, int):
            return loaded
        if loaded.deleted:
            log.info("session_deleted_not_running")
            return EXIT_OK
        if loaded.spec.mode == "task" and loaded.agent is not None and loaded.agent.state == "done":
            log.info("task_already_done")
            return EXIT_OK
        return await AgentProcess(settings, store, loaded).run()
    finally:
        try:
            await store.close()
        except Exception:
            pass


def load_settings(token: str | None) -> AgentSettings | None:
    """Settings from the environment and the handed-over ``token``; logs ``agent_config_invalid`` and
    returns None when invalid."""
    try:
        settings = AgentSettings() if token is None else AgentSettings(session_token=token)
    except ValidationError as exc:
        configure_logging(os.environ.get("FLYSWARM_LOG_LEVEL", "info"))
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "env", "error": err["msg"]}
            for err in exc.errors()
        ]
        log.error("agent_config_invalid", errors=errors)
        return None
    configure_logging(settings.log_level)
    register_secret(settings.session_token.get_secret_value())
    scrub_environment()
    if os.geteuid() == 0 and os.environ.get("IS_SANDBOX") != "1":
        log.warning("running_as_root_without_is_sandbox")
    return settings


async def pool_then_session(pool_token: str) -> int:
    """A pool machine's agent: wait parked for a claim (:mod:`agent.pool_wait`), then run its session
    exactly as an agent started fresh with the session's env and token."""
    from agent import pool_wait

    configure_logging(os.environ.get("FLYSWARM_LOG_LEVEL", "info"))
    register_secret(pool_token)
    got = await pool_wait.claim(pool_token, warm=pool_wait.warm_imports)
    if isinstance(got, int):
        return got
    pool_wait.become(got)
    settings = load_settings(got.session_token)
    if settings is None:
        return EXIT_CONFIG
    return await amain(settings)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m agent`` and ``flyswarm agent`` (configured by environment only)."""
    del argv  # no options: a machine's agent is configured by its environment
    token_handoff.hand_off()  # returns once the environment holds no secret (after a re-exec)
    token = token_handoff.receive()
    pool_token = token_handoff.receive_pool_token()
    if token is None and pool_token is not None:
        code = asyncio.run(pool_then_session(pool_token))
    else:
        settings = load_settings(token)
        if settings is None:
            sys.exit(EXIT_CONFIG)
        code = asyncio.run(amain(settings))
    # Everything is reported, flushed and closed. Skip the interpreter's teardown of the SDK's
    # large module graph (~0.3 s): only the CLI could outlive us, and it is told to go first.
    signal_children(signal.SIGTERM)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
