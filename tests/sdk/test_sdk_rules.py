"""The SDK's pure rules: error types by status, the retry policy, paths, SSE parsing, resume dedup.

The live API cannot be made to answer 403 or 429 today (no route does), so those two mappings are
shown here on real ``httpx.Response`` objects; every other error is provoked for real in
tests/sdk/test_client.py.
"""

from __future__ import annotations

import httpx
import pytest

from flyswarm import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    RateLimited,
    Retry,
    ServerError,
    ServerUnreachable,
    Unauthorized,
    Unavailable,
)
from flyswarm.calls import apply, create_session, path, send_message
from flyswarm.errors import error_from_response
from flyswarm.events import Resume, StreamInterrupted, parse_lines


def _answer(status: int, code: str = "x", headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"code": code, "message": "m", "fields": [{"field": "spec.a", "reason": "r"}]}}
    return httpx.Response(status, json=body, headers=headers or {})


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, Invalid),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (413, Invalid),
        (422, Invalid),
        (429, RateLimited),
        (500, ServerError),
        (503, Unavailable),
    ],
)
def test_each_status_has_its_error_type(status: int, cls: type[Exception]) -> None:
    error = error_from_response(_answer(status, headers={"retry-after": "7"}))
    assert type(error) is cls
    assert error.fields[0].field == "spec.a" and error.retry_after == 7.0


def test_retry_waits_at_least_retry_after_and_gives_up_after_its_budget() -> None:
    seen: list[int] = []
    policy = Retry(retries=2, backoff=0.01, max_backoff=0.02, on_retry=lambda n, _e: seen.append(n))
    busy = error_from_response(_answer(503, headers={"retry-after": "3"}))

    first = policy.delay(0, busy, idempotent=True)
    assert first is not None and 3.0 <= first
    assert policy.delay(1, busy, idempotent=True) is not None
    assert policy.delay(2, busy, idempotent=True) is None
    assert policy.delay(0, busy, idempotent=False) is None
    assert policy.delay(0, error_from_response(_answer(500)), idempotent=True) is None
    assert policy.delay(0, error_from_response(_answer(409)), idempotent=True) is None
    down = ServerUnreachable("http://x", "connection refused")
    delay = policy.delay(0, down, idempotent=True)
    assert delay is not None and 0 <= delay <= 0.02
    assert seen == [1, 2, 1]


def test_only_idempotent_calls_may_be_retried() -> None:
    assert create_session({"metadata": {"name": "a"}, "spec": {"prompt": "p"}}).idempotent
    assert create_session({"session_id": "a", "prompt": "p"}).idempotent
    assert not create_session({"prompt": "p"}).idempotent
    assert not send_message("a", "hi").idempotent
    assert apply({"metadata": {"name": "a"}, "spec": {"prompt": "p"}}).method == "PUT"
    assert apply({"kind": "Pool", "metadata": {"name": "w"}, "spec": {}}).path == "/pools/w"


def test_paths_quote_names() -> None:
    assert path("sessions") == "/sessions"
    assert path("sessions", "a/b", "events") == "/sessions/a%2Fb/events"


def test_sse_frames_become_events_and_resume_drops_repeats() -> None:
    lines = [
        "retry: 2000",
        "",
        "id: 5-0",
        "event: assistant_text",
        'data: {"type": "assistant_text", "message": "hi"}',
        "",
        ": keep-alive",
        "id: 5-1",
        'data: {"type": "tool_use"}',
        "",
        "event: end",
        'data: {"reason": "finished"}',
        "",
    ]
    events = list(parse_lines(lines))
    assert [(e.id, e.type) for e in events] == [("5-0", "assistant_text"), ("5-1", "tool_use"), (None, "end")]
    assert events[0].model().message == "hi" and events[-1].is_end

    resume = Resume(last_id="5-0", max_reconnects=None)
    assert [resume.accept(e) for e in events] == [False, True, True]
    assert resume.headers()["last-event-id"] == "5-1"
    with pytest.raises(StreamInterrupted, match="fell behind"):
        resume.accept(next(parse_lines(["event: error", 'data: {"error": {"message": "fell behind"}}'])))
