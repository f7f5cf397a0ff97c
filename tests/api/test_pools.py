"""The Pool resource over HTTP against a real Redis: create/apply/get/list/delete, validation, the feed.

Requests go through httpx's ASGITransport to the app; assertions look at the answers *and* at what
ended up in Redis (the pool hash, the POOLS index, the change feed).
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
from api.wire import APPLY_RESULT_HEADER
from tests.api.app_harness import api_settings
from tests.api.test_app import TOKENS, client_for, error_fields
from tests.store import Store


@pytest.fixture
async def api(store: Store, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(api_settings(redis_url), store)) as client:
        yield client


def pool(name: str | None = "ci-fra", labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": labels or {}}
    if name is not None:
        metadata["name"] = name
    body = {
        "template": {"region": "fra", "guest": {"cpuKind": "shared", "cpus": 1, "memoryMb": 1024}},
        "selector": {"matchLabels": {"team": "ci"}},
        "size": 20,
        "mode": "suspended",
        **spec,
    }
    return {"apiVersion": "flyswarm.dev/v1", "kind": "Pool", "metadata": metadata, "spec": body}


async def feed(redis_client: aioredis.Redis) -> list[dict[str, str]]:
    return [dict(fields) for _, fields in await redis_client.xrange(keys.CHANGES)]


@pytest.mark.redis_modes("single", "cluster")
async def test_pool_create_apply_get_delete_round_trip_writes_the_record_index_and_feed(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    created = await api.post("/pools", json=pool(labels={"team": "ci"}))
    assert created.status_code == 201 and created.headers["location"] == "/pools/ci-fra"
    body = created.json()
    assert (body["kind"], body["metadata"]["name"], body["metadata"]["generation"]) == ("Pool", "ci-fra", 1)
    assert body["spec"]["size"] == 20 and body["status"]["ready"] == 0
    stored = await redis_client.hgetall(keys.pool("ci-fra"))
    assert json.loads(stored["spec"])["template"]["guest"]["memoryMb"] == 1024 and stored["gen"] == "1"
    assert "status" not in stored and "deleted" not in stored  # the API never writes the status
    assert await redis_client.zscore(keys.POOLS, "ci-fra") == 0
    assert await feed(redis_client) == [{"pool": "ci-fra", "kind": "created"}]

    fetched = (await api.get("/pools/ci-fra")).json()
    assert fetched["metadata"] == body["metadata"] and fetched["spec"] == body["spec"]
    again = await api.post("/pools", json=pool(labels={"team": "ci"}))
    assert again.status_code == 200 and again.json()["metadata"]["uid"] == body["metadata"]["uid"]
    other = await api.post("/pools", json=pool(labels={"team": "ci"}, size=5))
    assert other.status_code == 409 and error_fields(other) == {
        "spec": "differs from the existing pool's spec"
    }

    # GET's output applies back unchanged: no generation bump, no feed entry.
    same = await api.put("/pools/ci-fra", json=fetched)
    assert same.status_code == 200 and same.headers[APPLY_RESULT_HEADER] == "unchanged"
    resized = await api.put("/pools/ci-fra", json=pool(labels={"team": "ci"}, size=30, maxSize=40))
    assert (
        resized.headers[APPLY_RESULT_HEADER] == "configured" and resized.json()["metadata"]["generation"] == 2
    )
    relabelled = await api.put(
        "/pools/ci-fra", json=pool(labels={"team": "ci", "env": "prod"}, size=30, maxSize=40)
    )
    assert relabelled.headers[APPLY_RESULT_HEADER] == "configured"
    assert relabelled.json()["metadata"]["generation"] == 2  # labels are not the spec
    assert await redis_client.hget(keys.pool("ci-fra"), "gen") == "2"
    assert [e["kind"] for e in await feed(redis_client)] == ["created", "updated", "updated"]

    deleted = await api.delete("/pools/ci-fra")
    assert deleted.status_code == 202 and deleted.json()["metadata"]["deletionTimestamp"] is not None
    assert await redis_client.hexists(keys.pool("ci-fra"), "deleted")
    assert (await api.delete("/pools/ci-fra")).status_code == 202  # once marked, marked
    assert (await feed(redis_client))[-1] == {"pool": "ci-fra", "kind": "deleted"}
    assert len(await feed(redis_client)) == 4
    # The controller drains and removes it; until then it is listed, and takes no change.
    assert await redis_client.zscore(keys.POOLS, "ci-fra") == 0
    assert (await api.put("/pools/ci-fra", json=pool(size=1))).status_code == 409
    assert (await api.post("/pools", json=pool(labels={"team": "ci"}))).status_code == 409
    for missing in (await api.get("/pools/nope"), await api.delete("/pools/nope")):
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_the_controllers_status_is_served_and_no_apply_overwrites_it(
    api: httpx.AsyncClient, store: Store, redis_client: aioredis.Redis
) -> None:
    assert (await api.put("/pools/warm", json=pool("warm"))).status_code == 201
    status = {"ready": 7, "booting": 2, "claimed": 11, "lastError": "create: 429", "observedGeneration": 1}
    await redis_client.hset(keys.pool("warm"), "status", json.dumps(status))

    changed = await api.put("/pools/warm", json={**pool("warm", size=25), "status": {"ready": 0}})
    assert changed.status_code == 200 and changed.headers[APPLY_RESULT_HEADER] == "configured"
    served = (await api.get("/pools/warm")).json()["status"]
    assert (served["ready"], served["booting"], served["claimed"], served["lastError"]) == (
        7,
        2,
        11,
        "create: 429",
    )
    assert json.loads(await redis_client.hget(keys.pool("warm"), "status")) == status
    # The controller's change-feed reader takes pool entries (they name no session).
    changes = await store.read_changes("0-0")
    assert [(c.pool, c.session_id, c.kind) for c in changes] == [
        ("warm", "", "created"),
        ("warm", "", "updated"),
    ]


async def test_every_validation_rule_is_a_422_naming_the_field_and_writes_nothing(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    big = {"region": "fra", "guest": {"cpuKind": "performance", "cpus": 2, "memoryMb": 4096}}
    cases: list[tuple[dict[str, Any], str, str]] = [
        (pool(template=big), "spec.template.guest.memoryMb", "Fly suspends only machines"),
        (pool(size=10, maxSize=5), "spec.maxSize", "at least size (10)"),
        (pool(size=-1), "spec.size", "greater than or equal to 0"),
        (pool(size=2001), "spec.size", "less than or equal to 2000"),
        (pool(mode="hibernate"), "spec.mode", "'suspended' or 'stopped'"),
        (pool(apps=["Bad_App"]), "spec.apps", "is not a Fly app name"),
        (pool(apps=["agents-a", "agents-a"]), "spec.apps", "names an app twice"),
        (pool(apps=[f"app-{i}" for i in range(33)]), "spec.apps", "at most 32"),
        (pool(template={"region": "frankfurt"}), "spec.template.region", "three-letter Fly region"),
        (pool(template={"guest": {"memoryMb": 1000}}), "spec.template.guest.memoryMb", "multiple of 256"),
        (pool(template={"guest": {"cpus": 0}}), "spec.template.guest.cpus", "greater than or equal to 1"),
        (pool(template={"image": "x" * 513}), "spec.template.image", "at most 512"),
        (pool(selector={"matchLabels": {"bad key!": "x"}}), "spec.selector.matchLabels", "label key"),
        (pool(replicas=3), "spec.replicas", "unknown field"),
        ({**pool(), "kind": "Session"}, "kind", "'Pool'"),
        (pool(name=None), "metadata.name", "required"),
        (pool(name="Bad_Name"), "metadata.name", "DNS label"),
        ({"apiVersion": "flyswarm.dev/v1", "kind": "Pool", "metadata": {"name": "x"}}, "spec", "required"),
    ]
    for body, field, reason in cases:
        response = await api.post("/pools", json=body)
        assert response.status_code == 422, (field, response.text)
        fields = error_fields(response)
        assert field in fields and reason in fields[field], (field, fields)
    # A stopped pool may hold machines Fly cannot suspend.
    assert (await api.post("/pools", json=pool("big", template=big, mode="stopped"))).status_code == 201

    wrong_name = await api.put("/pools/other", json=pool("ci-fra"))
    assert wrong_name.status_code == 422 and "metadata.name" in error_fields(wrong_name)
    bad_path = await api.put("/pools/Bad_Name", json=pool(None))
    assert bad_path.status_code == 400 and "name" in error_fields(bad_path)
    assert (await api.post("/pools", content=b"[1]")).status_code == 400
    assert await redis_client.zrange(keys.POOLS, 0, -1) == ["big"]
    assert len(await feed(redis_client)) == 1


@pytest.mark.redis_modes("single", "cluster")
async def test_list_filters_by_label_selector_and_pages_with_a_cursor(api: httpx.AsyncClient) -> None:
    for i in range(5):
        labels = {"team": "ci" if i % 2 == 0 else "web", "tier": "free" if i == 0 else "paid"}
        assert (await api.put(f"/pools/p{i}", json=pool(f"p{i}", labels=labels))).status_code == 201

    ci = (await api.get("/pools", params={"labelSelector": "team=ci,tier!=free"})).json()
    assert [p["metadata"]["name"] for p in ci["items"]] == ["p2", "p4"] and ci["cursor"] is None
    web = (await api.get("/pools", params={"selector": "team in (web)"})).json()
    assert [p["metadata"]["name"] for p in web["items"]] == ["p1", "p3"]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/pools", params=params)).json()
        seen += [p["metadata"]["name"] for p in page["items"]]
        pages += 1
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == ["p0", "p1", "p2", "p3", "p4"] and pages == 3

    for params, field in (
        ({"cursor": "!!nope"}, "cursor"),
        ({"labelSelector": "team in ci"}, "labelSelector"),
        ({"limit": 0}, "limit"),
    ):
        response = await api.get("/pools", params=params)
        assert response.status_code == 400 and field in error_fields(response), params


async def test_pool_routes_need_a_token_and_are_in_the_openapi_document(store: Store, redis_url: str) -> None:
    app = create_app(api_settings(redis_url, api_tokens=",".join(TOKENS)), store)
    async with client_for(app) as client:
        assert (await client.get("/pools")).status_code == 401
        assert (await client.put("/pools/x", json=pool("x"))).status_code == 401
        document = (
            await client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKENS[0]}"})
        ).json()
    paths = document["paths"]
    assert set(paths["/pools"]) == {"get", "post"} and set(paths["/pools/{name}"]) == {"get", "put", "delete"}
    body = paths["/pools"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/PoolManifest")
    schemas = document["components"]["schemas"]
    assert {
        "PoolManifest",
        "PoolSpec",
        "PoolTemplate",
        "PoolSelector",
        "Pool",
        "PoolStatus",
        "PoolList",
    } <= set(schemas)
    assert schemas["PoolSpec"]["properties"]["mode"]["enum"] == ["suspended", "stopped"]
