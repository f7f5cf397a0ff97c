"""The API process's configuration, from the environment (and ``.env``), in one place.

The seed orchestrator's names are kept where they exist (``REDIS_URL``, ``PORT``, ``LOG_LEVEL``) so an
existing deployment keeps working; ``HOST`` and ``API_TOKENS`` are the obvious unprefixed names; every
other knob is ``FLYSWARM_``-prefixed. Each field names its variable in ``validation_alias`` and explains
itself in ``description``; ``tests/test_readme.py`` turns that into the README's table.

Secrets are ``SecretStr`` (``REDIS_URL`` may carry a password, ``API_TOKENS`` are bearer tokens), so
printing the settings object never shows them.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6399/0"  # the port `make up` gives its Redis
DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PROMPT_MAX_CHARS = 100_000
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class ApiSettings(BaseSettings):
    """Everything the API process reads at start."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
    )

    # -- connections ------------------------------------------------------------------------------
    redis_url: SecretStr = Field(
        default=SecretStr(DEFAULT_REDIS_URL),
        validation_alias="REDIS_URL",
        description=(
            "Redis that holds the sessions: `redis://` (one node) or `redis+cluster://` (a Redis "
            "Cluster; any node as the seed). May carry a password, so it is treated as a secret."
        ),
    )
    redis_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        validation_alias="FLYSWARM_REDIS_TIMEOUT_SECONDS",
        description="Socket timeout of one Redis call; past it the request answers 503.",
    )
    redis_pool_size: int = Field(
        default=64,
        ge=1,
        le=10_000,
        validation_alias="FLYSWARM_REDIS_POOL_SIZE",
        description=(
            "Redis connections for ordinary commands (writes, reads, probes). Event streams never "
            "hold one while they wait, so this does not grow with followers."
        ),
    )
    redis_pool_timeout_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        validation_alias="FLYSWARM_REDIS_POOL_TIMEOUT_SECONDS",
        description=(
            "How long a request waits for a free connection of that pool before it alone "
            "answers 503 with Retry-After."
        ),
    )
    host: str = Field(
        default=DEFAULT_HOST,
        validation_alias="HOST",
        description="Address to bind. A non-loopback address is refused unless API_TOKENS is set.",
    )
    port: int = Field(
        default=DEFAULT_PORT, ge=0, le=65535, validation_alias="PORT", description="Port to bind."
    )
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        validation_alias="API_TOKENS",
        description=(
            "Comma-separated bearer tokens; every request but /health and /readyz must carry one "
            "(`Authorization: Bearer <token>`). Empty = no auth, allowed on loopback only."
        ),
    )
    metrics_public: bool = Field(
        default=False,
        validation_alias="FLYSWARM_METRICS_PUBLIC",
        description="Serve /metrics without a token (when API_TOKENS is set; it is always open without).",
    )

    # -- limits -----------------------------------------------------------------------------------
    prompt_max_chars: int = Field(
        default=DEFAULT_PROMPT_MAX_CHARS,
        ge=1,
        le=1_000_000,
        validation_alias="FLYSWARM_PROMPT_MAX_CHARS",
        description="Longest accepted prompt and chat message, in characters (longer: 422).",
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        ge=1024,
        validation_alias="FLYSWARM_MAX_BODY_BYTES",
        description="Largest accepted request body; enforced while reading (larger: 413).",
    )

    webhook_allow_private: bool = Field(
        default=False,
        validation_alias="FLYSWARM_WEBHOOK_ALLOW_PRIVATE",
        description=(
            "Accept webhook URLs (spec.notify, Webhook resources) whose host is or resolves to a "
            "private, loopback or link-local address (refused with 422 otherwise)."
        ),
    )

    # -- live files -------------------------------------------------------------------------------
    files_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=120,
        validation_alias="FLYSWARM_FILES_TIMEOUT_SECONDS",
        description="How long `GET /sessions/{id}/files` waits for the running agent's answer (then 504).",
    )
    files_max_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        le=1024 * 1024,
        validation_alias="FLYSWARM_FILES_MAX_BYTES",
        description="Largest file `GET /sessions/{id}/files` reads from a running agent (larger: 413).",
    )

    # -- streaming --------------------------------------------------------------------------------
    sse_keepalive_seconds: float = Field(
        default=15.0,
        gt=0,
        le=300,
        validation_alias="FLYSWARM_SSE_KEEPALIVE_SECONDS",
        description="Interval of `: keep-alive` comments on idle event streams (SSE) and of liveness checks.",
    )

    stream_readers: int = Field(
        default=4,
        ge=1,
        le=256,
        validation_alias="FLYSWARM_STREAM_READERS",
        description=(
            "Fan-out readers: each holds one blocking Redis connection and follows many sessions "
            "with one XREAD; every follower of the process is fed by them."
        ),
    )
    stream_max_followers: int = Field(
        default=10_000,
        ge=1,
        validation_alias="FLYSWARM_STREAM_MAX_FOLLOWERS",
        description=(
            "Followers (SSE and WebSocket) one process serves; one more is refused with 503 and "
            "Retry-After (size the file-descriptor limit above this)."
        ),
    )
    stream_follower_buffer: int = Field(
        default=256,
        ge=1,
        le=100_000,
        validation_alias="FLYSWARM_STREAM_FOLLOWER_BUFFER",
        description=(
            "Events buffered for one follower; a client that falls further behind is disconnected "
            "with a reason and resumes with Last-Event-ID."
        ),
    )

    # -- observability ----------------------------------------------------------------------------
    log_level: str = Field(
        default="info", validation_alias="LOG_LEVEL", description="debug, info, warning or error."
    )
    log_json: bool | None = Field(
        default=None,
        validation_alias="FLYSWARM_LOG_JSON",
        description="Force JSON (true) or console (false) logs; default: JSON unless stderr is a TTY.",
    )
    metrics_sessions_refresh_seconds: float = Field(
        default=30.0,
        ge=0,
        validation_alias="FLYSWARM_METRICS_SESSIONS_REFRESH_SECONDS",
        description="How long the sessions-by-phase gauge of /metrics is cached (it reads every session).",
    )

    # -- server -----------------------------------------------------------------------------------
    shutdown_grace_seconds: float = Field(
        default=5.0,
        ge=1,
        validation_alias="FLYSWARM_SHUTDOWN_GRACE_SECONDS",
        description="On SIGTERM, time open requests and event streams get before they are cut.",
    )

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return [
                p for p in value if (p.get_secret_value() if isinstance(p, SecretStr) else str(p)).strip()
            ]
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("must be one of debug, info, warning, error, critical")
        return level

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens)

    def token_values(self) -> list[str]:
        return [token.get_secret_value() for token in self.api_tokens]


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        # A host name other than localhost may resolve to anything: treat it as public.
        return False
