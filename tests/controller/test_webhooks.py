"""Signed webhooks end to end: a real receiver, a session's whole life, a controller crash, outages.

The World harness runs real controllers against real Redis and the Fly emulator (machines are real
heartbeat-agent processes); the receiver (tests/webhook_receiver.py) is a real HTTP server that
checks every signature with the standard library. Two targets per session: its ``spec.notify`` and
a Webhook resource whose selector matches it.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from api import keys
from api.models import Phase, SessionSpec, SessionStatus
from api.notify_models import generate_secret, notify_target, webhook_target
from api.store_gateway import MeteredUsage
from api.webhook_models import WebhookSelector, WebhookSpec
from controller.metrics import ControllerMetrics
from controller.webhook_worker import fan_out_sessions
from tests.controller.world import World
from tests.store import Store
from tests.webhook_receiver import Receiver, rendered_logs

FAST = {
    "webhook_allow_private": True,
    "webhook_poll_seconds": 0.1,
    "webhook_timeout_seconds": 1.0,
    "webhook_backoff_base_seconds": 0.2,
    "webhook_backoff_max_seconds": 1.0,
    # Warn at once: the deadline is 120 s away and the warning window is 119 s.
    "deadline_warning_seconds": 119.0,
}


async def test_a_sessions_life_arrives_signed_in_order_through_a_crash_and_outages(world: World) -> None:
    with rendered_logs() as logged:
        secrets = await _whole_life(world)
    lines = logged.getvalue()
    assert '"webhook_delivery_delivered"' in lines and '"webhook_delivery_retrying"' in lines  # it logged...
    assert not [s for s in secrets if s in lines]  # ...and no secret


async def _whole_life(world: World) -> tuple[str, str]:
    notify_secret, hook_secret = generate_secret(), generate_secret()
    receiver = Receiver({"/notify": notify_secret, "/hook": hook_secret})
    await receiver.up()
    try:
        await world.store.put_webhook(
            "ci-hook",
            WebhookSpec(url=receiver.url("/hook"), selector=WebhookSelector(matchLabels={"team": "ci"})),
            {},
            mode="create",
            secret_if_new=hook_secret,
        )
        session = world.store.new_session("s-hooked", _spec(receiver, notify_secret), {"team": "ci"})
        await world.store.create_or_get(session)
        first = await world.start_controller(**FAST)
        await world.until_running("s-hooked")

        def arrived(path: str, event: str) -> bool:
            return any(r.payload["type"] == event for r in receiver.events(path))

        await receiver.until(
            lambda: all(arrived(p, "session.deadline_approaching") for p in ("/notify", "/hook"))
        )

        # Outage 1: the receiver answers 500. The budget warning (the gateway's metering script)
        # is queued and retried; then the controller dies mid-queue.
        receiver.failing = True
        await world.store.record_usage("s-hooked", MeteredUsage(cost_usd=0.9), warn_at_usd=0.8)
        await receiver.until(lambda: receiver.refused >= 4)
        first.crash()

        # Outage 2: the receiver is down while a new controller finishes the session.
        await receiver.down()
        receiver.failing = False
        await world.start_controller(**FAST)
        await world.store.send_message("s-hooked", "done")
        await world.until_phase("s-hooked", Phase.SUCCEEDED, timeout=90)

        async def refused_while_down() -> bool:
            shown = await world.store.deliveries(webhook_target("ci-hook"))
            return any((d.lastError or "").startswith("Connect") for d in shown)

        await world.until(refused_while_down, timeout=30)
        await receiver.up()
        await receiver.until(lambda: all(arrived(p, "session.finished") for p in ("/notify", "/hook")))
    finally:
        await receiver.down()

    assert receiver.bad_signatures == 0
    for path, target in (("/notify", notify_target("s-hooked", 0)), ("/hook", webhook_target("ci-hook"))):
        got = receiver.events(path)
        # In order per session and target: ids sort by event position, and they arrived sorted.
        ids = [r.msg_id for r in got]
        assert ids == sorted(ids), path
        # Duplicates only ever repeat one webhook-id with the very same body.
        bodies: dict[str, bytes] = {}
        for r in receiver.received:
            if r.path == path:
                assert bodies.setdefault(r.msg_id, r.body) == r.body
        types = [r.payload["type"] for r in got]
        changes = [r.payload["data"] for r in got if r.payload["type"] == "session.phase_changed"]
        assert [c["phase"] for c in changes][-2:] == ["Running", "Succeeded"]
        assert all(a["phase"] == b["previousPhase"] for a, b in zip(changes, changes[1:], strict=False))
        assert types.count("session.budget_warning") == 1 and types.count("session.deadline_approaching") == 1
        assert types[-1] == "session.finished"
        finished = got[-1].payload["data"]
        assert finished["session"]["name"] == "s-hooked" and finished["session"]["labels"] == {"team": "ci"}
        assert finished["phase"] == "Succeeded" and finished["costUsd"] == 0.9
        assert finished["result"]["text"] == "finished by script" and finished["usage"]["requests"] == 1
        warning = next(r.payload["data"] for r in got if r.payload["type"] == "session.budget_warning")
        assert warning["costUsd"] == 0.9 and warning["warnAtUsd"] == 0.8
        # Nothing lost: every delivery the worker queued for this target was delivered.
        shown = await world.store.deliveries(target)
        assert {d.id for d in shown} == set(ids) and {d.state for d in shown} == {"delivered"}
    assert await world.store.delivery_queue_depth() == 0
    secrets_seen = json.dumps([r.payload for r in receiver.received])
    assert notify_secret not in secrets_seen and hook_secret not in secrets_seen
    return notify_secret, hook_secret


def _spec(receiver: Receiver, secret: str) -> SessionSpec:
    return SessionSpec.model_validate(
        {
            "prompt": "heartbeat",
            "timeoutSeconds": 120,
            "maxCostUsd": 1.0,
            "notify": [{"url": receiver.url("/notify"), "secret": secret}],
        }
    )


async def test_private_targets_are_refused_at_delivery_without_the_setting(world: World) -> None:
    receiver = Receiver({"/hook": generate_secret()})
    await receiver.up()
    metrics = ControllerMetrics()
    try:
        await world.store.put_webhook(
            "local-hook",
            WebhookSpec(url=f"http://localhost:{receiver.port}/hook"),
            {},
            mode="create",
            secret_if_new=receiver.secrets["/hook"],
        )
        await world.create_session("s-private", prompt="heartbeat")
        await world.start_controller(metrics=metrics, **{**FAST, "webhook_allow_private": False})

        async def refused() -> bool:
            shown = await world.store.deliveries(webhook_target("local-hook"))
            return any("loopback" in (d.lastError or "") for d in shown)

        await world.until(refused, timeout=30)
    finally:
        await receiver.down()
    assert receiver.received == [] and receiver.refused == 0
    assert metrics.value("flyswarm_controller_webhook_deliveries_total", {"outcome": "retry"}) >= 1


async def test_an_unreadable_outbox_entry_is_dropped_without_blocking_the_others(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    store = Store.from_url(redis_url)
    try:
        spec = SessionSpec(
            prompt="go", notify=[{"url": "https://example.com/x", "secret": generate_secret()}]
        )  # type: ignore[list-item]
        await store.create_or_get(store.new_session("s-odd", spec))
        await redis_client.xadd(
            keys.outbox("s-odd"),
            {"kind": "phase", "from": "Pending", "to": "Running", "status": '{"phase": "Bogus"}'},
        )
        assert await store.write_status("s-odd", SessionStatus(phase=Phase.CREATING)) == "written"
        assert await fan_out_sessions(store, ["s-odd"], None, now_ms=1) == 2
        assert await store.outbox_entries(["s-odd"]) == []
        queued = await store.claim_deliveries(now_ms=2, visibility_ms=1000, limit=10)
        assert [json.loads(d.body)["data"]["phase"] for d in queued] == ["Creating"]
    finally:
        await store.close()
