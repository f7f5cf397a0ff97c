"""Every SDK message becomes a compact event for the session's event stream.

Events are what SSE/WebSocket clients see of a running session, so they are small and flat:
a ``type`` (fixed snake_case), a one-line ``message`` for humans and a few ``data`` fields with
long texts cut to ``limit`` characters. Nothing the SDK reports is dropped silently: message types
this module does not know become a ``system`` event with their class name.

Event types from SDK messages: ``init``, ``assistant_text``, ``thinking``, ``tool_use``,
``tool_result``, ``api_retry``, ``api_error``, ``result``, ``task``, ``rate_limit``,
``transcript_error``, ``conversation_reset``, ``hook``, ``system``. The agent's own lifecycle
events (``agent_started``, ``turn_started``, ...) are made in :mod:`agent.runner`.
"""

from __future__ import annotations

import json
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ConversationResetMessage,
    HookEventMessage,
    MirrorErrorMessage,
    RateLimitEvent,
    ResultMessage,
    ServerToolResultBlock,
    ServerToolUseBlock,
    StreamEvent,
    SystemMessage,
    TaskNotificationMessage,
    TaskProgressMessage,
    TaskStartedMessage,
    TaskUpdatedMessage,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from api.logs import redact_text
from api.models import SessionEvent


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked when cut; secrets masked."""
    text = redact_text(text)
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 1)] + "…"


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for item in value:
            if isinstance(item, dict) and item.get("type") == "text":
                parts.append(str(item.get("text", "")))
            else:
                parts.append(json.dumps(item, default=str))
        return "\n".join(parts)
    return json.dumps(value, default=str)


def _event(type_: str, message: str | None = None, **data: Any) -> SessionEvent:
    return SessionEvent(
        type=type_,
        source="agent",
        message=message,
        data={k: v for k, v in data.items() if v is not None},
    )


def result_reason(result: ResultMessage) -> str | None:
    """Machine-readable reason of an unsuccessful result (None for a success)."""
    if not result.is_error and result.subtype == "success":
        return None
    if result.subtype == "error_max_turns" or result.terminal_reason == "max_turns":
        return "MaxTurns"
    if result.subtype == "error_max_budget_usd" or "budget" in (result.terminal_reason or ""):
        return "BudgetExceeded"
    if result.terminal_reason == "api_error" or result.api_error_status is not None:
        return "ApiError"
    return "ExecutionError"


def _blocks(content: Any, limit: int, *, parent: str | None) -> list[SessionEvent]:
    events: list[SessionEvent] = []
    if isinstance(content, str):
        return [_event("assistant_text", clip(content, limit), parentToolUseId=parent)]
    for block in content or []:
        if isinstance(block, TextBlock):
            events.append(_event("assistant_text", clip(block.text, limit), parentToolUseId=parent))
        elif isinstance(block, ThinkingBlock):
            events.append(_event("thinking", None, chars=len(block.thinking), parentToolUseId=parent))
        elif isinstance(block, (ToolUseBlock, ServerToolUseBlock)):
            raw = json.dumps(block.input, default=str)
            events.append(
                _event(
                    "tool_use",
                    block.name,
                    tool=block.name,
                    toolUseId=block.id,
                    input=clip(raw, limit),
                    server=isinstance(block, ServerToolUseBlock) or None,
                    parentToolUseId=parent,
                )
            )
        elif isinstance(block, (ToolResultBlock, ServerToolResultBlock)):
            is_error = bool(getattr(block, "is_error", False))
            events.append(
                _event(
                    "tool_result",
                    "error" if is_error else "ok",
                    toolUseId=block.tool_use_id,
                    isError=is_error,
                    output=clip(_as_text(block.content), limit),
                    parentToolUseId=parent,
                )
            )
    return events


def _system(message: SystemMessage, limit: int) -> list[SessionEvent]:
    data = message.data or {}
    if isinstance(message, MirrorErrorMessage):
        return [_event("transcript_error", clip(str(message.error), limit), key=message.key)]
    if isinstance(
        message, (TaskStartedMessage, TaskProgressMessage, TaskUpdatedMessage, TaskNotificationMessage)
    ):
        return [
            _event(
                "task",
                message.subtype,
                subtype=message.subtype,
                taskId=message.task_id,
                status=getattr(message, "status", None),
                description=clip(str(getattr(message, "description", "") or ""), limit) or None,
                toolUseId=getattr(message, "tool_use_id", None),
            )
        ]
    if isinstance(message, HookEventMessage):
        return [_event("hook", message.hook_event_name, subtype=message.subtype)]
    if message.subtype == "init":
        return [
            _event(
                "init",
                f"model {data.get('model')}",
                claudeSessionId=data.get("session_id"),
                model=data.get("model"),
                cwd=data.get("cwd"),
                tools=data.get("tools"),
                permissionMode=data.get("permissionMode"),
                claudeCodeVersion=data.get("claude_code_version"),
            )
        ]
    if message.subtype == "api_retry":
        return [
            _event(
                "api_retry",
                f"attempt {data.get('attempt')} of {data.get('max_retries')}: {data.get('error')}",
                attempt=data.get("attempt"),
                maxRetries=data.get("max_retries"),
                retryDelayMs=data.get("retry_delay_ms"),
                errorStatus=data.get("error_status"),
                error=data.get("error"),
            )
        ]
    small = {
        k: v for k, v in data.items() if isinstance(v, (str, int, float, bool)) and k not in ("type", "uuid")
    }
    return [
        _event("system", message.subtype, subtype=message.subtype, **{k: small[k] for k in list(small)[:8]})
    ]


def _result(message: ResultMessage, limit: int) -> SessionEvent:
    return _event(
        "result",
        message.subtype,
        subtype=message.subtype,
        isError=message.is_error,
        reason=result_reason(message),
        turns=message.num_turns,
        costUsd=message.total_cost_usd,
        durationMs=message.duration_ms,
        durationApiMs=message.duration_api_ms,
        stopReason=message.stop_reason,
        terminalReason=message.terminal_reason,
        apiErrorStatus=message.api_error_status,
        result=clip(message.result, limit) if message.result else None,
        errors=[clip(str(e), limit) for e in message.errors] if message.errors else None,
        claudeSessionId=message.session_id,
    )


def translate(message: Any, limit: int = 2000) -> list[SessionEvent]:
    """The events for one SDK message (usually one; a message with several blocks gives several)."""
    if isinstance(message, AssistantMessage):
        if message.error:
            # A synthetic message: the CLI gave up on the API (after its retries).
            text = _as_text(
                [{"type": "text", "text": b.text} for b in message.content if isinstance(b, TextBlock)]
            )
            return [_event("api_error", clip(text, limit), error=message.error, model=message.model)]
        return _blocks(message.content, limit, parent=message.parent_tool_use_id)
    if isinstance(message, UserMessage):
        if isinstance(message.content, str):
            return [_event("user_text", clip(message.content, limit))]
        return _blocks(message.content, limit, parent=message.parent_tool_use_id)
    if isinstance(message, ResultMessage):
        return [_result(message, limit)]
    if isinstance(message, SystemMessage):
        return _system(message, limit)
    if isinstance(message, RateLimitEvent):
        info = message.rate_limit_info
        return [_event("rate_limit", str(getattr(info, "status", "") or ""), info=clip(str(info), limit))]
    if isinstance(message, ConversationResetMessage):
        return [_event("conversation_reset", None, newConversationId=message.new_conversation_id)]
    if isinstance(message, StreamEvent):
        return []  # partial messages are not requested; never flood the stream with deltas
    return [_event("system", type(message).__name__, subtype=type(message).__name__)]
