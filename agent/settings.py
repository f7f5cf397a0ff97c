"""The agent's configuration: environment variables only (the controller sets them on the machine).

Everything the agent needs to know about *what* to run comes from the session's spec, which it
reads from the control plane; the environment only says *which* session, where the control plane is
(``FLYSWARM_CONTROL_URL``: the gateway, for model traffic and the agent channel alike), and how the
agent paces itself. The one credential, the session's token, arrives as ``FLYSWARM_SESSION_TOKEN``
and never stays in the agent's environment (:mod:`agent.token_handoff`). No Redis address, no Redis
credential, no Anthropic key: the agent holds none.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.token_handoff import (
    FORBIDDEN_ENV,
    POOL_TOKEN_ENV,
    POOL_TOKEN_FD_ENV,
    TOKEN_ENV,
    TOKEN_FD_ENV,
    TOKEN_FILE_ENV,
)
from api.models import validate_session_id

# Variables the agent reads and then scrubs from its environment (children must not inherit them).
SECRET_ENV = (TOKEN_ENV, TOKEN_FD_ENV, TOKEN_FILE_ENV, POOL_TOKEN_ENV, POOL_TOKEN_FD_ENV)


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYSWARM_", extra="ignore", use_attribute_docstrings=True)

    session_id: str
    """The flyswarm session this machine runs (``FLYSWARM_SESSION_ID``)."""

    control_url: str
    """The control plane's gateway as this machine reaches it: the CLI's ``ANTHROPIC_BASE_URL`` and the
    agent channel (``/agent/v1``) for the session's state."""

    session_token: SecretStr
    """The session's token (``FLYSWARM_SESSION_TOKEN``), minted by the controller for this launch. The
    agent moves it out of its environment before anything else (see ``agent/token_handoff.py``)."""

    machine_id: str | None = Field(
        default=None, validation_alias=AliasChoices("FLYSWARM_MACHINE_ID", "FLY_MACHINE_ID")
    )
    """The Fly machine id (Fly sets ``FLY_MACHINE_ID``); reported and put in heartbeats."""

    heartbeat_interval_seconds: float = Field(default=10.0, gt=0)
    """How often the heartbeat is written."""

    heartbeat_ttl_seconds: int = Field(default=30, ge=1)
    """Heartbeat key TTL: the controller treats a missing heartbeat as a dead agent."""

    work_root: Path = Field(
        default=Path(tempfile.gettempdir()) / "flyswarm",
        validation_alias=AliasChoices("FLYSWARM_VOLUME_ROOT", "FLYSWARM_WORK_ROOT"),
    )
    """Per-session dirs live below: ``<root>/<session>/work`` (the cwd) and ``<root>/<session>/home``.
    Keep it the same on every machine of a deployment: the SDK keys transcripts by the cwd. A session
    with ``spec.persistence`` gets ``FLYSWARM_VOLUME_ROOT`` (its volume's mount) from the controller,
    which wins over a deployment-wide ``FLYSWARM_WORK_ROOT`` (an app secret would win over config)."""

    stderr_tail_lines: int = Field(default=40, ge=1, le=1000)
    """How many lines of the CLI's diagnostics (stderr and its debug log's errors) a report keeps."""

    stderr_tail_chars: int = Field(default=4000, ge=100, le=100_000)
    """Character cap of the stderr tail in a report."""

    event_text_chars: int = Field(default=2000, ge=50, le=100_000)
    """Texts (assistant text, tool input, tool output) are cut to this length in events."""

    stop_timeout_seconds: float = Field(default=5.0, gt=0.5)
    """After SIGTERM/SIGINT the agent exits within this time (match the machine's stop timeout)."""

    inbox_block_ms: int = Field(default=20_000, ge=10, le=30_000)
    """How long one long-poll (inbox, live-file requests) waits at the control plane before asking again."""

    control_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    """Timeout of one request to the control plane (a long-poll adds its wait); past it: retried."""

    startup_timeout_seconds: float = Field(default=30.0, ge=0)
    """How long start-up keeps retrying an unreachable control plane (or a refused token) before giving up."""

    cli_debug_log: bool = True
    """Run the CLI with ``--debug-file`` so errors it only logs there reach the stderr tail."""

    cli_path: str | None = None
    """A Claude Code CLI to use instead of the one bundled with the SDK."""

    log_level: str = "info"
    """Log level of the agent's structured log lines (JSON on stderr): debug, info, warning or error."""

    @field_validator("session_id")
    @classmethod
    def _session_id(cls, value: str) -> str:
        return validate_session_id(value)

    @model_validator(mode="after")
    def _heartbeat_fits_ttl(self) -> AgentSettings:
        if self.heartbeat_interval_seconds >= self.heartbeat_ttl_seconds:
            raise ValueError("heartbeat_interval_seconds must be shorter than heartbeat_ttl_seconds")
        return self

    @field_validator("control_url")
    @classmethod
    def _control_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def session_dir(self) -> Path:
        return self.work_root / self.session_id

    @property
    def work_dir(self) -> Path:
        """The cwd of the CLI: where the session's files are written."""
        return self.session_dir / "work"

    @property
    def home_dir(self) -> Path:
        """``HOME`` of the CLI (shell snapshots, caches)."""
        return self.session_dir / "home"

    @property
    def config_dir(self) -> Path:
        """``CLAUDE_CONFIG_DIR`` of the CLI (its local transcripts; the store holds the durable copy)."""
        return self.home_dir / ".claude"


def scrub_environment() -> list[str]:
    """Remove secrets from ``os.environ`` so that no child process inherits them; returns the names."""
    removed = []
    for name in (*SECRET_ENV, *FORBIDDEN_ENV):
        if os.environ.pop(name, None) is not None:
            removed.append(name)
    return removed
