"""Configuration of the Fly Machines emulator (env prefix ``FLYSWARM_EMULATOR_``).

Complex values come from the environment as JSON, as pydantic-settings does it, e.g.
``FLYSWARM_EMULATOR_IMAGES='{"flyswarm-agent": ["python", "-m", "agent"]}'`` or
``FLYSWARM_EMULATOR_SECRETS='{"demo": {"ANTHROPIC_API_KEY": "sk-test"}}'`` or
``FLYSWARM_EMULATOR_FAULTS='{"rate_limits": true}'``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from local.emulator_faults import FaultSettings


def default_images() -> dict[str, list[str]]:
    # The agent image runs the agent package with the emulator's own interpreter, so a local
    # machine sees the same virtualenv as the rest of the stack.
    return {"flyswarm-agent": [sys.executable, "-m", "agent"]}


class EmulatorSettings(BaseSettings):
    """Everything the emulator needs to know at start; the fault knobs can change at run time."""

    model_config = SettingsConfigDict(
        env_prefix="FLYSWARM_EMULATOR_", extra="ignore", use_attribute_docstrings=True
    )

    transition_delay: float = Field(default=0.2, ge=0.0)
    """Seconds each transient state (starting, stopping, suspending, destroying, ...) stays visible."""
    transition_delays: dict[str, float] = Field(default_factory=dict)
    """Per-state overrides of transition_delay, e.g. {"starting": 1.0}."""
    images: dict[str, list[str]] = Field(default_factory=default_images)
    """Image name -> command run when the machine config names no init.exec/entrypoint/cmd."""
    work_root: Path | None = None
    """Root of the per-machine work dirs; a temporary dir (removed on close) when unset."""
    secrets: dict[str, dict[str, str]] = Field(default_factory=dict)
    """App secrets: app name -> {NAME: value}, injected into the env of every machine of the app."""
    api_token: SecretStr | None = None
    """When set, every request must carry ``Authorization: Bearer <token>`` (else 401)."""
    faults: FaultSettings = Field(default_factory=FaultSettings)
    """Initial fault knobs (see local/emulator_faults.py)."""
    default_region: str = "iad"
    """Region of machines created without one (Fly picks the one nearest to the caller)."""
    regions: list[str] = Field(default_factory=list)
    """Known regions; create elsewhere answers 422. Empty = any region is accepted."""
    stop_timeout: float = Field(default=5.0, ge=0.0)
    """Seconds between the stop signal and SIGKILL when neither the request nor stop_config sets one."""
    inherit_env: list[str] = Field(default_factory=lambda: ["PATH", "LANG", "PYTHONPATH"])
    """The only host variables a machine sees (when set on the host); HOME is the machine's work dir."""
    allowed_executables: list[str] | None = None
    """When set, only these executables (names or absolute paths) may run; others fail to launch."""
    max_events: int = Field(default=100, ge=50)
    """Events kept per machine (the events endpoint serves at most 50)."""
    restart_backoff: float = Field(default=1.0, ge=0.0)
    """Seconds before a restart-policy restart, doubling with each consecutive one (flyd backs off)."""
    restart_backoff_max: float = Field(default=30.0, ge=0.0)
    """Cap of that delay; a machine that ran this long before exiting starts again from restart_backoff."""
    destroyed_retention: float = Field(default=600.0, ge=0.0)
    """Seconds a destroyed machine still answers GET/events/wait (200, state destroyed) before 404."""
    default_org: str = "personal"
    """Organization of apps that exist implicitly (created by their first machine, not POST /v1/apps)."""
