"""Usage metered from what passes (JSON and stream), priced, totalled per session, published as
events, and budgets (the session's maxCostUsd, label budgets) refused at the gateway."""

from __future__ import annotations

import json

import httpx

from api.models import Session
from gateway.pricing import BUILTIN_PRICES
from tests.gateway.conftest import UPSTREAM_KEY, GatewayRig, agent_headers, messages_body, wait_for

# claude-test-* is priced by the table's "default" (the dearest family).
PRICE = BUILTIN_PRICES["default"]


def _cost(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * PRICE.input + output_tokens * PRICE.output) / 1_000_000


async def _stream_usage(http: httpx.AsyncClient, url: str, token: str, prompt: str = "hi") -> tuple[int, int]:
    """(input, output) tokens as the stream's message_start and message_delta carry them."""
    async with http.stream(
        "POST", f"{url}/v1/messages?beta=true", json=messages_body(prompt), headers=agent_headers(token)
    ) as response:
        assert response.status_code == 200
        raw = b"".join([c async for c in response.aiter_raw()])
    events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]
    start = next(e for e in events if e["type"] == "message_start")
    delta = next(e for e in events if e["type"] == "message_delta")
    return int(start["message"]["usage"]["input_tokens"]), int(delta["usage"]["output_tokens"])


async def test_a_non_streamed_response_is_metered(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-json")
    response = await http.post(
        f"{gw.url}/v1/messages", json=messages_body(stream=False), headers=agent_headers(token.value)
    )
    usage = response.json()["usage"]
    totals = await wait_for(lambda: rig.usage("s-json"))
    assert (totals.requests, totals.inputTokens, totals.outputTokens) == (
        1,
        usage["input_tokens"],
        usage["output_tokens"],
    )
    assert abs(totals.costUsd - _cost(usage["input_tokens"], usage["output_tokens"])) < 1e-12


async def test_streams_are_metered_and_totals_add_up(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-sse")
    first = await _stream_usage(http, gw.url, token.value, "one")
    second = await _stream_usage(http, gw.url, token.value, '[[scenario:text {"text": "a longer answer"}]]')

    async def two() -> object:
        usage = await rig.usage("s-sse")
        return usage if usage is not None and usage.requests == 2 else None

    totals = await wait_for(two)
    assert totals.inputTokens == first[0] + second[0]
    assert totals.outputTokens == first[1] + second[1]
    assert abs(totals.costUsd - _cost(*first) - _cost(*second)) < 1e-12
    # Shown on the resource as GET /sessions/{id} serves it.
    session = await rig.store.get("s-sse")
    assert isinstance(session, Session)
    assert session.model_dump(mode="json")["usage"]["requests"] == 2


async def test_each_response_appends_a_usage_event(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-events")
    input_tokens, output_tokens = await _stream_usage(http, gw.url, token.value)

    async def usage_events() -> list[object]:
        return [s.event for s in await rig.store.read_events("s-events") if s.event.type == "usage"]

    (event,) = await wait_for(usage_events)
    assert event.source == "gateway"
    assert event.data["inputTokens"] == input_tokens and event.data["outputTokens"] == output_tokens
    assert event.data["totalCostUsd"] == event.data["costUsd"] > 0


async def test_a_price_override_applies(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway(prices={"claude-test": {"input": 1, "output": 2, "cacheWrite": 0, "cacheRead": 0}})
    _session, token = await rig.session("s-price")
    input_tokens, output_tokens = await _stream_usage(http, gw.url, token.value)
    totals = await wait_for(lambda: rig.usage("s-price"))
    assert abs(totals.costUsd - (input_tokens * 1 + output_tokens * 2) / 1_000_000) < 1e-12


async def test_max_cost_is_enforced_with_at_most_one_response_over(
    rig: GatewayRig, http: httpx.AsyncClient
) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-budget", maxCostUsd=0.0001)
    first = await _stream_usage(http, gw.url, token.value)
    assert _cost(*first) >= 0.0001, "one response must cross this budget"
    refused = await http.post(
        f"{gw.url}/v1/messages", json=messages_body(), headers=agent_headers(token.value)
    )
    assert refused.status_code == 402
    assert refused.json()["error"]["type"] == "billing_error"
    assert "maxCostUsd" in refused.json()["error"]["message"]
    session = await rig.store.get("s-budget")
    assert session is not None and session.usage is not None
    # Exactly the one response that crossed the budget was spent, and the controller can see it.
    assert session.usage.requests == 1
    assert abs(session.usage.costUsd - _cost(*first)) < 1e-12
    assert session.budget_exhausted() is not None
    assert len([r for r in rig.model.state.requests if r["path"] == "/v1/messages"]) == 1


async def test_a_label_budget_stops_a_second_session_once_the_first_spent_it(
    rig: GatewayRig, http: httpx.AsyncClient
) -> None:
    budget = {"name": "ios-daily", "selector": "team=ios", "period": "day", "maxCostUsd": 0.0001}
    gw = rig.gateway(budgets=[budget])
    _a, token_a = await rig.session("s-ios-a", labels={"team": "ios"})
    _b, token_b = await rig.session("s-ios-b", labels={"team": "ios"})
    _c, token_c = await rig.session("s-android", labels={"team": "android"})
    await _stream_usage(http, gw.url, token_a.value)
    await wait_for(lambda: rig.usage("s-ios-a"))
    refused = await http.post(
        f"{gw.url}/v1/messages", json=messages_body(), headers=agent_headers(token_b.value)
    )
    assert refused.status_code == 402
    assert "ios-daily" in refused.json()["error"]["message"]
    usage_b = await rig.usage("s-ios-b")
    assert usage_b is not None and usage_b.budgetExceeded == "ios-daily" and usage_b.requests == 0
    session_b = await rig.store.get("s-ios-b")
    assert session_b is not None and session_b.budget_exhausted() is not None
    # Another team's session is not bound by it.
    assert (await _stream_usage(http, gw.url, token_c.value))[0] > 0


async def test_metrics_count_tokens_and_cost_by_model_and_label(
    rig: GatewayRig, http: httpx.AsyncClient
) -> None:
    gw = rig.gateway(metrics_label="team")
    _session, token = await rig.session("s-metrics", labels={"team": "web"})
    input_tokens, _out = await _stream_usage(http, gw.url, token.value)
    counted = 'flyswarm_gateway_requests_total{path="/v1/messages",status="200"} 1.0'

    async def scrape() -> str | None:
        text = (await http.get(f"{gw.url}/metrics")).text
        return text if counted in text else None

    text = await wait_for(scrape)
    labels = 'kind="input",label="web",model="claude-test-1"'
    assert f"flyswarm_gateway_tokens_total{{{labels}}} {float(input_tokens)}" in text
    assert "flyswarm_gateway_upstream_seconds_bucket" in text
    assert 'flyswarm_gateway_cost_usd_total{label="web",model="claude-test-1"}' in text


async def test_a_response_the_agent_hangs_up_on_is_still_metered_whole(
    rig: GatewayRig, http: httpx.AsyncClient
) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-hangup")
    prompt = '[[scenario:text {"text": "%s"}]]' % ("many words " * 3000)
    _input, output_tokens = await _stream_usage(http, rig.model.url, UPSTREAM_KEY, prompt)
    async with http.stream(
        "POST", f"{gw.url}/v1/messages", json=messages_body(prompt), headers=agent_headers(token.value)
    ) as response:
        async for _chunk in response.aiter_raw():
            break  # the agent goes away after the first bytes
    # The upstream was read to its end: the final message_delta's output count was metered.
    totals = await wait_for(lambda: rig.usage("s-hangup"))
    assert totals.outputTokens == output_tokens > 1000
