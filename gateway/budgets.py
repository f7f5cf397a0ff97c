"""Budgets above a session: what all sessions matching a label selector may spend per period.

Declared in settings (``FLYSWARM_GATEWAY_BUDGETS``, a JSON list), e.g.
``[{"name": "ios-daily", "selector": "team=ios", "period": "day", "maxCostUsd": 50}]``. Periods
are calendar UTC hours, days or months; each has its own counter in Redis
(:func:`api.keys.budget_spend`, keyed by budget name and period start), so a new period starts at
zero with nothing to reset, and old counters expire. A budget whose counter has reached
``maxCostUsd`` refuses every further request of a matching session, as the session's own
``maxCostUsd`` does; the request in flight when it is crossed completes (at most one response over
per concurrent request). An empty selector matches every session (a global cap).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api import keys
from api.selector import Selector, SelectorError, parse_selector

Period = Literal["hour", "day", "month"]
_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
# Counters outlive their period by this much (for inspection), then expire.
_KEEP_AFTER = timedelta(days=2)


class BudgetSpec(BaseModel):
    """One budget as written in the settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    selector: str = ""
    period: Period
    maxCostUsd: float = Field(gt=0)

    @field_validator("selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        try:
            parse_selector(value)
        except SelectorError as exc:
            raise ValueError(f"selector: {exc}") from None
        return value


def period_start(period: Period, now: datetime) -> datetime:
    now = now.astimezone(UTC)
    if period == "hour":
        return now.replace(minute=0, second=0, microsecond=0)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _period_length(period: Period) -> timedelta:
    return {"hour": timedelta(hours=1), "day": timedelta(days=1), "month": timedelta(days=31)}[period]


@dataclass(frozen=True)
class Budget:
    """A parsed budget."""

    name: str
    selector: Selector
    period: Period
    max_cost_usd: float

    @classmethod
    def from_spec(cls, spec: BudgetSpec) -> Budget:
        return cls(spec.name, parse_selector(spec.selector), spec.period, spec.maxCostUsd)

    def counter_key(self, now: datetime) -> str:
        start = period_start(self.period, now)
        return keys.budget_spend(self.name, start.strftime("%Y%m%dT%H"))

    def ttl_seconds(self) -> int:
        return int((_period_length(self.period) + _KEEP_AFTER).total_seconds())

    def applies_to(self, labels: Mapping[str, str]) -> bool:
        return self.selector.matches(labels)
