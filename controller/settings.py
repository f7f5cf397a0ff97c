"""The controller's configuration, from the environment (and ``.env``), in one place.

Two kinds of names are read:

- the seed's own, unprefixed names where they already exist (``REDIS_URL``, ``FLY_API_TOKEN``,
  ``FLY_APP_NAME``, ``FLY_AGENT_IMAGE``, ``FLY_API_HOSTNAME``, ``LOG_LEVEL``), so an existing
  deployment keeps working;
- ``FLYSWARM_``-prefixed names for everything the controller adds.

Each field names its variable in ``validation_alias`` and explains itself in ``description``;
``tests/test_readme.py`` turns that into the README's settings table, so the docs cannot drift.

:class:`PlanSettings` is the small frozen value the pure ``plan()`` needs. Tests build it directly
(every field has the production default); the runtime builds it with
:meth:`ControllerSettings.plan_settings`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.settings import DEFAULT_REDIS_URL  # the port `make up` gives its Redis
from controller.fly_apps import parse_app_list

# Defaults are named so the plan's value type and the settings agree without repeating numbers.
DEFAULT_FLY_APP_NAME = "flyswarm-agents"
DEFAULT_FLY_AGENT_IMAGE = "flyswarm-agent"
DEFAULT_FLY_API_HOSTNAME = "https://api.machines.dev"
DEFAULT_RESYNC_SECONDS = 15.0
DEFAULT_DEADLINE_WARNING_SECONDS = 60.0
DEFAULT_HEARTBEAT_TTL_SECONDS = 30.0
DEFAULT_BOOT_GRACE_SECONDS = 60.0
DEFAULT_ORPHAN_GRACE_SECONDS = 120.0
DEFAULT_CREATE_EXPECTATION_SECONDS = 120.0
# Fly's documented wedge thresholds (fly-machines-api.md §4): 5 min, 10 min for `updating`.
DEFAULT_WEDGE_SECONDS = 300.0
DEFAULT_WEDGE_UPDATING_SECONDS = 600.0
DEFAULT_RESTART_BACKOFF_BASE_SECONDS = 5.0
DEFAULT_RESTART_BACKOFF_MAX_SECONDS = 300.0
DEFAULT_STOP_GRACE_SECONDS = 30.0
DEFAULT_DESTROY_GRACE_SECONDS = 30.0
DEFAULT_REGION = "fra"


def default_controller_id() -> str:
    """``<hostname>-<pid>``: unique enough to tell replicas apart in the leader lease and logs."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ControllerSettings(BaseSettings):
    """Everything the controller process reads at start."""

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
        description="Redis the controller uses (may carry a password, so it is treated as a secret).",
    )
    agent_gateway_url: str = Field(
        default="http://127.0.0.1:8082",
        validation_alias="FLYSWARM_AGENT_GATEWAY_URL",
        description=(
            "The gateway as agents reach it (on Fly, over 6PN): their `ANTHROPIC_BASE_URL` and their "
            "only way to their session's state. Machines get no Redis address."
        ),
    )
    fly_api_token: SecretStr | None = Field(
        default=None,
        validation_alias="FLY_API_TOKEN",
        description="Fly Machines API token (never passed to machines, never logged).",
    )
    fly_app_name: str = Field(
        default=DEFAULT_FLY_APP_NAME,
        validation_alias="FLY_APP_NAME",
        description=(
            "Fly app that holds the agent machines (a list of one when `FLYSWARM_FLY_APPS` is empty); "
            "also the app of machines launched before apps were recorded."
        ),
    )
    fly_apps: str = Field(
        default="",
        validation_alias="FLYSWARM_FLY_APPS",
        description=(
            "Comma-separated agent apps creates are spread over (`app-a,app-b`); Fly limits creates "
            "per app (1/s, burst 3), so N apps give N creates/s. Empty: `FLY_APP_NAME` alone. Each "
            "app must exist on Fly (`manifests/deploy.sh` creates them)."
        ),
    )
    fly_agent_image: str = Field(
        default=DEFAULT_FLY_AGENT_IMAGE,
        validation_alias="FLY_AGENT_IMAGE",
        description="Image of agent machines when the session's spec names none.",
    )
    fly_api_hostname: str = Field(
        default=DEFAULT_FLY_API_HOSTNAME,
        validation_alias="FLY_API_HOSTNAME",
        description="Base URL of the Fly Machines API (point it at the local emulator for `make up`).",
    )

    # -- reconcile timing -------------------------------------------------------------------------
    resync_seconds: float = Field(
        default=DEFAULT_RESYNC_SECONDS,
        gt=0,
        validation_alias="FLYSWARM_RESYNC_SECONDS",
        description="Interval of the full resync pass over every session and machine.",
    )
    heartbeat_ttl_seconds: float = Field(
        default=DEFAULT_HEARTBEAT_TTL_SECONDS,
        gt=0,
        validation_alias="FLYSWARM_HEARTBEAT_TTL_SECONDS",
        description="A heartbeat older than this means the agent is gone (agents beat every TTL/3).",
    )
    boot_grace_seconds: float = Field(
        default=DEFAULT_BOOT_GRACE_SECONDS,
        ge=0,
        validation_alias="FLYSWARM_BOOT_GRACE_SECONDS",
        description="Time a started machine gets to send its first heartbeat before it counts as lost.",
    )
    orphan_grace_seconds: float = Field(
        default=DEFAULT_ORPHAN_GRACE_SECONDS,
        ge=0,
        validation_alias="FLYSWARM_ORPHAN_GRACE_SECONDS",
        description="Age a machine tagged as ours must reach before it is destroyed for having no session.",
    )
    create_expectation_seconds: float = Field(
        default=DEFAULT_CREATE_EXPECTATION_SECONDS,
        gt=0,
        validation_alias="FLYSWARM_CREATE_EXPECTATION_SECONDS",
        description="How long an issued create is expected to show up in Fly's (lagging) list before "
        "another create may be issued.",
    )
    wedge_seconds: float = Field(
        default=DEFAULT_WEDGE_SECONDS,
        gt=0,
        validation_alias="FLYSWARM_WEDGE_SECONDS",
        description="A machine in a transient state (starting, stopping, ...) longer than this is stuck "
        "and is replaced.",
    )
    wedge_updating_seconds: float = Field(
        default=DEFAULT_WEDGE_UPDATING_SECONDS,
        gt=0,
        validation_alias="FLYSWARM_WEDGE_UPDATING_SECONDS",
        description="Same as FLYSWARM_WEDGE_SECONDS for the `updating` state.",
    )
    restart_backoff_base_seconds: float = Field(
        default=DEFAULT_RESTART_BACKOFF_BASE_SECONDS,
        ge=0,
        validation_alias="FLYSWARM_RESTART_BACKOFF_BASE_SECONDS",
        description="First delay before restarting a failed session; doubles with every restart.",
    )
    restart_backoff_max_seconds: float = Field(
        default=DEFAULT_RESTART_BACKOFF_MAX_SECONDS,
        ge=0,
        validation_alias="FLYSWARM_RESTART_BACKOFF_MAX_SECONDS",
        description="Cap of the per-session restart backoff.",
    )
    stop_grace_seconds: float = Field(
        default=DEFAULT_STOP_GRACE_SECONDS,
        ge=0,
        validation_alias="FLYSWARM_STOP_GRACE_SECONDS",
        description="Machine stop_config timeout: time between SIGTERM and SIGKILL for the agent to flush.",
    )
    destroy_grace_seconds: float = Field(
        default=DEFAULT_DESTROY_GRACE_SECONDS,
        ge=0,
        validation_alias="FLYSWARM_DESTROY_GRACE_SECONDS",
        description="When retiring a machine, stop it first; after this long destroy it with force.",
    )
    default_region: str = Field(
        default=DEFAULT_REGION,
        validation_alias="FLYSWARM_DEFAULT_REGION",
        description="Region of machines whose spec names none.",
    )

    # -- execution --------------------------------------------------------------------------------
    concurrency: int = Field(
        default=8,
        ge=1,
        validation_alias="FLYSWARM_CONCURRENCY",
        description="Sessions reconciled in parallel (one key is never in two workers).",
    )
    max_destroys_per_pass: int = Field(
        default=20,
        ge=1,
        validation_alias="FLYSWARM_MAX_DESTROYS_PER_PASS",
        description="Cap on machine destroys per pass, so a bad read cannot wipe the fleet at once.",
    )
    pass_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        validation_alias="FLYSWARM_PASS_TIMEOUT_SECONDS",
        description="Deadline of one reconcile pass.",
    )
    call_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        validation_alias="FLYSWARM_CALL_TIMEOUT_SECONDS",
        description="Deadline of one Fly or Redis call.",
    )
    leader_lease_seconds: float = Field(
        default=15.0,
        gt=0,
        validation_alias="FLYSWARM_LEADER_LEASE_SECONDS",
        description="TTL of the Redis leader lease; a replica that cannot renew stops acting before it ends.",
    )

    shards: int = Field(
        default=16,
        ge=1,
        le=1024,
        validation_alias="FLYSWARM_SHARDS",
        description="Shards the sessions are split into (by CRC-32 of the id); replicas share them. "
        "Every replica must use the same number.",
    )

    # -- webhooks (README "Webhooks") ---------------------------------------------------------------
    webhook_allow_private: bool = Field(
        default=False,
        validation_alias="FLYSWARM_WEBHOOK_ALLOW_PRIVATE",
        description=(
            "Deliver webhooks to private, loopback and link-local addresses too (the SSRF guard "
            "refuses them otherwise). `flyswarm up` sets it: its receivers are on loopback."
        ),
    )
    webhook_retry_window_seconds: float = Field(
        default=86400.0,
        gt=0,
        validation_alias="FLYSWARM_WEBHOOK_RETRY_WINDOW_SECONDS",
        description="How long a delivery is retried after its event before it is given up (failed).",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=60,
        validation_alias="FLYSWARM_WEBHOOK_TIMEOUT_SECONDS",
        description="Deadline of one delivery attempt (connect, send, answer).",
    )
    webhook_concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        validation_alias="FLYSWARM_WEBHOOK_CONCURRENCY",
        description="Delivery attempts in flight at once (the leader's webhook worker).",
    )
    webhook_backoff_base_seconds: float = Field(
        default=5.0,
        gt=0,
        validation_alias="FLYSWARM_WEBHOOK_BACKOFF_BASE_SECONDS",
        description="First retry delay of a failed delivery; doubles per attempt, with full jitter.",
    )
    webhook_backoff_max_seconds: float = Field(
        default=3600.0,
        gt=0,
        validation_alias="FLYSWARM_WEBHOOK_BACKOFF_MAX_SECONDS",
        description="Longest retry delay of a failed delivery.",
    )
    webhook_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        validation_alias="FLYSWARM_WEBHOOK_POLL_SECONDS",
        description="How often the webhook worker looks for new events and due deliveries.",
    )
    deadline_warning_seconds: float = Field(
        default=DEFAULT_DEADLINE_WARNING_SECONDS,
        ge=0,
        validation_alias="FLYSWARM_DEADLINE_WARNING_SECONDS",
        description=(
            "A task session this close to its timeoutSeconds sends one session.deadline_approaching "
            "webhook event (0: never)."
        ),
    )

    # -- process ----------------------------------------------------------------------------------
    controller_host: str = Field(
        default="127.0.0.1",
        validation_alias="FLYSWARM_CONTROLLER_HOST",
        description="Address of the controller's /healthz, /readyz and /metrics endpoint.",
    )
    controller_port: int = Field(
        default=9090,
        ge=0,
        le=65535,
        validation_alias="FLYSWARM_CONTROLLER_PORT",
        description="Port of the controller's /healthz, /readyz and /metrics endpoint.",
    )
    controller_id: str = Field(
        default_factory=default_controller_id,
        validation_alias="FLYSWARM_CONTROLLER_ID",
        description="Identity of this replica in the leader lease and the logs (default hostname-pid).",
    )
    log_level: str = Field(
        default="info",
        validation_alias="LOG_LEVEL",
        description="Log level: debug, info, warning or error.",
    )

    @field_validator("fly_apps")
    @classmethod
    def _valid_apps(cls, value: str) -> str:
        return ",".join(parse_app_list(value))

    @field_validator("fly_app_name")
    @classmethod
    def _valid_app(cls, value: str) -> str:
        parse_app_list([value])
        return value

    @property
    def agent_apps(self) -> tuple[str, ...]:
        """The agent apps creates go to: ``FLYSWARM_FLY_APPS``, or ``FLY_APP_NAME`` alone."""
        return parse_app_list(self.fly_apps) or (self.fly_app_name,)

    def plan_settings(self) -> PlanSettings:
        """The subset the pure plan needs."""
        return PlanSettings(
            heartbeat_ttl_seconds=self.heartbeat_ttl_seconds,
            boot_grace_seconds=self.boot_grace_seconds,
            orphan_grace_seconds=self.orphan_grace_seconds,
            create_expectation_seconds=self.create_expectation_seconds,
            wedge_seconds=self.wedge_seconds,
            wedge_updating_seconds=self.wedge_updating_seconds,
            restart_backoff_base_seconds=self.restart_backoff_base_seconds,
            restart_backoff_max_seconds=self.restart_backoff_max_seconds,
            destroy_grace_seconds=self.destroy_grace_seconds,
            default_region=self.default_region,
            resync_seconds=self.resync_seconds,
            deadline_warning_seconds=self.deadline_warning_seconds,
        )


@dataclass(frozen=True)
class PlanSettings:
    """What ``plan()`` needs to decide; every default is the production default."""

    heartbeat_ttl_seconds: float = DEFAULT_HEARTBEAT_TTL_SECONDS
    boot_grace_seconds: float = DEFAULT_BOOT_GRACE_SECONDS
    orphan_grace_seconds: float = DEFAULT_ORPHAN_GRACE_SECONDS
    create_expectation_seconds: float = DEFAULT_CREATE_EXPECTATION_SECONDS
    wedge_seconds: float = DEFAULT_WEDGE_SECONDS
    wedge_updating_seconds: float = DEFAULT_WEDGE_UPDATING_SECONDS
    restart_backoff_base_seconds: float = DEFAULT_RESTART_BACKOFF_BASE_SECONDS
    restart_backoff_max_seconds: float = DEFAULT_RESTART_BACKOFF_MAX_SECONDS
    destroy_grace_seconds: float = DEFAULT_DESTROY_GRACE_SECONDS
    default_region: str = DEFAULT_REGION
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    deadline_warning_seconds: float = DEFAULT_DEADLINE_WARNING_SECONDS

    @classmethod
    def from_settings(cls, settings: ControllerSettings) -> PlanSettings:
        return settings.plan_settings()
