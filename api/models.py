"""The Session resource, as DESIGN.md fixes it, and the small values that travel with it.

A Session is declared by a user (``metadata`` + ``spec``), observed and driven by the controller
(``status``, written by the controller alone) and reported on by the agent inside the machine
(``agent``, written by the agent alone). The three parts are stored as separate fields so that no
writer can clobber another's part.

Input models forbid unknown fields (a typo in a manifest is an error, not a silent default);
bounds live here so the API, the CLI and the controller agree on what a valid session is.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Relative imports: the SDK (flyswarm) loads this module under the name flyswarm._server.api.models
# when installed from a wheel, without the server's packages on sys.path (README "Python SDK").
from .notify_models import NotifyTarget, check_notify
from .reasons import Reason as Reason  # re-exported: the API models include the reasons
from .workspace_models import PushSpec, WorkspaceReport, WorkspaceSpec

API_VERSION: Literal["flyswarm.dev/v1"] = "flyswarm.dev/v1"
KIND: Literal["Session"] = "Session"

DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Label keys: an optional DNS-subdomain prefix and a name, as Kubernetes has them.
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_REGION_RE = re.compile(r"^[a-z]{3}$")
_TOOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_*():\-. ]{0,127}$")

DEFAULT_TOOLS = ("Read", "Write", "Edit", "Bash", "Glob", "Grep")
DEFAULT_PROMPT_LIMIT = 100_000
# Environment names the controller owns inside a machine; a spec may not override them.
RESERVED_ENV_PREFIXES = ("FLYSWARM_", "FLY_")


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_timestamp(value: Any) -> datetime | None:
    """An RFC 3339 / ISO 8601 string as an aware datetime (UTC when it names no zone); None if unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def generate_session_id() -> str:
    """A short, DNS-safe, roughly time-ordered id: ``s-<base36 ms>-<random>``."""
    millis = int(time.time() * 1000)
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    stamp = ""
    while millis:
        millis, rem = divmod(millis, 36)
        stamp = digits[rem] + stamp
    return f"s-{stamp}-{secrets.token_hex(3)}"


def validate_session_id(value: str) -> str:
    if not DNS_LABEL_RE.match(value):
        raise ValueError(
            "must be a DNS label: 1-63 characters of [a-z0-9-], starting and ending alphanumeric"
        )
    return value


def validate_label_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if prefix and not _LABEL_PREFIX_RE.match(prefix):
        raise ValueError(f"label key {key!r} has an invalid prefix")
    if not _LABEL_NAME_RE.match(name):
        raise ValueError(f"label key {key!r} must be 1-63 chars of [A-Za-z0-9._-], alphanumeric at both ends")


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """A whole label map: at most 64 labels, each key and value valid."""
    if len(labels) > 64:
        raise ValueError("at most 64 labels")
    for key, val in labels.items():
        validate_label_key(key)
        validate_label_value(key, val)
    return labels


def field_path(loc: Sequence[int | str], prefix: str = "") -> str:
    """A pydantic error location as the dotted path a user wrote (``spec.machine.env``, ``items[2]``)."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path


def validate_label_value(key: str, value: str) -> None:
    if not _LABEL_VALUE_RE.match(value):
        raise ValueError(f"label {key!r} value {value!r} must be 0-63 chars of [A-Za-z0-9._-]")


class Phase(StrEnum):
    PENDING = "Pending"
    CREATING = "Creating"
    STARTING = "Starting"
    RUNNING = "Running"
    SLEEPING = "Sleeping"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    TERMINATING = "Terminating"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})


#: Largest persistent work dir a session may ask for (Fly volumes go to 500 GB; a chat needs far less).
MAX_PERSISTENCE_GB = 50


class _Input(BaseModel):
    """Base for user-supplied parts: unknown fields are errors, names are camelCase as in YAML."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RestartPolicy(_Input):
    policy: Literal["never", "on-failure", "always"] = "on-failure"
    maxRetries: int = Field(default=3, ge=0, le=100)


class Guest(_Input):
    cpuKind: Literal["shared", "performance"] = "shared"
    cpus: int = Field(default=1, ge=1, le=16)
    memoryMb: int = Field(default=1024, ge=256, le=65536)

    @field_validator("memoryMb")
    @classmethod
    def _multiple_of_256(cls, value: int) -> int:
        if value % 256:
            raise ValueError("must be a multiple of 256 (Fly allocates memory in 256 MB steps)")
        return value


class MachineSpec(_Input):
    region: str = "fra"
    image: str | None = Field(default=None, max_length=512)
    guest: Guest = Field(default_factory=Guest)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION_RE.match(value):
            raise ValueError("must be a three-letter Fly region code such as 'fra'")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 100:
            raise ValueError("at most 100 variables")
        for name, val in value.items():
            if not _ENV_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name.upper().startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"{name!r} is reserved (FLYSWARM_* and FLY_* are set by flyswarm and Fly)")
            if len(val) > 32_768:
                raise ValueError(f"{name!r} is longer than 32768 characters")
        return value


class Persistence(_Input):
    """A work dir that survives sleep and replacement: a Fly volume of ``sizeGb`` for the session's
    lifetime (README "Persistence": host pinning, costs, what happens when the host is lost)."""

    sizeGb: int = Field(default=1, ge=1, le=MAX_PERSISTENCE_GB)


MAX_ARTIFACT_GLOBS = 32


def check_work_path(value: str, what: str = "path") -> str:
    """A path relative to the work dir: not empty, not absolute, no ``..`` part, no NUL or backslash."""
    if not value or len(value) > 1024:
        raise ValueError(f"{what} must be 1-1024 characters")
    if value.startswith("/"):
        raise ValueError(f"{what} must be relative to the work dir, not absolute")
    if "\0" in value or "\\" in value:
        raise ValueError(f"{what} must not contain NUL or backslash")
    if ".." in value.split("/"):
        raise ValueError(f"{what} must not contain '..'")
    return value


class OutputSpec(_Input):
    """What a session hands back besides its text: ``artifacts`` are globs relative to the work dir
    (README "Artifacts"); ``push`` commits the run's changes to a new branch (README "Workspaces")."""

    artifacts: list[str] = Field(default_factory=list, max_length=MAX_ARTIFACT_GLOBS)
    push: PushSpec | None = None

    @field_validator("artifacts")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        return [check_work_path(glob, f"glob {glob!r}") for glob in value]


class SessionSpec(_Input):
    """What the user wants. Changing it bumps ``metadata.generation``."""

    prompt: str | None = Field(default=None, max_length=1_000_000)
    mode: Literal["task", "chat"] = "task"
    idleTimeoutSeconds: int = Field(default=300, ge=0, le=7 * 86400)
    sleep: Literal["stop", "suspend"] = "stop"
    maxTurns: int = Field(default=25, ge=1, le=1000)
    timeoutSeconds: int = Field(default=600, ge=1, le=7 * 86400)
    maxCostUsd: float | None = Field(default=None, gt=0, le=10_000)
    restartPolicy: RestartPolicy = Field(default_factory=RestartPolicy)
    ttlSecondsAfterFinished: int = Field(default=86400, ge=0, le=90 * 86400)
    model: str | None = Field(default=None, max_length=128)
    systemPrompt: str | None = Field(default=None, max_length=100_000)
    allowedTools: list[str] = Field(default_factory=lambda: list(DEFAULT_TOOLS), max_length=64)
    machine: MachineSpec = Field(default_factory=MachineSpec)
    workspace: WorkspaceSpec | None = None  # api/workspace_models.py
    output: OutputSpec = Field(default_factory=OutputSpec)
    persistence: Persistence | None = None
    #: Signed webhooks for this session's events (api/notify_models.py); secrets are write-only.
    notify: list[NotifyTarget] = Field(default_factory=list)

    @field_validator("notify")
    @classmethod
    def _notify(cls, value: list[NotifyTarget]) -> list[NotifyTarget]:
        return check_notify(value)

    @field_validator("allowedTools")
    @classmethod
    def _tools(cls, value: list[str]) -> list[str]:
        for tool in value:
            if not _TOOL_RE.match(tool):
                raise ValueError(f"{tool!r} is not a valid tool name")
        return value

    @model_validator(mode="after")
    def _mode_rules(self) -> SessionSpec:
        if self.mode == "task" and not (self.prompt and self.prompt.strip()):
            raise ValueError("prompt: a task session needs a non-empty prompt")
        push = self.output.push if self.output else None
        if push is not None:
            if self.mode != "task":
                raise ValueError("output.push: only a task session pushes its changes")
            if push.source >= len(self.workspace.git if self.workspace else []):
                raise ValueError(f"output.push.source: no spec.workspace.git[{push.source}] to push from")
        return self

    def canonical_json(self) -> str:
        """A stable serialization: equal specs give equal strings (used to detect real changes)."""
        return self.model_dump_json(exclude_none=False)


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int = 0
    createdAt: datetime | None = None
    deletionTimestamp: datetime | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_session_id(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_labels(value)


class Condition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    lastTransitionTime: datetime


class SessionStatus(BaseModel):
    """Written by the controller only (through :class:`StatusUpdate`, validated before the write)."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase = Phase.PENDING
    reason: Reason | None = None
    message: str | None = None
    machineId: str | None = None
    region: str | None = None
    restarts: int = 0
    observedGeneration: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    startedAt: datetime | None = None
    finishedAt: datetime | None = None
    lastHeartbeatAt: datetime | None = None
    nextRetryAt: datetime | None = None
    # When the controller last asked Fly to create, start or restart the session's machine: the
    # restart backoff counts from it, and observations older than it are not taken as failures.
    lastStartAt: datetime | None = None

    def checked(self) -> SessionStatus:
        """This status re-validated: one built around validation (``model_copy(update=...)``,
        ``model_construct``) with a bad phase, reason or field name raises instead of being stored."""
        unknown = sorted(set(vars(self)) - set(SessionStatus.model_fields))
        if unknown:
            raise ValueError(f"status has unknown fields: {', '.join(unknown)}")
        return SessionStatus.model_validate(self.model_dump(warnings=False))


class StatusUpdate(BaseModel):
    """A change to a session's status: the fields given are set, each validated; others are kept.

    Unknown field names are refused (a misspelled field is an error, not a silent no-op), and
    :meth:`applied_to` validates the merged status, so ``phase='Bogus'`` never reaches the store.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    phase: Phase | None = None
    reason: Reason | None = None
    message: str | None = None
    machineId: str | None = None
    region: str | None = None
    restarts: int | None = None
    observedGeneration: int | None = None
    conditions: list[Condition] | None = None
    startedAt: datetime | None = None
    finishedAt: datetime | None = None
    lastHeartbeatAt: datetime | None = None
    nextRetryAt: datetime | None = None
    lastStartAt: datetime | None = None

    def applied_to(self, status: SessionStatus) -> SessionStatus:
        changes = self.model_dump(include=self.model_fields_set)
        return SessionStatus.model_validate({**status.model_dump(), **changes})


AgentState = Literal["starting", "running", "idle", "done", "error", "interrupted"]
AGENT_FINISHED_STATES = frozenset({"done", "error"})


class AgentReport(BaseModel):
    """Written by the agent only."""

    model_config = ConfigDict(extra="ignore")

    state: AgentState = "starting"
    machineId: str | None = None
    turns: int = 0
    resultText: str | None = None
    costUsd: float | None = None
    usage: dict[str, Any] = Field(default_factory=dict)
    claudeSessionId: str | None = None
    reason: str | None = None
    message: str | None = None
    stderrTail: str | None = None
    workspace: WorkspaceReport | None = None  # task sessions with spec.workspace.git
    updatedAt: datetime | None = None


class SessionUsage(BaseModel):
    """Model usage metered by the gateway (written by the gateway only, never by the machine).

    Totals over every response the session's token was used for, priced by the gateway's table.
    ``budgetExceeded`` names the budget (``maxCostUsd`` or a label budget) that made the gateway
    refuse a request: the controller then finishes the session ``Failed``/``BudgetExceeded``.
    """

    model_config = ConfigDict(extra="ignore")

    requests: int = 0
    inputTokens: int = 0
    outputTokens: int = 0
    cacheCreationInputTokens: int = 0
    cacheReadInputTokens: int = 0
    costUsd: float = 0.0
    budgetExceeded: str | None = None
    updatedAt: datetime | None = None


class Session(BaseModel):
    """The whole resource as stored and served."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    apiVersion: Literal["flyswarm.dev/v1"] = API_VERSION
    kind: Literal["Session"] = KIND
    metadata: Metadata
    spec: SessionSpec
    status: SessionStatus = Field(default_factory=SessionStatus)
    agent: AgentReport | None = None
    usage: SessionUsage | None = None

    @property
    def id(self) -> str:
        return self.metadata.name

    @property
    def deleted(self) -> bool:
        return self.metadata.deletionTimestamp is not None

    def effective_phase(self) -> Phase:
        """The phase to show: a session whose agent reported a final state is never 'running'.

        Between the agent's report and the controller's next pass the stored status can lag;
        reading through the report keeps the API from ever calling a finished session running.
        """
        phase = self.status.phase
        if phase in TERMINAL_PHASES or phase is Phase.TERMINATING:
            return phase
        if self.spec.mode == "task" and self.agent is not None and self.agent.state in AGENT_FINISHED_STATES:
            return Phase.SUCCEEDED if self.agent.state == "done" else Phase.FAILED
        return phase

    def budget_exhausted(self) -> str | None:
        """Why the session's spend is over a budget (a message), or None.

        The gateway's metered cost counts (the machine cannot lower it), and so does the agent's own
        report, whichever is higher; a label budget the gateway found exhausted counts too.
        """
        usage = self.usage
        if usage is not None and usage.budgetExceeded:
            return f"budget {usage.budgetExceeded} exhausted (session spent {usage.costUsd:.4f} USD)"
        limit = self.spec.maxCostUsd
        costs = [
            c for c in (usage.costUsd if usage else None, self.agent.costUsd if self.agent else None) if c
        ]
        if limit is not None and costs and max(costs) >= limit:
            return f"cost {max(costs):.4f} USD reached maxCostUsd={limit}"
        return None


class SessionView(Session):
    """What the API returns for a session: the resource plus the seed's convenience fields
    (``api/wire.py`` builds it; the SDK parses every session it receives into it)."""

    session_id: str
    machine_id: str | None
    created_at: str | None
    state: Literal["done", "error"] | None


class MessageAccepted(BaseModel):
    """The answer to a chat message: the inbox entry's id and when it was queued."""

    id: str
    session_id: str
    createdAt: str


class SessionEvent(BaseModel):
    """One entry of a session's event stream (lifecycle from the controller, work from the agent)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    source: Literal["controller", "agent", "api", "gateway"] = "controller"
    reason: str | None = None
    message: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    time: datetime = Field(default_factory=utcnow)


class InboxMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    text: str
    createdAt: datetime


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    machineId: str | None = None
    state: str = "running"
    at: datetime
    ttlSeconds: int
