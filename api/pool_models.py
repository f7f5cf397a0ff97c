"""The Pool resource: warm agent machines that new sessions claim instead of waiting on a create.

Fly limits machine *creates* to about one per second per app, but *start* and *resume* per machine.
A pool keeps ``size`` machines created ahead of time, each with its agent process booted (the SDK
imported, connected to the control plane) and then suspended (``mode: suspended``) or stopped
(``mode: stopped``, cheaper, slower). A new session that fits a ready pool machine claims it: a
resume, not a create, so a burst of sessions is limited by per-machine starts, which run in parallel.

A session fits a pool when its machine spec equals the pool's template (region, image, guest; the
session's ``env`` travels with the assignment, never in the machine config) and its labels match
the pool's ``selector`` (all of ``matchLabels``). Sessions that fit no ready machine are created
fresh at once: a pool never makes a session slower.

Like a Session: ``metadata`` + ``spec`` from the user (unknown fields are errors), ``status`` written
by the controller alone.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .models import API_VERSION, Condition, Guest, MachineSpec, Metadata, Session, validate_labels

POOL_KIND: Literal["Pool"] = "Pool"

#: Fly suspends (snapshots memory of) only machines with at most this much memory.
SUSPEND_MAX_MEMORY_MB = 2048
#: Upper bounds that keep one pool from being a runaway bill or a Redis hot key.
POOL_MAX_SIZE = 2000
# Fly app names: lowercase letters, digits and dashes (as `fly apps create` accepts them).
_APP_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PoolTemplate(_Input):
    """The machine a pool keeps warm; a session fits when its ``spec.machine`` has the same three."""

    region: str = "fra"
    image: str | None = Field(default=None, max_length=512)
    guest: Guest = Field(default_factory=Guest)

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        # One rule for regions: the Session's own validator, its reason reported on this field
        # (a nested ValidationError would name ``template.region.region``).
        try:
            MachineSpec(region=value)
        except ValidationError as exc:
            raise ValueError(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None
        return value


class PoolSelector(_Input):
    matchLabels: dict[str, str] = Field(default_factory=dict)

    @field_validator("matchLabels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_labels(value)


class PoolSpec(_Input):
    """What the user wants. Changing ``template`` replaces the pool's unclaimed machines."""

    template: PoolTemplate = Field(default_factory=PoolTemplate)
    selector: PoolSelector | None = None
    size: int = Field(default=1, ge=0, le=POOL_MAX_SIZE)
    maxSize: int | None = Field(default=None, ge=0, le=POOL_MAX_SIZE)
    mode: Literal["suspended", "stopped"] = "suspended"
    #: Agent apps to spread this pool's creates over; empty: the controller's configured apps.
    apps: list[str] = Field(default_factory=list, max_length=32)

    @field_validator("apps")
    @classmethod
    def _apps(cls, value: list[str]) -> list[str]:
        for app in value:
            if not _APP_RE.match(app):
                raise ValueError(f"{app!r} is not a Fly app name (2-63 chars of [a-z0-9-])")
        if len(set(value)) != len(value):
            raise ValueError("names an app twice")
        return value

    @model_validator(mode="after")
    def _rules(self) -> PoolSpec:
        if self.maxSize is not None and self.maxSize < self.size:
            raise ValueError(f"maxSize: must be at least size ({self.size})")
        if self.mode == "suspended" and self.template.guest.memoryMb > SUSPEND_MAX_MEMORY_MB:
            raise ValueError(
                "template.guest.memoryMb: Fly suspends only machines with at most "
                f"{SUSPEND_MAX_MEMORY_MB} MB of memory; use mode: stopped for larger machines"
            )
        return self

    @property
    def limit(self) -> int:
        """The most machines (ready + booting + claimed-but-not-yet-handed-over) the pool may hold."""
        return self.maxSize if self.maxSize is not None else self.size

    def canonical_json(self) -> str:
        return self.model_dump_json(exclude_none=False)

    def template_json(self) -> str:
        """The part whose change replaces unclaimed machines (an image roll-out, a new guest size)."""
        return self.template.model_dump_json(exclude_none=False)


class PoolStatus(BaseModel):
    """Written by the controller only."""

    model_config = ConfigDict(extra="ignore")

    ready: int = 0
    booting: int = 0
    claimed: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    lastError: str | None = None
    observedGeneration: int = 0
    updatedAt: datetime | None = None


class Pool(BaseModel):
    """The whole resource as stored and served."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    apiVersion: Literal["flyswarm.dev/v1"] = API_VERSION
    kind: Literal["Pool"] = POOL_KIND
    metadata: Metadata
    spec: PoolSpec
    status: PoolStatus = Field(default_factory=PoolStatus)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def deleted(self) -> bool:
        return self.metadata.deletionTimestamp is not None


def fits(pool: PoolSpec, session: Session) -> bool:
    """Whether ``session`` may run on a machine of this pool (template equal, selector matched)."""
    machine = session.spec.machine
    template = pool.template
    if (machine.region, machine.image, machine.guest) != (template.region, template.image, template.guest):
        return False
    wanted = pool.selector.matchLabels if pool.selector is not None else {}
    labels = session.metadata.labels
    return all(labels.get(key) == value for key, value in wanted.items())
