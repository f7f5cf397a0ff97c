"""Pure fan-out: outbox entries to deliveries (targets, events, bodies, stable ordered ids), and backoff."""

from __future__ import annotations

import json

from api.models import AgentReport, Metadata, Session, SessionSpec, SessionStatus, SessionUsage
from api.notify_models import generate_secret
from api.store_controller import OutboxEntry, StoredWebhook
from api.webhook_models import Webhook, WebhookSelector, WebhookSpec
from controller.webhook_fanout import deliveries_for
from controller.webhook_worker import WebhookTiming

SECRET, HOOK_SECRET = generate_secret(), generate_secret()


def session(labels: dict[str, str] | None = None, **notify: object) -> Session:
    target = {"url": "https://example.com/notify", "secret": SECRET, **notify}
    return Session(
        metadata=Metadata(name="s1", uid="uid-1", labels=labels or {}),
        spec=SessionSpec(prompt="go", notify=[target]),
    )


def hook(name: str = "ci", match: dict[str, str] | None = None, **spec: object) -> StoredWebhook:
    body = WebhookSpec(
        url="https://example.com/hook", selector=WebhookSelector(matchLabels=match or {}), **spec
    )  # type: ignore[arg-type]
    return StoredWebhook(Webhook(metadata=Metadata(name=name), spec=body), HOOK_SECRET)


def phase_entry(entry_id: str, old: str, new: str, **extra: str) -> OutboxEntry:
    status = SessionStatus.model_validate(
        {"phase": new, "reason": "Completed" if new == "Succeeded" else None}
    )
    fields = {"kind": "phase", "from": old, "to": new, "status": status.model_dump_json(), "at": "t", **extra}
    return OutboxEntry(entry_id, "s1", fields)


def test_each_event_goes_to_every_target_that_asked_with_stable_ordered_ids() -> None:
    agent = AgentReport(state="done", turns=3, resultText="x" * 5000, costUsd=0.25)
    usage = SessionUsage(requests=2, costUsd=0.3, inputTokens=10)
    entries = [
        phase_entry("1700000000000-0", "Pending", "Running"),
        OutboxEntry(
            "1700000000001-0",
            "s1",
            {"kind": "notice", "type": "session.budget_warning", "data": '{"costUsd": 0.8}', "at": "t"},
        ),
        phase_entry(
            "1700000000002-0",
            "Running",
            "Succeeded",
            agent=agent.model_dump_json(),
            usage=usage.model_dump_json(),
        ),
    ]
    hooks = [
        hook(match={"team": "ci"}),
        hook("other", match={"team": "ios"}),
        hook("finish-only", events=["session.finished"]),
    ]
    found, problems = deliveries_for(session({"team": "ci"}), entries, hooks)
    assert problems == []
    by_target: dict[str, list[str]] = {}
    for d in found:
        by_target.setdefault(d.target, []).append(d.event)
    assert by_target == {
        "session/s1/0": [
            "session.phase_changed",
            "session.budget_warning",
            "session.phase_changed",
            "session.finished",
        ],
        "webhook/ci": [
            "session.phase_changed",
            "session.budget_warning",
            "session.phase_changed",
            "session.finished",
        ],
        "webhook/finish-only": ["session.finished"],
    }
    lane = [d.delivery_id for d in found if d.target == "webhook/ci"]
    assert lane == sorted(lane) and len(set(lane)) == 4
    again, _ = deliveries_for(session({"team": "ci"}), entries, hooks)
    assert [d.delivery_id for d in again] == [d.delivery_id for d in found]  # the same webhook-id, always
    assert {d.secret for d in found if d.target.startswith("webhook/")} == {HOOK_SECRET}
    finished = json.loads(next(d.body for d in found if d.event == "session.finished"))
    assert finished["type"] == "session.finished" and finished["data"]["session"] == {
        "name": "s1",
        "uid": "uid-1",
        "labels": {"team": "ci"},
    }
    data = finished["data"]
    assert data["costUsd"] == 0.3 and data["succeeded"] and data["reason"] == "Completed"
    assert (
        data["result"]["truncated"] and len(data["result"]["text"]) == 4000 and data["usage"]["requests"] == 2
    )


def test_secret_refs_use_a_webhooks_secret_and_report_a_missing_one() -> None:
    entries = [phase_entry("1700000000000-0", "Pending", "Running")]
    ref = session(secret=None, secretRef="ci")
    found, problems = deliveries_for(ref, entries, [hook(match={"team": "nobody"})])
    assert [(d.target, d.secret) for d in found] == [("session/s1/0", HOOK_SECRET)] and problems == []
    missing, problems = deliveries_for(ref, entries, [])
    assert missing == [] and problems == ["spec.notify[0].secretRef: no webhook ci with a secret"]


def test_retry_delays_grow_with_jitter_up_to_the_cap() -> None:
    timing = WebhookTiming(backoff_base_seconds=5, backoff_max_seconds=60)
    assert [timing.retry_delay(n, rng=lambda: 0.0) for n in (1, 2, 3, 5, 50)] == [2.5, 5.0, 10.0, 30.0, 30.0]
    assert [timing.retry_delay(n, rng=lambda: 1.0) for n in (1, 2, 5)] == [5.0, 10.0, 60.0]
