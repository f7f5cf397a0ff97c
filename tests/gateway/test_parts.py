"""The gateway's pure parts: tokens, the stream meter, prices, budget periods, settings errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from api.models import Metadata, Phase, Session, SessionSpec, SessionStatus, utcnow
from api.session_token import Refusal, check, digest_matches, mint, parse
from gateway.budgets import Budget, BudgetSpec, period_start
from gateway.metering import JsonMeter, StreamMeter
from gateway.pricing import BUILTIN_PRICES, PriceTable
from gateway.settings import GatewaySettings


def _sse(event: str, data: dict[str, object]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def test_a_token_names_its_session_and_hides_its_secret() -> None:
    token = mint("s-1")
    assert parse(token.value) == token and token.session_id == "s-1"
    assert token.value not in repr(token) and token.value not in str(token)
    assert digest_matches(token.value, token.digest) and not digest_matches(token.value, mint("s-1").digest)
    assert not digest_matches(token.value, None)
    for bad in ("", "fst_s-1", "fst_S_1_" + "0" * 64, "sk-ant-x", token.value + "0", "fst_s-1_" + "g" * 64):
        assert parse(bad) is None, bad


def test_the_stream_meter_reads_usage_whatever_the_chunking() -> None:
    stream = (
        _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "model": "claude-sonnet-4-5",
                    "usage": {
                        "input_tokens": 100,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": 20,
                        "cache_read_input_tokens": 300,
                    },
                },
            },
        )
        + _sse("content_block_delta", {"type": "content_block_delta", "delta": {"text": "message_delta"}})
        + _sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 42}})
    )
    for size in (1, 7, len(stream)):
        meter = StreamMeter()
        for pos in range(0, len(stream), size):
            meter.feed(stream[pos : pos + size])
        usage = meter.usage()
        assert meter.model == "claude-sonnet-4-5"
        assert (usage.input_tokens, usage.output_tokens) == (100, 42)
        assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (20, 300)


def test_the_json_meter_reads_a_whole_message() -> None:
    meter = JsonMeter()
    body = json.dumps({"model": "m", "usage": {"input_tokens": 5, "output_tokens": 6}}).encode()
    meter.feed(body[:10])
    meter.feed(body[10:])
    meter.finish()
    assert (meter.model, meter.usage().input_tokens, meter.usage().output_tokens) == ("m", 5, 6)


def test_prices_go_by_the_longest_prefix_and_unknown_models_by_the_dearest() -> None:
    table = PriceTable()
    assert table.for_model("claude-opus-4-5-20251101") == BUILTIN_PRICES["claude-opus-4-5"]
    assert table.for_model("claude-opus-4-1-20250805") == BUILTIN_PRICES["claude-opus-4-1"]
    assert table.for_model("who-knows") == BUILTIN_PRICES["default"]
    assert max(p.output for p in BUILTIN_PRICES.values()) == BUILTIN_PRICES["default"].output


def test_periods_start_on_utc_calendar_boundaries() -> None:
    now = datetime(2026, 12, 1, 17, 42, 9, tzinfo=UTC)
    assert period_start("hour", now) == datetime(2026, 12, 1, 17, tzinfo=UTC)
    assert period_start("day", now) == datetime(2026, 12, 1, tzinfo=UTC)
    assert period_start("month", now) == datetime(2026, 12, 1, tzinfo=UTC)
    budget = Budget.from_spec(BudgetSpec(name="ios", selector="team=ios", period="day", maxCostUsd=5))
    later = datetime(2026, 12, 2, 0, 0, 1, tzinfo=UTC)
    assert budget.counter_key(now) != budget.counter_key(later)
    assert budget.applies_to({"team": "ios"}) and not budget.applies_to({"team": "web"})


def test_bad_budget_and_price_settings_name_the_field() -> None:
    with pytest.raises(ValidationError, match="selector"):
        GatewaySettings(budgets='[{"name": "b", "selector": "team in (", "period": "day", "maxCostUsd": 1}]')
    with pytest.raises(ValidationError, match="period"):
        GatewaySettings(budgets='[{"name": "b", "period": "week", "maxCostUsd": 1}]')
    with pytest.raises(ValidationError, match="unique"):
        twice = [{"name": "b", "period": p, "maxCostUsd": 1} for p in ("day", "hour")]
        GatewaySettings(budgets=json.dumps(twice))
    with pytest.raises(ValidationError, match="output"):
        GatewaySettings(prices='{"m": {"input": 1, "cacheWrite": 0, "cacheRead": 0}}')


def test_the_token_verdict_is_401_for_bad_tokens_and_403_for_the_wrong_session_or_time() -> None:
    token = mint("s-1")
    live = Session(metadata=Metadata(name="s-1"), spec=SessionSpec(prompt="x"))
    finished = live.model_copy(update={"status": SessionStatus(phase=Phase.FAILED)})
    deleted = Session(metadata=Metadata(name="s-1", deletionTimestamp=utcnow()), spec=SessionSpec(prompt="x"))
    assert check(token.value, token.digest, live) == token
    assert check(token.value, token.digest, live, for_session="s-1") == token
    cases = [
        (check(None, None, None), 401),
        (check("sk-nope", token.digest, live), 401),
        (check(token.value, None, live), 401),
        (check(token.value, mint("s-1").digest, live), 401),
        (check(token.value, token.digest, None), 403),
        (check(token.value, token.digest, deleted), 403),
        (check(token.value, token.digest, finished), 403),
        (check(token.value, token.digest, live, for_session="s-2"), 403),
    ]
    for verdict, status in cases:
        assert isinstance(verdict, Refusal) and verdict.status == status, verdict
        assert token.value not in verdict.message
