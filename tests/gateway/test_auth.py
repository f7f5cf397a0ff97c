"""Who may use the gateway: only a live session's current token; the model sees only the real key."""

from __future__ import annotations

import httpx

from api.models import Phase, SessionStatus
from api.session_token import mint
from tests.gateway.conftest import UPSTREAM_KEY, GatewayRig, agent_headers, messages_body


async def _post(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    return await http.post(f"{url}/v1/messages?beta=true", json=messages_body(stream=False), headers=headers)


def _error_type(response: httpx.Response) -> str:
    body = response.json()
    assert body["type"] == "error"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return str(body["error"]["type"])


async def test_a_live_sessions_token_gets_through_and_the_model_sees_only_the_upstream_key(
    rig: GatewayRig, http: httpx.AsyncClient
) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-good")
    response = await _post(http, gw.url, agent_headers(token.value))
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "message"
    # The scripted model refuses any key but UPSTREAM_KEY, so a 200 means the gateway swapped it.
    record = rig.model.state.requests[-1]
    assert record["status"] == 200 and record["query"] == "beta=true"
    assert "anthropic-beta" in record["header_names"]


async def test_the_scripted_model_refuses_a_session_token_and_any_other_key(
    rig: GatewayRig, http: httpx.AsyncClient
) -> None:
    _session, token = await rig.session("s-direct")
    for key in (token.value, "sk-some-other-key"):
        response = await _post(http, rig.model.url, agent_headers(key))
        assert response.status_code == 401
        assert _error_type(response) == "authentication_error"
    assert (await _post(http, rig.model.url, agent_headers(UPSTREAM_KEY))).status_code == 200


async def test_the_bearer_form_is_accepted_too(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-bearer")
    headers = agent_headers(token.value)
    del headers["x-api-key"]
    headers["authorization"] = f"Bearer {token.value}"
    assert (await _post(http, gw.url, headers)).status_code == 200


async def test_missing_malformed_and_forged_tokens_are_401(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    await rig.session("s-a")
    _b, token_b = await rig.session("s-b")
    headers = agent_headers("x")
    del headers["x-api-key"]
    forged = token_b.value.replace("_s-b_", "_s-a_")  # session b's secret, naming session a
    for h in (
        headers,
        agent_headers("sk-ant-not-a-token"),
        agent_headers(forged),
        agent_headers(mint("s-a").value),
    ):
        response = await _post(http, gw.url, h)
        assert response.status_code == 401
        assert _error_type(response) == "authentication_error"
    assert len(rig.model.state.requests) == 0


async def test_a_new_mint_replaces_the_old_token_and_revocation_ends_it(
    rig: GatewayRig, http: httpx.AsyncClient
) -> None:
    gw = rig.gateway()
    _session, first = await rig.session("s-remint")
    second = await rig.store.mint_session_token("s-remint")
    assert (await _post(http, gw.url, agent_headers(first.value))).status_code == 401
    assert (await _post(http, gw.url, agent_headers(second.value))).status_code == 200
    assert await rig.store.revoke_session_token("s-remint")
    assert (await _post(http, gw.url, agent_headers(second.value))).status_code == 401


async def test_a_finished_or_deleted_sessions_token_is_403(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    _s1, finished = await rig.session("s-finished")
    _s2, deleted = await rig.session("s-deleted")
    status = SessionStatus(phase=Phase.SUCCEEDED)
    assert await rig.store.write_status("s-finished", status) == "written"
    await rig.store.mark_deleted("s-deleted")
    for token in (finished, deleted):
        response = await _post(http, gw.url, agent_headers(token.value))
        assert response.status_code == 403
        assert _error_type(response) == "permission_error"
    # Once removed, nothing of the session is left to verify against.
    await rig.store.remove("s-deleted")
    assert (await _post(http, gw.url, agent_headers(deleted.value))).status_code == 401
    assert len(rig.model.state.requests) == 0


async def test_only_the_clis_endpoints_are_proxied(rig: GatewayRig, http: httpx.AsyncClient) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-paths")
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/complete"), ("HEAD", "/api/hello")):
        response = await http.request(method, f"{gw.url}{path}", headers=agent_headers(token.value))
        assert response.status_code == 404
        if method != "HEAD":
            assert _error_type(response) == "not_found_error"
    response = await http.get(f"{gw.url}/v1/messages", headers=agent_headers(token.value))
    assert response.status_code == 405
    assert len(rig.model.state.requests) == 0
