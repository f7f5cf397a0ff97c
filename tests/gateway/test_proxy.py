"""What passes through: streams byte for byte, errors and retry-after as they came, count_tokens,
timeouts and an unreachable upstream as Anthropic-shaped errors."""

from __future__ import annotations

import re

import httpx

from api.models import SessionSpec
from local.redis_server import free_port
from tests.gateway.conftest import UPSTREAM_KEY, GatewayRig, agent_headers, messages_body
from tests.restartable_redis import RestartableRedis
from tests.store import Store

_IDS = re.compile(rb"(msg|toolu)_[0-9a-f]{24}")


async def _raw(
    http: httpx.AsyncClient, url: str, key: str, body: dict[str, object]
) -> tuple[httpx.Response, bytes]:
    async with http.stream(
        "POST", f"{url}/v1/messages?beta=true", json=body, headers=agent_headers(key)
    ) as r:
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    return r, raw


async def test_a_stream_passes_through_byte_for_byte(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-stream")
    body = messages_body('[[scenario:text {"text": "a reply long enough to come in several deltas"}]]')
    via, via_raw = await _raw(http, gw.url, token.value, body)
    direct, direct_raw = await _raw(http, rig.model.url, UPSTREAM_KEY, body)
    assert via.status_code == direct.status_code == 200
    assert via.headers["content-type"] == direct.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert via.headers["request-id"].startswith("req_")
    # The message id is random per response; everything else is the same bytes.
    assert _IDS.sub(b"ID", via_raw) == _IDS.sub(b"ID", direct_raw)
    assert via_raw.count(b"event: content_block_delta") >= 4


async def test_upstream_errors_and_retry_after_are_relayed(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-errors")
    for status in (429, 529, 500):
        directive = f'[[scenario:error {{"status": {status}, "retry_after": 7, "count": 1, "id": "gw"}}]]'
        response = await http.post(
            f"{gw.url}/v1/messages",
            json=messages_body(directive, stream=False),
            headers=agent_headers(token.value),
        )
        assert response.status_code == status
        assert response.headers["retry-after"] == "7"
        assert response.json() == {
            "type": "error",
            "error": {
                "type": {429: "rate_limit_error", 529: "overloaded_error", 500: "api_error"}[status],
                "message": f"scripted error {status}",
            },
        }
    # An error response is no usage.
    assert await rig.usage("s-errors") is None


async def test_count_tokens_is_proxied_and_not_metered(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-count")
    response = await http.post(
        f"{gw.url}/v1/messages/count_tokens?beta=true",
        json={"model": "claude-test-1", "messages": [{"role": "user", "content": "hello"}]},
        headers=agent_headers(token.value),
    )
    assert response.status_code == 200
    assert response.json()["input_tokens"] > 0
    assert rig.model.state.requests[-1]["path"] == "/v1/messages/count_tokens"
    assert await rig.usage("s-count") is None


async def test_an_upstream_silent_past_the_idle_timeout_is_504(
    rig: GatewayRig, http: httpx.AsyncClient
) -> None:
    gw = rig.gateway(idle_timeout_seconds=0.5)
    _session, token = await rig.session("s-hang")
    response = await http.post(
        f"{gw.url}/v1/messages", json=messages_body("[[scenario:hang]]"), headers=agent_headers(token.value)
    )
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"


async def test_an_unreachable_upstream_is_502(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    _session, token = await rig.session("s-down")
    response = await http.post(
        f"{gw.url}/v1/messages", json=messages_body(), headers=agent_headers(token.value)
    )
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert token.value not in response.text and UPSTREAM_KEY not in response.text


async def test_a_redis_outage_is_503_and_recovers(
    rig: GatewayRig, http: httpx.AsyncClient, own_redis: RestartableRedis
) -> None:
    gw = rig.gateway(redis_url=own_redis.url, redis_timeout_seconds=1)
    store = Store.from_url(own_redis.url)
    try:
        await store.create_or_get(store.new_session("s-outage", SessionSpec(prompt="x")))
        token = await store.mint_session_token("s-outage")
        own_redis.kill()
        response = await http.post(
            f"{gw.url}/v1/messages", json=messages_body(stream=False), headers=agent_headers(token.value)
        )
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "api_error"
        own_redis.start()
        ok = await http.post(
            f"{gw.url}/v1/messages", json=messages_body(stream=False), headers=agent_headers(token.value)
        )
        assert ok.status_code == 200
    finally:
        await store.close()
