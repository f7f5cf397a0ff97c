"""What a response costs: a per-model price table (USD per million tokens) and the arithmetic.

Four prices per model, as Anthropic bills them: input, output, cache write (5-minute cache
writes) and cache read. A model is priced by the longest table key its name starts with, so
``claude-sonnet-4-5-20250929`` finds ``claude-sonnet-4-5``; a model no key matches is priced by
``default``, the dearest family, so a budget never under-counts an unknown model.
``FLYSWARM_GATEWAY_PRICES`` overrides or extends the table (same shape, JSON).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from api.store_gateway import MeteredUsage


class ModelPrice(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cacheWrite: float = Field(ge=0)
    cacheRead: float = Field(ge=0)


def _p(i: float, o: float, w: float, r: float) -> ModelPrice:
    return ModelPrice(input=i, output=o, cacheWrite=w, cacheRead=r)


BUILTIN_PRICES: dict[str, ModelPrice] = {
    "claude-opus-4-5": _p(5, 25, 6.25, 0.5),
    "claude-opus-4-1": _p(15, 75, 18.75, 1.5),
    "claude-opus-4": _p(15, 75, 18.75, 1.5),
    "claude-opus": _p(15, 75, 18.75, 1.5),
    "claude-sonnet": _p(3, 15, 3.75, 0.3),
    "claude-3-7-sonnet": _p(3, 15, 3.75, 0.3),
    "claude-3-5-sonnet": _p(3, 15, 3.75, 0.3),
    "claude-haiku-4-5": _p(1, 5, 1.25, 0.1),
    "claude-haiku": _p(1, 5, 1.25, 0.1),
    "claude-3-5-haiku": _p(0.8, 4, 1, 0.08),
    "claude-3-haiku": _p(0.25, 1.25, 0.3, 0.03),
    "default": _p(15, 75, 18.75, 1.5),
}


class PriceTable:
    """The built-in table with the overrides applied; ``price`` turns usage into USD."""

    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self.prices = {**BUILTIN_PRICES, **(overrides or {})}
        # Longest prefix first, so the most specific key wins.
        self._keys = sorted((k for k in self.prices if k != "default"), key=len, reverse=True)

    def for_model(self, model: str) -> ModelPrice:
        for key in self._keys:
            if model.startswith(key):
                return self.prices[key]
        return self.prices["default"]

    def cost(self, model: str, usage: MeteredUsage) -> float:
        price = self.for_model(model)
        return (
            usage.input_tokens * price.input
            + usage.output_tokens * price.output
            + usage.cache_creation_input_tokens * price.cacheWrite
            + usage.cache_read_input_tokens * price.cacheRead
        ) / 1_000_000
