"""Webhooks over HTTP against a real Redis: the Webhook resource, spec.notify, validation, secrets.

Also the delivery queue's store scripts end to end on one node and on a Redis Cluster: a status
write puts a phase change in the session's outbox (same script, same slot), the fan-out queues it,
a claim hides it, completions record attempts, and ``GET /webhooks/{name}/deliveries`` shows them.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from api import keys
from api.app import create_app
from api.models import Phase, SessionSpec, SessionStatus
from api.notify_models import generate_secret, webhook_target
from api.store_controller import ControllerStore
from api.wire import APPLY_RESULT_HEADER
from controller.webhook_fanout import deliveries_for
from tests.api.app_harness import api_settings
from tests.api.test_app import client_for, error_fields, manifest
from tests.store import Store
from tests.webhook_receiver import rendered_logs

RECEIVER = "http://127.0.0.1:9/hook"  # loopback: admitted only with FLYSWARM_WEBHOOK_ALLOW_PRIVATE


@pytest.fixture
async def api(store: Store, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(api_settings(redis_url, webhook_allow_private=True), store)
    async with client_for(app) as client:
        yield client


def webhook(name: str | None = "ci-hook", **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": spec.pop("labels", {})}
    if name is not None:
        metadata["name"] = name
    body = {"url": RECEIVER, "selector": {"matchLabels": {"team": "ci"}}, **spec}
    return {"apiVersion": "flyswarm.dev/v1", "kind": "Webhook", "metadata": metadata, "spec": body}


@pytest.mark.redis_modes("single", "cluster")
async def test_webhook_crud_paging_and_the_secret_shown_only_once(
    api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    created = await api.post("/webhooks", json=webhook())
    assert created.status_code == 201, created.text
    body = created.json()
    generated = body["status"]["secret"]
    assert generated.startswith("whsec_") and body["status"]["secretSet"] is True
    assert "secret" not in body["spec"]
    assert (await redis_client.hget(keys.webhook("ci-hook"), "secret")) == generated

    fetched = await api.get("/webhooks/ci-hook")
    assert fetched.status_code == 200 and generated not in fetched.text
    assert fetched.json()["status"] == {"secretSet": True, "secret": None}
    again = await api.post("/webhooks", json=webhook())
    assert again.status_code == 200 and generated not in again.text
    other = await api.post("/webhooks", json=webhook(events=["session.finished"]))
    assert other.status_code == 409 and error_fields(other) == {"spec": "differs from the stored webhook"}

    # PUT without a secret keeps the stored one; with one, replaces it (and never echoes it).
    chosen = generate_secret()
    kept = await api.put("/webhooks/ci-hook", json=webhook(events=["session.finished"]))
    assert kept.headers[APPLY_RESULT_HEADER] == "configured" and kept.json()["metadata"]["generation"] == 2
    assert (await redis_client.hget(keys.webhook("ci-hook"), "secret")) == generated
    replaced = await api.put("/webhooks/ci-hook", json=webhook(events=["session.finished"], secret=chosen))
    assert replaced.headers[APPLY_RESULT_HEADER] == "configured" and chosen not in replaced.text
    assert (await redis_client.hget(keys.webhook("ci-hook"), "secret")) == chosen
    put_new = await api.put("/webhooks/other", json=webhook(name=None, secret=chosen))
    assert put_new.status_code == 201 and put_new.json()["status"]["secret"] is None

    for name in ("a-hook", "b-hook", "c-hook"):
        assert (await api.post("/webhooks", json=webhook(name))).status_code == 201
    first = (await api.get("/webhooks", params={"limit": 2})).json()
    assert [h["metadata"]["name"] for h in first["items"]] == ["a-hook", "b-hook"]
    rest = (await api.get("/webhooks", params={"limit": 10, "cursor": first["cursor"]})).json()
    assert [h["metadata"]["name"] for h in rest["items"]] == ["c-hook", "ci-hook", "other"]
    assert rest["cursor"] is None and "whsec_" not in json.dumps(first) + json.dumps(rest)

    deleted = await api.delete("/webhooks/ci-hook")
    assert deleted.status_code == 200 and chosen not in deleted.text
    assert (await api.get("/webhooks/ci-hook")).status_code == 404
    assert await redis_client.exists(keys.webhook("ci-hook")) == 0
    assert (await api.get("/webhooks/ci-hook/deliveries")).status_code == 404


async def test_webhook_and_notify_validation_names_each_field(api: httpx.AsyncClient, store: Store) -> None:
    bad = await api.post(
        "/webhooks",
        json=webhook(url="ftp://example.com/x", secret="whsec_c2hvcnQ=", events=["session.nope"], extra=1),
    )
    assert bad.status_code == 422
    fields = error_fields(bad)
    assert set(fields) == {"spec.url", "spec.secret", "spec.events[0]", "spec.extra"}
    assert "http" in fields["spec.url"] and "bytes" in fields["spec.secret"]
    creds = await api.post("/webhooks", json=webhook(url="https://user:pw@example.com/x"))
    assert error_fields(creds) == {"spec.url": "must not carry credentials (use the signing secret)"}
    nameless = await api.post("/webhooks", json=webhook(name=None))
    assert error_fields(nameless) == {"metadata.name": "a webhook needs a name"}
    mismatch = await api.put("/webhooks/x-hook", json=webhook("y-hook"))
    assert set(error_fields(mismatch)) == {"metadata.name"}
    assert (await api.get("/webhooks/Bad_Name")).status_code == 400

    unsigned = await api.post("/sessions", json=manifest("s-unsigned", notify=[{"url": RECEIVER}]))
    assert unsigned.status_code == 422 and set(error_fields(unsigned)) == {"spec.notify[0].secret"}
    # The redacted form a GET shows parses (every reader can read a spec) but is not admitted.
    redacted = manifest("s-redacted", notify=[{"url": RECEIVER, "secretSet": True}])
    assert set(error_fields(await api.post("/sessions", json=redacted))) == {"spec.notify[0].secret"}
    too_many = [{"url": RECEIVER, "secret": generate_secret()}] * 9
    assert set(error_fields(await api.post("/sessions", json=manifest("s-many", notify=too_many)))) == {
        "spec.notify"
    }


async def test_private_targets_are_refused_without_the_setting(store: Store, redis_url: str) -> None:
    app = create_app(api_settings(redis_url), store)
    secret = generate_secret()
    async with client_for(app) as strict:
        for url in (
            "http://127.0.0.1:8080/x",
            "http://169.254.169.254/latest",
            "http://[::1]/x",
            "http://10.1.2.3/",
        ):
            refused = await strict.post("/webhooks", json=webhook(url=url))
            assert refused.status_code == 422 and set(error_fields(refused)) == {"spec.url"}, url
        named = await strict.post("/webhooks", json=webhook(url="http://localhost:8080/x"))
        assert "loopback" in error_fields(named)["spec.url"]
        session = manifest("s-private", notify=[{"url": "http://192.168.1.5/x", "secret": secret}])
        refused_session = await strict.post("/sessions", json=session)
        assert set(error_fields(refused_session)) == {"spec.notify[0].url"}
        assert await store.get("s-private") is None


async def test_notify_secrets_never_leave_the_store(
    store: Store, redis_url: str, redis_client: aioredis.Redis
) -> None:
    with rendered_logs() as logged:
        # The app is made here, so its loggers render into ``logged``.
        async with client_for(create_app(api_settings(redis_url, webhook_allow_private=True), store)) as api:
            await _secrets_stay_in(api, store, redis_client, logged)


async def _secrets_stay_in(
    api: httpx.AsyncClient, store: Store, redis_client: aioredis.Redis, logged: io.StringIO
) -> None:
    secret = generate_secret()
    notify = [{"url": RECEIVER, "secret": secret, "events": ["session.finished"]}]
    created = await api.post("/sessions", json=manifest("s-notify", notify=notify))
    assert created.status_code == 201, created.text
    assert secret not in created.text
    assert created.json()["spec"]["notify"] == [
        {"url": RECEIVER, "events": ["session.finished"], "secretRef": None, "secretSet": True}
    ]
    assert SessionSpec.model_validate(created.json()["spec"]).notify[0].secret is None  # readers parse it
    listed = await api.get("/sessions")
    fetched = await api.get("/sessions/s-notify")
    assert secret not in listed.text + fetched.text
    # The store keeps it (the worker signs with it); the same manifest applies back unchanged.
    stored = await store.get("s-notify")
    assert stored is not None and stored.spec.notify[0].secret == secret
    again = await api.put("/sessions/s-notify", json=manifest("s-notify", notify=notify))
    assert again.headers[APPLY_RESULT_HEADER] == "unchanged"
    assert (await api.get("/sessions/s-notify/deliveries")).json() == {"items": []}
    raw_spec = await redis_client.hget(keys.session("s-notify"), "spec")
    assert secret in raw_spec  # in Redis only, which is private to the control plane
    hook_secret = generate_secret()
    assert (await api.post("/webhooks", json=webhook(secret=hook_secret))).status_code == 201
    assert hook_secret not in (await api.get("/webhooks")).text
    lines = logged.getvalue()
    assert '"http_request"' in lines and '"webhook_created"' in lines  # the API logged its work...
    assert secret not in lines and hook_secret not in lines  # ...without the secrets


@pytest.mark.redis_modes("single", "cluster")
async def test_a_status_change_reaches_the_delivery_queue_atomically_and_is_shown(
    api: httpx.AsyncClient, store: Store, redis_url: str
) -> None:
    assert (await api.post("/webhooks", json=webhook(secret=generate_secret()))).status_code == 201
    assert (await api.post("/sessions", json=manifest("s-queue", labels={"team": "ci"}))).status_code == 201
    controller = ControllerStore.from_url(redis_url)
    try:
        status = SessionStatus(phase=Phase.STARTING, reason="MachineStarting")
        assert await controller.write_status("s-queue", status) == "written"
        assert await controller.write_status("s-queue", status) == "written"  # same phase: no new fact
        notice = ("session.deadline_approaching", {"timeoutSeconds": 600})
        for _ in range(2):  # a notice is enqueued once per session
            assert await controller.write_status("s-queue", status, notices=[notice]) == "written"
        entries = await controller.outbox_entries(["s-queue"])
        assert [(e.fields["kind"], e.fields.get("to") or e.fields.get("type")) for e in entries] == [
            ("phase", "Starting"),
            ("notice", "session.deadline_approaching"),
        ]
        session = await controller.get("s-queue")
        assert session is not None
        deliveries, problems = deliveries_for(session, entries, await controller.webhooks_with_secrets())
        assert problems == [] and [d.event for d in deliveries] == [
            "session.phase_changed",
            "session.deadline_approaching",
        ]
        assert await controller.enqueue(deliveries, now_ms=1_000) == 2
        assert await controller.enqueue(deliveries, now_ms=1_000) == 0  # idempotent by id
        await controller.ack_outbox("s-queue", [e.entry_id for e in entries])
        assert await controller.outbox_entries(["s-queue"]) == []

        claimed = await controller.claim_deliveries(now_ms=2_000, visibility_ms=60_000, limit=10)
        assert [c.delivery_id for c in claimed] == sorted(d.delivery_id for d in deliveries)
        assert await controller.claim_deliveries(now_ms=3_000, visibility_ms=60_000, limit=10) == []
        head, tail = claimed
        await controller.complete_delivery(
            head.delivery_id, "retry", now_ms=3_000, next_ms=9_000, http_status=500
        )
        await controller.complete_delivery(tail.delivery_id, "postponed", now_ms=3_000, next_ms=9_000)
        assert await controller.claim_deliveries(now_ms=8_000, visibility_ms=60_000, limit=10) == []
        retried = await controller.claim_deliveries(now_ms=9_000, visibility_ms=60_000, limit=10)
        assert [(c.delivery_id, c.attempts) for c in retried] == [
            (head.delivery_id, 1),
            (tail.delivery_id, 0),
        ]
        for c in retried:
            await controller.complete_delivery(c.delivery_id, "delivered", now_ms=9_500, http_status=204)
        assert await controller.delivery_queue_depth() == 0
    finally:
        await controller.close()

    shown = (await api.get("/webhooks/ci-hook/deliveries")).json()["items"]
    assert [(d["event"], d["state"], d["lastStatus"]) for d in shown] == [
        ("session.deadline_approaching", "delivered", 204),
        ("session.phase_changed", "delivered", 204),
    ]
    assert shown[1]["attempts"] == 2 and "whsec_" not in json.dumps(shown)
    assert webhook_target("ci-hook") == "webhook/ci-hook"
