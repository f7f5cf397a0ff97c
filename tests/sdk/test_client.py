"""Every call of both clients against a real API (uvicorn + Redis): typed answers, paging, waiting."""

from __future__ import annotations

from typing import Any

import pytest

from api.models import AgentReport, SessionEvent
from flyswarm import (
    Applied,
    Conflict,
    MessageAccepted,
    NotFound,
    Phase,
    Pool,
    SessionView,
    Timeout,
    Webhook,
    shown_phase,
)
from tests.cli.conftest import store_call
from tests.sdk.conftest import Kind, Sdk
from tests.store import Store


def _task(name: str, prompt: str = "p", **labels: str) -> dict[str, Any]:
    return {"kind": "Session", "metadata": {"name": name, "labels": labels}, "spec": {"prompt": prompt}}


def test_session_calls_return_the_api_models(kind: Kind, api_url: str, redis_server: Any) -> None:
    sdk = Sdk(kind, api_url)
    assert sdk("health") == {"status": "ok"} and sdk("ready") is True

    created = sdk("create", {"session_id": "one", "prompt": "p", "labels": {"team": "ios"}})
    assert isinstance(created, SessionView) and created.id == "one" and created.session_id == "one"
    assert created.status.phase is Phase.PENDING and created.metadata.labels == {"team": "ios"}
    assert sdk("create", {"session_id": "one", "prompt": "p", "labels": {"team": "ios"}}).id == "one"

    first = sdk("apply", _task("two"))
    assert (
        isinstance(first, Applied) and first.action == "created" and isinstance(first.resource, SessionView)
    )
    assert sdk("apply", _task("two")).action == "unchanged"
    changed = sdk("apply", _task("two", prompt="q"))
    assert changed.action == "configured" and changed.resource.metadata.generation == 2
    generated = sdk("apply", {"spec": {"prompt": "no name"}})
    assert generated.action == "created" and generated.resource.id.startswith("s-")
    for i in range(3):
        sdk("apply", _task(f"page-{i}"))

    got = sdk("get", "two")
    assert got.spec.prompt == "q" and got.metadata.generation == 2
    page = sdk("list_page", limit=2)
    assert len(page.items) == 2 and page.cursor
    everything = sdk("list", page_size=2)
    assert sorted(s.id for s in everything) == sorted(["one", "two", generated.resource.id, *_pages()])
    assert [s.id for s in sdk("list", selector="team=ios")] == ["one"]
    assert sdk("list", phase="Running") == []

    deleted = sdk("delete", "two")
    assert deleted.metadata.deletionTimestamp is not None and shown_phase(deleted) is Phase.TERMINATING


def _pages() -> list[str]:
    return [f"page-{i}" for i in range(3)]


def test_send_events_and_wait(kind: Kind, api_url: str, redis_server: Any) -> None:
    sdk = Sdk(kind, api_url)
    sdk("apply", {"metadata": {"name": "chat"}, "spec": {"mode": "chat"}})
    sdk("apply", _task("task"))

    accepted = sdk("send", "chat", "hello")
    assert isinstance(accepted, MessageAccepted) and accepted.session_id == "chat" and accepted.id
    with pytest.raises(Conflict) as refused:
        sdk("send", "task", "hello")
    assert [f.field for f in refused.value.fields] == ["spec.mode"]

    async def work(store: Store) -> None:
        for text in ("a", "b"):
            await store.append_event(
                "task", SessionEvent(type="assistant_text", source="agent", message=text)
            )

    store_call(redis_server.url, work)
    events = sdk("events", "task", follow=False)
    texts = [e.data.get("message") for e in events if e.type == "assistant_text"]
    assert texts == ["a", "b"] and all(e.id for e in events if e.type == "assistant_text")
    after = [e for e in events if e.type == "assistant_text"][0].id
    assert [e.data.get("message") for e in sdk("events", "task", after=after, follow=False)] == ["b"]

    assert sdk("wait", "task", until="pending", timeout=5).id == "task"
    with pytest.raises(Timeout, match="did not reach a terminal phase"):
        sdk("wait", "task", timeout=0.3, interval=0.1)

    async def finish(store: Store) -> None:
        await store.write_agent_report("task", AgentReport(state="done", resultText="42"))

    store_call(redis_server.url, finish)
    done = sdk("wait", "task", timeout=30, interval=0.1)
    assert done.status.phase is Phase.SUCCEEDED and done.agent is not None and done.agent.resultText == "42"
    # A wait for a phase the session can no longer reach returns the finished session.
    assert sdk("wait", "task", until=[Phase.RUNNING], timeout=5).status.phase is Phase.SUCCEEDED
    assert sdk("wait", "task", until=lambda s: s.agent is not None, timeout=5).id == "task"


def test_pool_calls(kind: Kind, api_url: str) -> None:
    sdk = Sdk(kind, api_url)
    pool = {"kind": "Pool", "metadata": {"name": "warm"}, "spec": {"size": 0}}
    created = sdk("apply", pool)
    assert created.action == "created" and isinstance(created.resource, Pool)
    assert sdk("apply_pool", pool).action == "unchanged"
    assert sdk("get_pool", "warm").spec.size == 0
    assert [p.name for p in sdk("list_pools", page_size=1)] == ["warm"]
    assert sdk("delete_pool", "warm").metadata.deletionTimestamp is not None


def test_webhook_calls(kind: Kind, api_url: str) -> None:
    sdk = Sdk(kind, api_url)
    hook = {
        "apiVersion": "flyswarm.dev/v1",
        "kind": "Webhook",
        "metadata": {"name": "ci-hook"},
        "spec": {"url": "https://hooks.example.com/x", "events": ["session.finished"]},
    }
    created = sdk("apply", hook)
    assert created.action == "created" and isinstance(created.resource, Webhook)
    generated = created.resource.status.secret
    assert generated is not None and generated.startswith("whsec_")  # shown this once
    again = sdk("apply_webhook", hook)
    assert again.action == "unchanged" and again.resource.status.secret is None
    fetched = sdk("get_webhook", "ci-hook")
    assert fetched.status.secretSet and fetched.spec.secret is None
    assert [w.name for w in sdk("list_webhooks", page_size=1)] == ["ci-hook"]
    assert sdk("webhook_deliveries", "ci-hook") == []
    sdk("apply", _task("notified"))
    assert sdk("session_deliveries", "notified") == []
    assert sdk("delete_webhook", "ci-hook").name == "ci-hook"
    with pytest.raises(NotFound):
        sdk("get_webhook", "ci-hook")


def test_artifact_calls(kind: Kind, api_url: str) -> None:
    sdk = Sdk(kind, api_url)
    sdk("apply", _task("files"))
    listing = sdk("artifacts", "files")
    assert (listing.items, listing.skipped, listing.total_bytes) == ([], [], 0)
    with pytest.raises(NotFound):
        sdk("artifact", "files", "out/report.md")
    with pytest.raises(NotFound):
        sdk("artifacts", "absent")
