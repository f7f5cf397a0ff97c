"""What one agent process knows while it runs: its settings, its session, and its writers.

:class:`AgentContext` is shared by the task and chat runners and by the signal handling in
:mod:`agent.runner`. It turns SDK messages into events and report updates (:meth:`observe`),
builds the SDK options from the spec (:meth:`options`), and keeps the cost and turn books:
``costUsd`` in a report is the session's total spend across every machine it ran on (the cost
already reported when this process started, plus what this process's CLI reports).
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, ResultMessage, SystemMessage

from agent.channel import AgentChannel
from agent.channel_transcripts import ChannelTranscripts
from agent.diagnostics import CliDiagnostics
from agent.events import translate
from agent.heartbeat import Heartbeat
from agent.publisher import EventPublisher
from agent.reporter import Reporter
from agent.settings import AgentSettings
from api.models import Session, SessionSpec

DEFAULT_SYSTEM_PROMPT: dict[str, str] = {"type": "preset", "preset": "claude_code"}


@dataclass
class AgentContext:
    settings: AgentSettings
    store: AgentChannel
    session: Session
    reporter: Reporter
    publisher: EventPublisher
    heartbeat: Heartbeat
    transcripts: ChannelTranscripts
    diagnostics: CliDiagnostics
    log: Any
    base_cost: float = 0.0
    process_cost: float = 0.0
    last_result: ResultMessage | None = None
    client: ClaudeSDKClient | None = None
    turn_in_flight: bool = False
    turn_idle: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    stop_signal: signal.Signals | None = None

    @property
    def spec(self) -> SessionSpec:
        return self.session.spec

    @property
    def session_id(self) -> str:
        return self.session.id

    @property
    def total_cost(self) -> float:
        return self.base_cost + self.process_cost

    def emit(self, type_: str, message: str | None = None, **data: Any) -> None:
        """A lifecycle event of the agent itself."""
        self.publisher.emit_lifecycle(type_, message, **data)

    async def observe(self, message: Any) -> None:
        """One SDK message: its events, and the report fields it changes."""
        for event in translate(message, self.settings.event_text_chars):
            self.publisher.emit(event)
        if isinstance(message, SystemMessage) and message.subtype == "init":
            claude_sid = (message.data or {}).get("session_id")
            if claude_sid and claude_sid != self.reporter.report.claudeSessionId:
                # Reported at once: a crash mid-turn must still leave the id to resume from.
                await self.reporter.update(claudeSessionId=claude_sid)
        elif isinstance(message, ResultMessage):
            self.last_result = message
            if message.total_cost_usd is not None:
                # The CLI reports the running total of its own process.
                self.process_cost = float(message.total_cost_usd)

    def remaining_budget(self) -> float | None:
        if self.spec.maxCostUsd is None:
            return None
        return self.spec.maxCostUsd - self.base_cost

    def options(self, *, resume: str | None = None) -> ClaudeAgentOptions:
        """SDK options from the spec: tools, limits, prompt, per-session dirs, no extra traffic."""
        spec, settings = self.spec, self.settings
        env = {
            "HOME": str(settings.home_dir),
            "CLAUDE_CONFIG_DIR": str(settings.config_dir),
            # The one switch that keeps the CLI to POST /v1/messages (no telemetry, no title query).
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "FLYSWARM_SESSION_ID": self.session_id,
            # The model is reached through the control plane's gateway with the session's token: the
            # only credential this machine has (the real key stays in the control plane).
            "ANTHROPIC_BASE_URL": settings.control_url,
            "ANTHROPIC_API_KEY": settings.session_token.get_secret_value(),
            # Lets the scripted model's crash scenario (and operators' tools) find the agent.
            "FLYSWARM_AGENT_PID": str(os.getpid()),
        }
        extra_args: dict[str, str | None] = {}
        if self.diagnostics.debug_log is not None:
            extra_args["debug-file"] = str(self.diagnostics.debug_log)
        budget = self.remaining_budget()
        return ClaudeAgentOptions(
            tools=list(spec.allowedTools),
            allowed_tools=list(spec.allowedTools),
            system_prompt=spec.systemPrompt if spec.systemPrompt else DEFAULT_SYSTEM_PROMPT,  # type: ignore[arg-type]
            permission_mode="bypassPermissions",
            max_turns=spec.maxTurns,
            max_budget_usd=budget,
            model=spec.model,
            cwd=str(settings.work_dir),
            env=env,
            stderr=self.diagnostics.on_stderr,
            session_store=self.transcripts,
            resume=resume,
            cli_path=settings.cli_path,
            extra_args=extra_args,
        )
