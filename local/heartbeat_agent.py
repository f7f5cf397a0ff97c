"""A real, minimal agent that only heartbeats and reports: the workload of controller tests and benches.

It runs where ``python -m agent`` would run (a machine of the emulator, started through the image
map or ``init.exec``), reads the same environment the controller sets on every machine
(``FLYSWARM_SESSION_ID``, ``FLYSWARM_CONTROL_URL`` and ``FLYSWARM_SESSION_TOKEN``: the control
plane's gateway and the session's token, ``FLY_MACHINE_ID``, ``FLYSWARM_HEARTBEAT_INTERVAL_SECONDS``,
``FLYSWARM_HEARTBEAT_TTL_SECONDS``) and reaches its session's state only through the agent channel
(:class:`agent.channel.AgentChannel`), exactly as the real agent does: no Redis here either. It never
starts the Claude CLI, so a figure measured with it measures the *controller*, not the CLI.

What it does is scripted by the session itself, so a test drives it through the public surface:

* the prompt may carry ``finish-after=<seconds>`` and ``result=<done|error|crash|hang|exit:<code>>``:
  after that time the agent reports done (exit 0), reports an error (exit 1), exits 3 without a
  report (a crash), or stops heartbeating while the process lives on (a hang);
* every inbox message is a command with the same words (``done``, ``error``, ``crash``, ``hang``,
  ``exit:<code>``); any other text is a chat turn: acknowledged at once, the agent goes idle; when
  ``FLYSWARM_VOLUME_ROOT`` (else ``FLYSWARM_WORK_ROOT``) is set, the turn is also appended as
  ``<machine id> <text>`` to ``notes.txt`` in the session's work dir (``<root>/<session>/work``, as
  the real agent's cwd), so tests see which machines wrote into one persistent work dir;
* SIGTERM (a stop, a suspend, a destroy) writes an ``interrupted`` report and exits 0, as the real
  agent flushes and exits within the stop timeout.

Pool machines: started with ``FLYSWARM_POOL_TOKEN`` and no session, it waits parked exactly as the
real agent does (:mod:`agent.pool_wait`: booted mark, assignment long-poll that survives a suspend;
no SDK to warm up here), then takes on the assigned session's env and token and runs as above.

Run it as ``python -m local.heartbeat_agent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from agent import pool_wait, token_handoff
from agent.channel import AgentChannel
from api.models import AgentReport, AgentState, Reason, Session
from api.store_errors import StoreUnavailable

_DIRECTIVE_RE = re.compile(r"(finish-after|result)=(\S+)")
_COMMANDS = ("done", "error", "crash", "hang")
_DEFAULT_INTERVAL = 10.0
_DEFAULT_TTL = 30
_INBOX_BLOCK_MS = 200
_STARTUP_SECONDS = 10.0


@dataclass(frozen=True)
class Script:
    """What the prompt asks the agent to do: finish after ``finish_after`` seconds with ``result``."""

    finish_after: float | None = None
    result: str = "done"

    @classmethod
    def from_prompt(cls, prompt: str | None) -> Script:
        values = dict(_DIRECTIVE_RE.findall(prompt or ""))
        finish_after = float(values["finish-after"]) if "finish-after" in values else None
        return cls(finish_after=finish_after, result=values.get("result", "done"))


def is_command(text: str) -> bool:
    word = text.strip().lower()
    return word in _COMMANDS or word.startswith("exit:")


class HeartbeatAgent:
    """Heartbeats every ``interval`` seconds and follows its script and inbox until told to end."""

    def __init__(
        self, store: AgentChannel, session_id: str, machine_id: str | None, interval: float, ttl: int
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.machine_id = machine_id
        self.interval = interval
        self.ttl = ttl
        self.state: AgentState = "running"
        self.beating = True
        self.exit_code: int | None = None
        self.work_root: str | None = None
        self._stop = asyncio.Event()

    async def run(self, script: Script, mode: str) -> int:
        self.state = "running" if mode == "task" else "idle"
        await self._report(self.state)
        beater = asyncio.create_task(self._beat())
        inbox = asyncio.create_task(self._read_inbox())
        timer = asyncio.create_task(self._finish_later(script)) if script.finish_after is not None else None
        try:
            await self._stop.wait()
        finally:
            for task in (beater, inbox, timer):
                if task is not None:
                    task.cancel()
            await asyncio.gather(
                *(t for t in (beater, inbox, timer) if t is not None), return_exceptions=True
            )
        return self.exit_code if self.exit_code is not None else 0

    def terminate(self) -> None:
        """SIGTERM: report interrupted (done in :meth:`interrupted`) and exit 0."""
        self.exit_code = 0
        self._stop.set()

    async def interrupted(self) -> None:
        with contextlib.suppress(StoreUnavailable, OSError):
            await asyncio.wait_for(self._report("interrupted"), 2.0)

    async def _beat(self) -> None:
        while True:
            if self.beating:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.heartbeat(self.session_id, self.machine_id, self.ttl, self.state)
            await asyncio.sleep(self.interval)

    async def _finish_later(self, script: Script) -> None:
        assert script.finish_after is not None
        await asyncio.sleep(script.finish_after)
        await self.command(script.result)

    async def _read_inbox(self) -> None:
        while True:
            try:
                message = await self.store.inbox_next(self.session_id, block_ms=_INBOX_BLOCK_MS)
            except StoreUnavailable:
                await asyncio.sleep(self.interval)
                continue
            if message is None:
                continue
            await self.store.inbox_ack(self.session_id, message.id)
            if is_command(message.text):
                await self.command(message.text)
            else:
                # A chat turn: nothing to compute; the turn is over as soon as it is acknowledged.
                self.write_note(message.text)
                self.state = "idle"
                await self._report("idle")

    def write_note(self, text: str) -> None:
        if self.work_root is None:
            return
        work = Path(self.work_root) / self.session_id / "work"
        work.mkdir(parents=True, exist_ok=True)
        with (work / "notes.txt").open("a", encoding="utf-8") as fh:
            fh.write(f"{self.machine_id} {text.strip()}\n")

    async def command(self, text: str) -> None:
        word = text.strip().lower()
        if word == "done":
            self.state = "done"
            await self._report("done", result="finished by script")
            self.exit_code = 0
            self._stop.set()
        elif word == "error":
            self.state = "error"
            await self._report("error", reason=Reason.EXECUTION_ERROR, message="failed by script")
            self.exit_code = 1
            self._stop.set()
        elif word == "crash":
            self.exit_code = 3
            self._stop.set()
        elif word == "hang":
            # The process lives on but no heartbeat is written any more: a wedged agent.
            self.beating = False
        elif word.startswith("exit:"):
            self.exit_code = int(word.split(":", 1)[1])
            self._stop.set()

    async def _report(
        self,
        state: AgentState,
        *,
        result: str | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        report = AgentReport(
            state=state, machineId=self.machine_id, resultText=result, reason=reason, message=message
        )
        with contextlib.suppress(StoreUnavailable):
            # Heartbeat first: the report wakes the controller, which should find both.
            await self.store.heartbeat(self.session_id, self.machine_id, self.ttl, state)
            await self.store.write_agent_report(self.session_id, report)


async def _load(store: AgentChannel, session_id: str) -> Session | None:
    """The session, retrying an unavailable control plane for a start-up window (as the real agent)."""
    deadline = asyncio.get_running_loop().time() + _STARTUP_SECONDS
    while True:
        try:
            return await store.get(session_id)
        except StoreUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def amain(env: dict[str, str], token: str | None = None) -> int:
    session_id = env["FLYSWARM_SESSION_ID"]
    machine_id = env.get("FLYSWARM_MACHINE_ID") or env.get("FLY_MACHINE_ID")
    ttl = int(float(env.get("FLYSWARM_HEARTBEAT_TTL_SECONDS", _DEFAULT_TTL)))
    interval = float(env.get("FLYSWARM_HEARTBEAT_INTERVAL_SECONDS", min(_DEFAULT_INTERVAL, ttl / 3)))
    if token is None:
        token = token_handoff.receive() or env.get(token_handoff.TOKEN_ENV, "")
    store = AgentChannel(env["FLYSWARM_CONTROL_URL"], token, session_id)
    agent = HeartbeatAgent(store, session_id, machine_id, interval, ttl)
    agent.work_root = env.get("FLYSWARM_VOLUME_ROOT") or env.get("FLYSWARM_WORK_ROOT") or None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, agent.terminate)
    loop.add_signal_handler(signal.SIGINT, agent.terminate)
    try:
        session = await _load(store, session_id)
        if session is None:
            return 0  # the session is gone; the controller will destroy this machine
        code = await agent.run(Script.from_prompt(session.spec.prompt), session.spec.mode)
        if agent.state not in ("done", "error") and code == 0:
            await agent.interrupted()
        return code
    finally:
        with contextlib.suppress(Exception):
            await store.close()


async def pool_then_session(pool_token: str) -> int:
    """A pool machine: wait parked for a claim, then run the assigned session."""
    got = await pool_wait.claim(pool_token, warm=None)
    if isinstance(got, int):
        return got
    pool_wait.become(got)
    return await amain(dict(os.environ), got.session_token)


def main() -> None:
    # As the real agent does: re-execute without the token in the process environment first.
    token_handoff.hand_off([sys.executable, "-m", "local.heartbeat_agent"])
    token = token_handoff.receive()
    pool_token = token_handoff.receive_pool_token()
    if token is None and pool_token is not None:
        sys.exit(asyncio.run(pool_then_session(pool_token)))
    sys.exit(asyncio.run(amain(dict(os.environ), token)))


if __name__ == "__main__":
    main()
