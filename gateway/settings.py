"""The model gateway's configuration, from the environment (and ``.env``), in one place.

The gateway is the only holder of the Anthropic key (``ANTHROPIC_API_KEY``): it runs in the control
plane, agents reach it as their ``ANTHROPIC_BASE_URL`` with their session's token. Each field names
its variable in ``validation_alias``; ``tests/test_readme.py`` turns them into the README's table.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.budgets import BudgetSpec
from gateway.pricing import ModelPrice

DEFAULT_REDIS_URL = "redis://127.0.0.1:6399/0"
DEFAULT_PORT = 8082
DEFAULT_UPSTREAM = "https://api.anthropic.com"


class GatewaySettings(BaseSettings):
    """Everything the gateway process reads at start."""

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
        description="Redis that holds the sessions, their token digests and usage (a secret).",
    )
    redis_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        validation_alias="FLYSWARM_REDIS_TIMEOUT_SECONDS",
        description="Socket timeout of one Redis call; past it the request answers 503.",
    )
    host: str = Field(
        default="127.0.0.1",
        validation_alias="FLYSWARM_GATEWAY_HOST",
        description="Address to bind (on Fly: `fly-local-6pn` or `::`, so agents reach it over 6PN).",
    )
    port: int = Field(
        default=DEFAULT_PORT,
        ge=0,
        le=65535,
        validation_alias="FLYSWARM_GATEWAY_PORT",
        description="Port to bind.",
    )
    upstream_url: str = Field(
        default=DEFAULT_UPSTREAM,
        validation_alias="FLYSWARM_GATEWAY_UPSTREAM_URL",
        description="The Messages API the gateway forwards to (the scripted model in `make up`).",
    )
    upstream_api_key: SecretStr | None = Field(
        default=None,
        validation_alias="ANTHROPIC_API_KEY",
        description="The real Anthropic key, sent upstream as `x-api-key`; only the gateway holds it.",
    )
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        validation_alias="API_TOKENS",
        description="When set, /metrics needs `Authorization: Bearer <one of them>` (as the API's).",
    )

    # -- timeouts and limits ----------------------------------------------------------------------
    connect_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        validation_alias="FLYSWARM_GATEWAY_CONNECT_TIMEOUT_SECONDS",
        description="Connecting to the upstream; past it the agent gets 504.",
    )
    idle_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        validation_alias="FLYSWARM_GATEWAY_IDLE_TIMEOUT_SECONDS",
        description="Longest silence from the upstream (before its headers or between two chunks).",
    )
    request_timeout_seconds: float = Field(
        default=1800.0,
        gt=0,
        validation_alias="FLYSWARM_GATEWAY_REQUEST_TIMEOUT_SECONDS",
        description="Longest a whole request may take, streaming included; then it is cut.",
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        validation_alias="FLYSWARM_GATEWAY_MAX_BODY_BYTES",
        description="Largest accepted request body (larger: 413 request_too_large).",
    )

    # -- artifacts --------------------------------------------------------------------------------
    artifact_max_file_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1,
        le=256 * 1024 * 1024,
        validation_alias="FLYSWARM_ARTIFACT_MAX_FILE_BYTES",
        description="Largest artifact file an agent may upload; larger ones are skipped with a reason.",
    )
    artifact_max_session_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=1,
        le=1024 * 1024 * 1024,
        validation_alias="FLYSWARM_ARTIFACT_MAX_SESSION_BYTES",
        description="Total artifact bytes kept per session (in Redis); past it files are skipped.",
    )
    artifact_max_files: int = Field(
        default=100,
        ge=1,
        le=10_000,
        validation_alias="FLYSWARM_ARTIFACT_MAX_FILES",
        description="Most artifact files kept per session; past it files are skipped.",
    )

    # -- metering and budgets ---------------------------------------------------------------------
    budget_warning_fraction: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        validation_alias="FLYSWARM_GATEWAY_BUDGET_WARNING_FRACTION",
        description=(
            "A session's spend past this fraction of its maxCostUsd sends one session.budget_warning "
            "webhook event (0 turns the warning off)."
        ),
    )
    prices: Annotated[dict[str, ModelPrice], NoDecode] = Field(
        default_factory=dict,
        validation_alias="FLYSWARM_GATEWAY_PRICES",
        description=(
            'JSON: model name prefix -> {"input","output","cacheWrite","cacheRead"} USD per million '
            'tokens, over the built-in table; the key "default" prices unknown models.'
        ),
    )
    budgets: Annotated[list[BudgetSpec], NoDecode] = Field(
        default_factory=list,
        validation_alias="FLYSWARM_GATEWAY_BUDGETS",
        description=(
            'JSON list of {"name","selector","period": hour|day|month,"maxCostUsd"}: what all sessions '
            "matching a label selector may spend per (UTC) period."
        ),
    )
    git_secrets: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict,
        validation_alias="FLYSWARM_GATEWAY_GIT_SECRETS",
        description=(
            'JSON: secret name -> "user:password" (or a bare token, sent as `x-access-token:<token>`): '
            "the credentials the git proxy adds for a `spec.workspace.git[].secret` (a secret)."
        ),
    )
    metrics_label: str | None = Field(
        default=None,
        validation_alias="FLYSWARM_GATEWAY_METRICS_LABEL",
        description="A session label (e.g. `team`) whose value splits the token and cost metrics.",
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

    @field_validator("prices", "budgets", "git_secrets", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else None
        return value

    @field_validator("budgets")
    @classmethod
    def _unique_budgets(cls, value: list[BudgetSpec]) -> list[BudgetSpec]:
        names = [b.name for b in value]
        if len(set(names)) != len(names):
            raise ValueError("budget names must be unique")
        return value

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("upstream_url")
    @classmethod
    def _upstream(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")
