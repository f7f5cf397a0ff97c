"""Chat mode: one ``ClaudeSDKClient``, one turn per inbox message, in order, at least once.

A message is acknowledged only after its turn ended with a result, so an agent that dies mid-turn
(crash, kill, machine replaced) leaves the message unacknowledged and the next agent replays it:
never dropped, possibly answered twice. Between turns the agent reports ``idle`` (with the time it
became idle in ``updatedAt``) so the controller can put the machine to sleep.

A turn that fails on its own (API error after retries, max turns, its deadline) is answered with
its error: it is acknowledged, the error goes in the report's reason/message and in the events,
and the chat goes on. What ends the chat: a spent budget (``BudgetExceeded``), a dead CLI
(``CliCrashed``: the message is replayed after the restart) or a signal.

Resume: the conversation's Claude session id is in the report; its transcript is in the control
plane's transcript store (over the agent channel). On a fresh machine the SDK materializes the
transcript from the store and the CLI resumes it. The SDK finds transcripts by the cwd's project
key, so if this machine's work dir differs from the last one's, the transcript is first copied to
the new key.
"""

from __future__ import annotations

from typing import Any

import anyio
from claude_agent_sdk import ClaudeSDKClient, ResultMessage, project_key_for_directory

from agent.artifacts import publish_artifacts
from agent.context import AgentContext
from agent.events import result_reason
from agent.outcome import Outcome, outcome_for_exception
from api.store_errors import StoreUnavailable

_INTERRUPT_DRAIN_SECONDS = 5.0


async def find_resume_target(ctx: AgentContext) -> str | None:
    """The Claude session to resume, made findable under this machine's project key; None = fresh."""
    claude_sid = ctx.reporter.report.claudeSessionId
    if not claude_sid:
        return None
    project_key = project_key_for_directory(str(ctx.settings.work_dir))
    local = ctx.settings.config_dir / "projects" / project_key / f"{claude_sid}.jsonl"
    if local.exists():
        return claude_sid
    if await ctx.transcripts.load({"project_key": project_key, "session_id": claude_sid}):
        return claude_sid
    other = await ctx.transcripts.find_project_key(claude_sid)
    if other is not None:
        copied = await ctx.transcripts.copy_transcript(claude_sid, other, project_key)
        ctx.log.info("transcript_moved", from_project=other, to_project=project_key, entries=copied)
        return claude_sid
    ctx.log.warning("transcript_missing", claude_session_id=claude_sid)
    ctx.emit("transcript_missing", "starting a new conversation", claudeSessionId=claude_sid)
    return None


async def _go_idle(ctx: AgentContext, **fields: Any) -> None:
    if ctx.reporter.state != "idle" or fields:
        # With fields, this is the end of a turn: its result must be stored (durable).
        await ctx.reporter.update(state="idle", durable=bool(fields), **fields)
        ctx.heartbeat.poke()
        ctx.emit("agent_idle", None, turns=ctx.reporter.report.turns)


async def _drain_after_interrupt(ctx: AgentContext, client: ClaudeSDKClient) -> ResultMessage | None:
    with anyio.move_on_after(_INTERRUPT_DRAIN_SECONDS):
        await client.interrupt()
        async for message in client.receive_response():
            await ctx.observe(message)
            if isinstance(message, ResultMessage):
                return message
    return None


async def run_turn(ctx: AgentContext, client: ClaudeSDKClient, text: str) -> ResultMessage | None:
    """Send one user message and consume the response; None when the turn passed its deadline."""
    ctx.last_result = None
    ctx.turn_in_flight = True
    ctx.turn_idle.clear()
    try:
        with anyio.move_on_after(ctx.spec.timeoutSeconds) as deadline:
            await client.query(text)
            async for message in client.receive_response():
                await ctx.observe(message)
        if deadline.cancelled_caught:
            ctx.log.warning("turn_deadline_exceeded", timeout_seconds=ctx.spec.timeoutSeconds)
            if await _drain_after_interrupt(ctx, client) is None:
                raise TimeoutError("the turn did not stop after its deadline")
            return None
        return ctx.last_result
    finally:
        ctx.turn_in_flight = False
        ctx.turn_idle.set()


async def _handle(
    ctx: AgentContext, client: ClaudeSDKClient, text: str, message_id: str | None
) -> Outcome | None:
    """One turn; returns an Outcome when the chat must end, None to go on."""
    await ctx.reporter.update(state="running", reason=None, message=None)
    ctx.heartbeat.poke()
    ctx.emit("turn_started", text[: ctx.settings.event_text_chars], messageId=message_id)
    ctx.diagnostics.reset_debug_log(only_if_large=True)
    result = await run_turn(ctx, client, text)
    if ctx.stopping.is_set() and (result is None or result.is_error):
        return None  # interrupted by a signal: not acknowledged, replayed by the next agent
    reason = "DeadlineExceeded" if result is None else result_reason(result)
    turns = ctx.reporter.report.turns + 1
    detail = None
    if result is not None and reason is not None:
        detail = (result.result or "; ".join(str(e) for e in (result.errors or [])) or result.subtype)[:1000]
    elif reason is not None:
        detail = f"the turn passed spec.timeoutSeconds ({ctx.spec.timeoutSeconds}s)"
    fields: dict[str, Any] = {
        "turns": turns,
        "costUsd": ctx.total_cost,
        "reason": reason,
        "message": detail,
        "stderrTail": ctx.diagnostics.tail() if reason else None,
    }
    if result is not None:
        fields.update(resultText=result.result, usage=result.usage or {})
    if reason == "BudgetExceeded":
        await _ack(ctx, message_id)
        await ctx.reporter.update(durable=True, **fields)
        return Outcome.error("BudgetExceeded", detail)
    await _ack(ctx, message_id)
    # Each turn's outputs, before the session says idle (a later turn's upload replaces a name).
    await publish_artifacts(ctx.store, ctx.settings.work_dir, ctx.spec.output.artifacts, ctx.emit, ctx.log)
    ctx.emit(
        "turn_finished" if reason is None else "turn_failed",
        reason,
        messageId=message_id,
        turns=turns,
        costUsd=ctx.total_cost,
        reason=reason,
    )
    await _go_idle(ctx, **fields)
    return None


async def _ack(ctx: AgentContext, message_id: str | None) -> None:
    """Acknowledge a finished turn, retrying through an outage: an ack lost to an outage would
    replay a turn that already happened."""
    if message_id is None:
        return
    session_id = ctx.session_id
    await ctx.reporter.persist(
        lambda: ctx.store.inbox_ack(session_id, message_id), what="inbox_ack", durable=True
    )


async def _next_message(ctx: AgentContext) -> tuple[str, str] | None:
    try:
        message = await ctx.store.inbox_next(ctx.session_id, block_ms=ctx.settings.inbox_block_ms)
    except StoreUnavailable:
        ctx.log.warning("inbox_read_failed")
        await anyio.sleep(1.0)
        return None
    return None if message is None else (message.text, message.id)


async def run_chat(ctx: AgentContext) -> Outcome:
    budget = ctx.remaining_budget()
    if budget is not None and budget <= 0:
        return Outcome.error("BudgetExceeded", "spec.maxCostUsd was already spent")
    resume = await find_resume_target(ctx)
    ctx.emit("run_started", "chat", mode="chat", resume=resume)
    try:
        async with ClaudeSDKClient(ctx.options(resume=resume)) as client:
            ctx.client = client
            if ctx.spec.prompt and ctx.reporter.report.turns == 0:
                # The spec's prompt opens the conversation (once: turns > 0 once it was answered).
                ended = await _handle(ctx, client, ctx.spec.prompt, None)
                if ended is not None:
                    return ended
            await _go_idle(ctx)
            while not ctx.stopping.is_set():
                nxt = await _next_message(ctx)
                if nxt is None or ctx.stopping.is_set():
                    continue
                ended = await _handle(ctx, client, *nxt)
                if ended is not None:
                    return ended
    except Exception as exc:
        outcome = outcome_for_exception(exc)
        ctx.log.warning("chat_failed", reason=outcome.reason, error=str(exc)[:500])
        await ctx.reporter.update(costUsd=ctx.total_cost)
        return outcome
    finally:
        ctx.client = None
    return Outcome("interrupted", "Signal")
