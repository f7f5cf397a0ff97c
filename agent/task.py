"""Task mode: one prompt, one ``query()`` run, one final report.

The whole run sits under ``spec.timeoutSeconds`` (an anyio deadline, so the SDK's shielded
teardown still terminates the CLI). The report holds the result text, the turns, the cost, the
usage and the Claude session id; an unsuccessful result or an exception becomes a reason
(see :mod:`agent.outcome`) with the CLI's stderr tail.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import anyio
from claude_agent_sdk import ResultError, query

from agent.artifacts import publish_artifacts
from agent.children import signal_children
from agent.context import AgentContext
from agent.events import result_reason
from agent.outcome import Outcome, outcome_for_exception


async def run_task(ctx: AgentContext) -> Outcome:
    prompt = ctx.spec.prompt or ""
    budget = ctx.remaining_budget()
    if budget is not None and budget <= 0:
        return Outcome.error("BudgetExceeded", "spec.maxCostUsd was already spent by earlier attempts")
    ctx.emit(
        "run_started", "task", mode="task", maxTurns=ctx.spec.maxTurns, timeoutSeconds=ctx.spec.timeoutSeconds
    )
    ctx.turn_in_flight = True
    failure: Outcome | None = None
    # At the deadline the CLI is asked to stop too, so the SDK's teardown does not wait on a tool.
    stopper = asyncio.get_running_loop().call_later(ctx.spec.timeoutSeconds, signal_children, signal.SIGTERM)
    try:
        with anyio.fail_after(ctx.spec.timeoutSeconds):
            async for message in query(prompt=prompt, options=ctx.options()):
                await ctx.observe(message)
    except ResultError:
        pass  # the error result was yielded (and observed) before the SDK raised
    except Exception as exc:
        failure = outcome_for_exception(exc)
        ctx.log.warning("task_failed", reason=failure.reason, error=str(exc)[:500])
    finally:
        stopper.cancel()
        ctx.turn_in_flight = False
    result = ctx.last_result
    fields: dict[str, Any] = {"costUsd": ctx.total_cost}
    if result is not None:
        fields.update(
            turns=result.num_turns,
            resultText=result.result,
            usage=result.usage or {},
            claudeSessionId=result.session_id or ctx.reporter.report.claudeSessionId,
        )
    await ctx.reporter.update(**fields)
    if not ctx.stopping.is_set():
        # Before the outcome is reported: then the controller finishes the session and the token dies.
        await publish_artifacts(
            ctx.store, ctx.settings.work_dir, ctx.spec.output.artifacts, ctx.emit, ctx.log
        )
    if failure is not None:
        return failure
    if result is None:
        return Outcome.error("ExecutionError", "the CLI ended without a result")
    reason = result_reason(result)
    if reason is not None:
        detail = result.result or "; ".join(str(e) for e in (result.errors or [])) or result.subtype
        return Outcome.error(reason, detail[:1000])
    return Outcome.done()
