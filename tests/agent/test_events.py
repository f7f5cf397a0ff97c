"""SDK messages become compact events."""

from __future__ import annotations

from claude_agent_sdk import (
    AssistantMessage,
    ResultMessage,
    SystemMessage,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from agent.events import result_reason, translate


def result(**kw: object) -> ResultMessage:
    base: dict[str, object] = dict(
        subtype="success",
        duration_ms=10,
        duration_api_ms=5,
        is_error=False,
        num_turns=2,
        session_id="c-1",
        total_cost_usd=0.01,
        result="done",
    )
    base.update(kw)
    return ResultMessage(**base)  # type: ignore[arg-type]


def test_a_tool_call_and_its_result_become_two_events_with_clipped_texts() -> None:
    call = AssistantMessage(
        content=[TextBlock("let me look"), ToolUseBlock("tu1", "Bash", {"command": "x" * 5000})], model="m"
    )
    events = translate(call, limit=100)
    assert [e.type for e in events] == ["assistant_text", "tool_use"]
    assert events[1].data["tool"] == "Bash" and len(events[1].data["input"]) == 100
    output = translate(UserMessage(content=[ToolResultBlock("tu1", "y" * 300, False)]), limit=50)
    assert output[0].type == "tool_result" and output[0].data["isError"] is False
    assert output[0].data["output"].endswith("…") and len(output[0].data["output"]) == 50


def test_a_synthetic_api_error_message_is_an_api_error_event() -> None:
    message = AssistantMessage(
        content=[TextBlock("API Error: 500 boom")], model="<synthetic>", error="server_error"
    )
    [event] = translate(message)
    assert (event.type, event.data["error"]) == ("api_error", "server_error")
    assert event.message == "API Error: 500 boom"


def test_retries_and_results_carry_their_numbers() -> None:
    retry = SystemMessage(
        "api_retry",
        {"attempt": 1, "max_retries": 2, "retry_delay_ms": 500, "error_status": 429, "error": "rate_limit"},
    )
    [event] = translate(retry)
    assert event.type == "api_retry" and event.data["errorStatus"] == 429
    [done] = translate(result())
    assert done.type == "result" and done.data["turns"] == 2 and done.data["costUsd"] == 0.01
    assert "reason" not in done.data


def test_result_reasons() -> None:
    assert result_reason(result()) is None
    assert result_reason(result(subtype="error_max_turns", is_error=True)) == "MaxTurns"
    assert result_reason(result(subtype="error_max_budget_usd", is_error=True)) == "BudgetExceeded"
    assert (
        result_reason(result(is_error=True, terminal_reason="api_error", api_error_status=500)) == "ApiError"
    )
    assert result_reason(result(subtype="error_during_execution", is_error=True)) == "ExecutionError"


def test_secrets_never_reach_an_event() -> None:
    from api.logs import register_secret

    register_secret("sk-super-secret-123")
    [event] = translate(AssistantMessage(content=[TextBlock("key is sk-super-secret-123")], model="m"))
    assert "sk-super-secret-123" not in (event.message or "")
