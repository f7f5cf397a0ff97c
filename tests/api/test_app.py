"""The HTTP API against a real Redis: the seed's calls, create/apply/get/list/delete, messages, auth.

Requests go through httpx's ASGITransport to the app; assertions look at the answers *and* at what
ended up in Redis.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from api import keys
from api.app import create_app
from api.models import AgentReport, Phase, SessionStatus
from api.wire import APPLY_RESULT_HEADER
from tests.api.app_harness import api_settings
from tests.store import Store

#: The representative API tests that also run on a Redis Cluster (the store tests cover every call).
on_both = pytest.mark.redis_modes("single", "cluster")

TOKENS = ["tok-alpha-0123456789", "tok-bravo-9876543210"]


def client_for(app: Any, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", headers=headers)


@pytest.fixture
async def api(store: Store, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(api_settings(redis_url, prompt_max_chars=1000), store)
    async with client_for(app) as client:
        yield client


@pytest.fixture
async def authed_app(store: Store, redis_url: str) -> Any:
    return create_app(api_settings(redis_url, api_tokens=",".join(TOKENS)), store)


def error_fields(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["requestId"] == response.headers["x-request-id"]
    return {f["field"]: f["reason"] for f in body["error"]["fields"]}


def manifest(name: str | None = None, prompt: str = "do it", **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": spec.pop("labels", {})}
    if name:
        metadata["name"] = name
    return {
        "apiVersion": "flyswarm.dev/v1",
        "kind": "Session",
        "metadata": metadata,
        "spec": {"prompt": prompt, **spec},
    }


# -- the seed README's calls ----------------------------------------------------------------------


@on_both
async def test_seed_readme_curl_calls_answer_as_documented(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    health = await api.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}

    created = await api.post(
        "/sessions",
        content=json.dumps({"prompt": "List files in the current directory"}),
        headers={"Content-Type": "application/json"},
    )
    assert created.status_code == 201
    body = created.json()
    session_id = body["session_id"]
    assert body["machine_id"] is None
    assert body["created_at"] == body["metadata"]["createdAt"]
    assert body["metadata"]["name"] == session_id and body["spec"]["prompt"].startswith("List files")
    assert created.headers["location"] == f"/sessions/{session_id}"
    assert await redis_client.zscore(keys.INDEX, session_id) == 0
    stored_spec = json.loads(await redis_client.hget(keys.session(session_id), "spec"))
    assert stored_spec["prompt"] == "List files in the current directory" and stored_spec["mode"] == "task"

    fetched = await api.get(f"/sessions/{session_id}")
    assert fetched.status_code == 200
    view = fetched.json()
    assert view["session_id"] == session_id
    assert view["status"]["phase"] == "Pending" and view["state"] is None
    assert view["machine_id"] is None and view["created_at"] == body["created_at"]


async def test_post_parses_json_whatever_the_content_type_curl_sends(api: httpx.AsyncClient) -> None:
    # `curl -d` without -H sends application/x-www-form-urlencoded.
    response = await api.post(
        "/sessions",
        content=b'{"prompt": "hi", "session_id": "curl-default"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 201 and response.json()["session_id"] == "curl-default"


async def test_post_short_form_takes_spec_fields_and_labels(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    response = await api.post(
        "/sessions",
        json={
            "prompt": "chat with me",
            "session_id": "short-chat",
            "mode": "chat",
            "maxTurns": 3,
            "labels": {"team": "ios"},
        },
    )
    assert response.status_code == 201
    raw = await redis_client.hgetall(keys.session("short-chat"))
    assert json.loads(raw["spec"])["mode"] == "chat" and json.loads(raw["spec"])["maxTurns"] == 3
    assert json.loads(raw["labels"]) == {"team": "ios"}


@on_both
async def test_post_is_idempotent_for_the_same_id_and_spec(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    first = await api.post("/sessions", json={"prompt": "same", "session_id": "idem"})
    again = await api.post("/sessions", json={"prompt": "same", "session_id": "idem"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["metadata"]["uid"] == first.json()["metadata"]["uid"]
    assert again.json()["metadata"]["generation"] == 1
    assert await redis_client.zcard(keys.INDEX) == 1
    changes = await redis_client.xrange(keys.CHANGES)
    assert [fields["kind"] for _, fields in changes] == ["created"]


async def test_post_same_id_with_another_spec_is_a_conflict_and_changes_nothing(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    await api.post("/sessions", json={"prompt": "first", "session_id": "clash"})
    response = await api.post("/sessions", json={"prompt": "second", "session_id": "clash"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
    assert "spec" in error_fields(response)
    assert json.loads(await redis_client.hget(keys.session("clash"), "spec"))["prompt"] == "first"
    relabeled = await api.post(
        "/sessions", json={"prompt": "first", "session_id": "clash", "labels": {"a": "b"}}
    )
    assert relabeled.status_code == 409 and "metadata.labels" in error_fields(relabeled)


async def test_post_full_manifest_creates_the_session_with_its_labels(
    api: httpx.AsyncClient, store: Store
) -> None:
    response = await api.post("/sessions", json=manifest("from-manifest", labels={"team": "ios"}, maxTurns=7))
    assert response.status_code == 201
    stored = await store.get("from-manifest")
    assert stored is not None and stored.metadata.labels == {"team": "ios"} and stored.spec.maxTurns == 7


async def test_post_generates_distinct_ids_when_none_is_given(api: httpx.AsyncClient, store: Store) -> None:
    ids = {(await api.post("/sessions", json={"prompt": "p"})).json()["session_id"] for _ in range(3)}
    assert len(ids) == 3
    assert sorted(ids) == sorted(await store.all_ids())


async def test_post_same_id_as_a_session_being_deleted_is_a_conflict(api: httpx.AsyncClient) -> None:
    await api.post("/sessions", json={"prompt": "p", "session_id": "going"})
    assert (await api.delete("/sessions/going")).status_code == 202
    response = await api.post("/sessions", json={"prompt": "p", "session_id": "going"})
    assert response.status_code == 409 and "being deleted" in response.json()["error"]["message"]


# -- PUT ------------------------------------------------------------------------------------------


@on_both
async def test_put_creates_then_configures_then_reports_unchanged(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    created = await api.put("/sessions/apply-me", json=manifest(prompt="v1"))
    assert created.status_code == 201 and created.headers[APPLY_RESULT_HEADER] == "created"
    assert created.json()["metadata"]["generation"] == 1

    same = await api.put("/sessions/apply-me", json=manifest("apply-me", prompt="v1"))
    assert same.status_code == 200 and same.headers[APPLY_RESULT_HEADER] == "unchanged"
    assert same.json()["metadata"]["generation"] == 1

    changed = await api.put("/sessions/apply-me", json=manifest(prompt="v2"))
    assert changed.status_code == 200 and changed.headers[APPLY_RESULT_HEADER] == "configured"
    assert changed.json()["metadata"]["generation"] == 2
    raw = await redis_client.hgetall(keys.session("apply-me"))
    assert raw["gen"] == "2" and json.loads(raw["spec"])["prompt"] == "v2"

    relabeled = await api.put("/sessions/apply-me", json=manifest(prompt="v2", labels={"tier": "free"}))
    assert relabeled.headers[APPLY_RESULT_HEADER] == "configured"
    assert relabeled.json()["metadata"]["generation"] == 2
    assert json.loads(await redis_client.hget(keys.session("apply-me"), "labels")) == {"tier": "free"}


async def test_get_output_can_be_applied_back_unchanged(api: httpx.AsyncClient) -> None:
    await api.put("/sessions/roundtrip", json=manifest(prompt="p", labels={"a": "b"}))
    current = (await api.get("/sessions/roundtrip")).json()
    response = await api.put("/sessions/roundtrip", json=current)
    assert response.status_code == 200 and response.headers[APPLY_RESULT_HEADER] == "unchanged"


async def test_put_with_another_name_in_the_body_is_invalid(api: httpx.AsyncClient, store: Store) -> None:
    response = await api.put("/sessions/path-id", json=manifest("body-id"))
    assert response.status_code == 422 and "metadata.name" in error_fields(response)
    short = await api.put("/sessions/path-id", json={"prompt": "p", "session_id": "other"})
    assert short.status_code == 422 and "session_id" in error_fields(short)
    assert await store.get("path-id") is None


async def test_put_changing_the_mode_of_an_existing_session_is_invalid(
    api: httpx.AsyncClient, store: Store
) -> None:
    await api.put("/sessions/moded", json=manifest(prompt="p"))
    response = await api.put("/sessions/moded", json=manifest(prompt="p", mode="chat"))
    assert response.status_code == 422 and "immutable" in error_fields(response)["spec.mode"]
    stored = await store.get("moded")
    assert stored is not None and stored.spec.mode == "task"


async def test_put_on_a_session_being_deleted_is_a_conflict(api: httpx.AsyncClient, store: Store) -> None:
    await api.put("/sessions/doomed", json=manifest(prompt="p"))
    await api.delete("/sessions/doomed")
    response = await api.put("/sessions/doomed", json=manifest(prompt="changed"))
    assert response.status_code == 409
    stored = await store.get("doomed")
    assert stored is not None and stored.spec.prompt == "p"


async def test_put_changing_the_spec_of_a_finished_session_is_a_conflict(
    api: httpx.AsyncClient, store: Store
) -> None:
    await api.put("/sessions/done-already", json=manifest(prompt="p"))
    await store.write_status("done-already", SessionStatus(phase=Phase.SUCCEEDED))
    assert (await api.put("/sessions/done-already", json=manifest(prompt="p"))).status_code == 200
    response = await api.put("/sessions/done-already", json=manifest(prompt="again"))
    assert response.status_code == 409
    stored = await store.get("done-already")
    assert stored is not None and stored.metadata.generation == 1


# -- GET / list / DELETE --------------------------------------------------------------------------


async def test_get_never_reports_a_finished_task_as_running(api: httpx.AsyncClient, store: Store) -> None:
    await api.post("/sessions", json={"prompt": "p", "session_id": "finishing"})
    await store.write_status("finishing", SessionStatus(phase=Phase.RUNNING, machineId="m-123"))
    await store.write_agent_report("finishing", AgentReport(state="done", resultText="42"))
    view = (await api.get("/sessions/finishing")).json()
    assert view["status"]["phase"] == "Succeeded" and view["state"] == "done"
    assert view["machine_id"] == "m-123" and view["agent"]["resultText"] == "42"


async def test_get_unknown_session_is_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/sessions/nobody-here")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


@on_both
async def test_list_filters_by_selector_and_phase_and_pages_with_a_cursor(
    api: httpx.AsyncClient, store: Store
) -> None:
    for i in range(5):
        labels = {"team": "ios" if i % 2 == 0 else "web", "tier": "free" if i == 0 else "paid"}
        await api.put(f"/sessions/s{i}", json=manifest(prompt="p", labels=labels))
    await store.write_status("s2", SessionStatus(phase=Phase.RUNNING))

    ios = (await api.get("/sessions", params={"labelSelector": "team=ios,tier!=free"})).json()
    assert [s["session_id"] for s in ios["items"]] == ["s2", "s4"] and ios["cursor"] is None
    alias = (await api.get("/sessions", params={"selector": "team in (web)"})).json()
    assert [s["session_id"] for s in alias["items"]] == ["s1", "s3"]
    running = (await api.get("/sessions", params={"phase": "running"})).json()
    assert [s["session_id"] for s in running["items"]] == ["s2"]
    assert running["items"][0]["status"]["phase"] == "Running"

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/sessions", params=params)).json()
        seen += [s["session_id"] for s in page["items"]]
        pages += 1
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == ["s0", "s1", "s2", "s3", "s4"] and pages == 3


@on_both
async def test_delete_answers_202_and_sets_the_deletion_timestamp(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    await api.post("/sessions", json={"prompt": "p", "session_id": "to-delete"})
    response = await api.delete("/sessions/to-delete")
    assert response.status_code == 202 and response.json()["metadata"]["deletionTimestamp"] is not None
    assert await redis_client.hexists(keys.session("to-delete"), "deleted")
    changes = [fields["kind"] for _, fields in await redis_client.xrange(keys.CHANGES)]
    assert changes == ["created", "deleted"]
    assert (await api.delete("/sessions/to-delete")).status_code == 202
    assert (await api.get("/sessions/to-delete")).json()["metadata"]["deletionTimestamp"] is not None
    assert (await api.delete("/sessions/never-was")).status_code == 404


# -- messages -------------------------------------------------------------------------------------


@on_both
async def test_messages_go_to_the_inbox_of_a_chat_session(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    await api.post("/sessions", json={"session_id": "chatty", "mode": "chat"})
    response = await api.post("/sessions/chatty/messages", json={"text": "hello there"})
    assert response.status_code == 202
    message_id = response.json()["id"]
    inbox = await redis_client.xrange(keys.inbox("chatty"))
    assert [(mid, fields["text"]) for mid, fields in inbox] == [(message_id, "hello there")]


async def test_messages_to_task_finished_or_unknown_sessions_are_refused(
    api: httpx.AsyncClient, store: Store, redis_client: aioredis.Redis
) -> None:
    await api.post("/sessions", json={"prompt": "p", "session_id": "tasky"})
    task = await api.post("/sessions/tasky/messages", json={"text": "hi"})
    assert task.status_code == 409 and "spec.mode" in error_fields(task)

    await api.post("/sessions", json={"session_id": "chat-over", "mode": "chat"})
    await store.write_status("chat-over", SessionStatus(phase=Phase.FAILED))
    finished = await api.post("/sessions/chat-over/messages", json={"text": "hi"})
    assert finished.status_code == 409

    assert (await api.post("/sessions/ghost/messages", json={"text": "hi"})).status_code == 404
    assert await redis_client.exists(keys.inbox("tasky"), keys.inbox("chat-over")) == 0


async def test_message_bodies_are_validated_by_field(api: httpx.AsyncClient) -> None:
    await api.post("/sessions", json={"session_id": "chat-v", "mode": "chat"})
    empty = await api.post("/sessions/chat-v/messages", json={"text": ""})
    assert empty.status_code == 422 and "text" in error_fields(empty)
    extra = await api.post("/sessions/chat-v/messages", json={"text": "x", "txt": "y"})
    assert extra.status_code == 422 and error_fields(extra)["txt"] == "unknown field"
    too_long = await api.post("/sessions/chat-v/messages", json={"text": "x" * 1001})
    assert too_long.status_code == 422 and "1000" in error_fields(too_long)["text"]


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"prompt": "unterminated', 400, "body"),
        (b"[1, 2]", 400, "body"),
        (b"", 400, "body"),
        (b"\xff\xfe{}", 400, "body"),
        (b'{"prompt": "p", "bogus": 1}', 422, "bogus"),
        (b'{"spec": {"prompt": "p", "promt": "typo"}}', 422, "spec.promt"),
        (b'{"spec": {"prompt": "p"}, "extra": true}', 422, "extra"),
        (b'{"apiVersion": "v0", "spec": {"prompt": "p"}}', 422, "apiVersion"),
        (b'{"metadata": {"name": "Bad_Name"}, "spec": {"prompt": "p"}}', 422, "metadata.name"),
        (b'{"prompt": "p", "session_id": "UPPER"}', 422, "session_id"),
        (b'{"prompt": "p", "labels": {"bad key!": "v"}}', 422, "labels"),
        (b'{"spec": {"mode": "task"}}', 422, "spec.prompt"),
        (b'{"mode": "task"}', 422, "prompt"),
        (b'{"prompt": "p", "maxTurns": 0}', 422, "maxTurns"),
        (
            b'{"spec": {"prompt": "p", "machine": {"guest": {"memoryMb": 300}}}}',
            422,
            "spec.machine.guest.memoryMb",
        ),
    ],
)
async def test_bad_bodies_are_refused_naming_the_field(
    api: httpx.AsyncClient, store: Store, body: bytes, status: int, field: str
) -> None:
    response = await api.post("/sessions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert response.json()["error"]["code"] == ("malformed_json" if status == 400 else "invalid")
    assert field in error_fields(response)
    assert await store.count() == 0


async def test_a_prompt_over_the_limit_is_refused_naming_the_prompt(
    api: httpx.AsyncClient, store: Store
) -> None:
    full = await api.post("/sessions", json=manifest("long", prompt="x" * 1001))
    assert full.status_code == 422 and "1000" in error_fields(full)["spec.prompt"]
    short = await api.post("/sessions", json={"prompt": "x" * 1001})
    assert short.status_code == 422 and "prompt" in error_fields(short)
    assert (await api.post("/sessions", json={"prompt": "x" * 1000})).status_code == 201
    assert await store.count() == 1


async def test_a_body_over_the_limit_is_refused_while_reading(api: httpx.AsyncClient, store: Store) -> None:
    declared = await api.post(
        "/sessions", content=b"x" * (1024 * 1024 + 1), headers={"Content-Type": "application/json"}
    )
    assert declared.status_code == 413 and "body" in error_fields(declared)

    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        # No Content-Length: the server must stop reading once the limit is passed.
        nonlocal sent
        for _ in range(1600):  # 100 MiB if it were read to the end
            sent += 65536
            yield b" " * 65536

    streamed = await api.post("/sessions", content=endless(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert sent < 2 * 1024 * 1024
    assert await store.count() == 0


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"labelSelector": "team in (ios"}, "labelSelector"),
        ({"labelSelector": "bad key=1"}, "labelSelector"),
        ({"selector": "a,,b"}, "selector"),
        ({"cursor": "not-a-cursor!"}, "cursor"),
        ({"cursor": "djI6eA"}, "cursor"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"phase": "Sleepy"}, "phase"),
    ],
)
async def test_bad_list_parameters_are_400_naming_the_parameter(
    api: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    response = await api.get("/sessions", params=params)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    assert field in error_fields(response)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/sessions/Not_A_Label"),
        ("DELETE", "/sessions/-leading-dash"),
        ("PUT", "/sessions/" + "a" * 64),
        ("POST", "/sessions/UPPER/messages"),
        ("GET", "/sessions/UPPER/events"),
    ],
)
async def test_invalid_ids_in_the_path_are_400_naming_the_id(
    api: httpx.AsyncClient, method: str, path: str
) -> None:
    body = {"prompt": "p", "text": "t"} if method in ("PUT", "POST") else None
    response = await api.request(method, path, json=body)
    assert response.status_code == 400 and "id" in error_fields(response)


async def test_unknown_routes_and_methods_answer_with_the_error_body(api: httpx.AsyncClient) -> None:
    missing = await api.get("/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = await api.patch("/sessions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


async def test_an_unexpected_error_is_a_generic_500_with_a_request_id(store: Store, redis_url: str) -> None:
    app = create_app(api_settings(redis_url), store)

    async def explode() -> None:
        raise RuntimeError("internal detail that must stay on the server")

    app.add_api_route("/explode", explode)
    async with client_for(app) as client:
        response = await client.get("/explode", headers={"X-Request-ID": "trace-me-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "trace-me-1"
    body = response.json()
    assert body["error"]["code"] == "internal" and body["error"]["requestId"] == "trace-me-1"
    assert "internal detail" not in response.text and "Traceback" not in response.text


# -- auth -----------------------------------------------------------------------------------------


async def test_requests_without_a_valid_bearer_token_are_401(authed_app: Any, store: Store) -> None:
    async with client_for(authed_app) as client:
        missing = await client.post("/sessions", json={"prompt": "p", "session_id": "nope"})
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="flyswarm"'
        assert missing.json()["error"]["code"] == "unauthorized"
        for header in (
            "Bearer tok-alpha-012345678",  # a prefix of a valid token
            "Bearer tok-alpha-0123456789x",  # a valid token plus a suffix
            f"Basic {TOKENS[0]}",
            "Bearer ",
        ):
            wrong = await client.get("/sessions", headers={"Authorization": header})
            assert wrong.status_code == 401, header
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert (await client.get("/sessions/x", headers={"Authorization": "Bearer nope"})).status_code == 401
    assert await store.count() == 0


async def test_every_configured_token_is_accepted(authed_app: Any, store: Store) -> None:
    for i, token in enumerate(TOKENS):
        async with client_for(authed_app, Authorization=f"Bearer {token}") as client:
            response = await client.post("/sessions", json={"prompt": "p", "session_id": f"tok{i}"})
            assert response.status_code == 201
    assert sorted(await store.all_ids()) == ["tok0", "tok1"]


@on_both
async def test_health_and_readiness_are_open_and_metrics_is_not(
    authed_app: Any, store: Store, redis_url: str
) -> None:
    async with client_for(authed_app) as client:
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ok"}
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/openapi.json")).status_code == 401
    public = create_app(api_settings(redis_url, api_tokens=TOKENS[0], metrics_public=True), store)
    async with client_for(public) as client:
        assert (await client.get("/metrics")).status_code == 200


# -- observability --------------------------------------------------------------------------------


async def test_metrics_count_requests_by_route_and_sessions_by_phase(
    api: httpx.AsyncClient, store: Store
) -> None:
    await api.post("/sessions", json={"prompt": "p", "session_id": "m1"})
    await api.post("/sessions", json={"prompt": "p", "session_id": "m2"})
    await store.write_status("m2", SessionStatus(phase=Phase.RUNNING))
    await api.get("/sessions/m1")
    await api.get("/sessions/unknown")
    response = await api.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'flyswarm_api_requests_total{method="POST",route="/sessions",status="201"} 2.0' in text
    assert 'flyswarm_api_requests_total{method="GET",route="/sessions/{id}",status="404"} 1.0' in text
    assert 'flyswarm_api_sessions{phase="Pending"} 1.0' in text
    assert 'flyswarm_api_sessions{phase="Running"} 1.0' in text
    assert "flyswarm_api_request_duration_seconds_bucket" in text


async def test_openapi_document_describes_both_body_forms(api: httpx.AsyncClient) -> None:
    document = (await api.get("/openapi.json")).json()
    assert {"/sessions", "/sessions/{id}", "/sessions/{id}/messages", "/sessions/{id}/events"} <= set(
        document["paths"]
    )
    body = document["paths"]["/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {option["$ref"].rsplit("/", 1)[-1] for option in body["oneOf"]}
    assert refs == {"SessionManifest", "ShortForm"}
    assert {"SessionManifest", "ShortForm", "SessionSpec", "ErrorBody"} <= set(
        document["components"]["schemas"]
    )


async def test_the_request_id_is_echoed_and_made_when_missing(api: httpx.AsyncClient) -> None:
    given = await api.get("/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await api.get("/health", headers={"X-Request-ID": "bad id with spaces"})
    assert made.headers["x-request-id"] != "bad id with spaces" and len(made.headers["x-request-id"]) == 16


async def test_openapi_document_declares_what_the_auth_middleware_does(authed_app: Any) -> None:
    """The probes are open (an empty requirement overrides the global bearer); /metrics documents 401."""
    auth = {"Authorization": f"Bearer {TOKENS[0]}"}
    async with client_for(authed_app) as client:
        document = (await client.get("/openapi.json", headers=auth)).json()
        assert document["security"] == [{"bearer": []}]
        for path in ("/health", "/readyz"):
            assert document["paths"][path]["get"]["security"] == [], path
            assert (await client.get(path)).status_code == 200, path
        metrics = document["paths"]["/metrics"]["get"]
        assert "security" not in metrics  # the global bearer requirement applies
        assert metrics["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorBody"
        )
        assert (await client.get("/metrics")).status_code == 401
