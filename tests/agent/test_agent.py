"""The agent end to end: the real agent process, the real SDK and bundled CLI, the scripted model.

Each agent runs as ``python -m agent`` with the per-session ACL credentials, in its own temp dir.
The scripted model's directives (``[[scenario:...]]`` in the prompt) choose what the "model" does.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
import uuid
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from api import keys
from api.models import AgentReport
from tests.agent.conftest import AgentProcess, AgentRig, kill_tagged
from tests.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def report_of(store: Store, session_id: str) -> AgentReport:
    session = await store.get(session_id)
    assert session is not None and session.agent is not None, "the agent wrote no report"
    return session.agent


async def wait_for_report(
    store: Store, session_id: str, predicate: Callable[[AgentReport], bool], timeout: float = 60.0
) -> AgentReport:
    deadline = time.monotonic() + timeout
    while True:
        session = await store.get(session_id)
        if session is not None and session.agent is not None and predicate(session.agent):
            return session.agent
        if time.monotonic() > deadline:
            raise AssertionError(f"report never matched; last: {session.agent if session else None}")
        await asyncio.sleep(0.05)


def kill_machine(rig: AgentRig, agent: AgentProcess) -> None:
    """The machine dies: the agent, its CLI and every tool process, with no chance to react."""
    kill_tagged(agent.env["FLYSWARM_TEST_TAG"])
    agent.popen.wait(5)


# -- task mode ------------------------------------------------------------------------------------


async def test_task_writes_a_file_with_bash_and_reports_done_with_cost_and_turns(
    rig: AgentRig, redis_client: aioredis.Redis
) -> None:
    await rig.create(
        "t1", prompt='[[scenario:default {"file": "hello.txt", "content": "hi there"}]] write it'
    )
    agent = await rig.start_session("t1")
    assert await agent.wait() == 0, agent.log()

    assert (rig.work_dir("t1") / "hello.txt").read_text() == "hi there\n"
    report = await report_of(rig.store, "t1")
    assert report.state == "done"
    assert report.machineId == "m-1"
    assert report.turns == 2
    assert report.resultText == "done"
    assert report.costUsd is not None and report.costUsd > 0
    assert report.usage.get("input_tokens", 0) > 0
    assert report.claudeSessionId
    events = await rig.event_types("t1")
    for expected in (
        "agent_started",
        "init",
        "tool_use",
        "tool_result",
        "assistant_text",
        "result",
        "agent_finished",
    ):
        assert expected in events
    assert events.index("tool_use") < events.index("tool_result") < events.index("result")
    # The transcript went to the session's store in Redis, each key in the session's key registry.
    stored = [k async for k in redis_client.scan_iter(match=keys.transcript_prefix("t1") + "e:*")]
    assert stored
    assert set(stored) <= await redis_client.smembers(keys.session_registry("t1"))


async def test_api_error_after_retries_reports_reason_and_stderr_tail_and_exits_non_zero(
    rig: AgentRig,
) -> None:
    await rig.create("t-api", prompt='[[scenario:error {"status": 500}]] try')
    agent = await rig.start_session("t-api")
    assert await agent.wait() == 1, agent.log()

    report = await report_of(rig.store, "t-api")
    assert report.state == "error"
    assert report.reason == "ApiError"
    assert report.message and "500" in report.message
    assert report.stderrTail and "500" in report.stderrTail
    assert "api_retry" in await rig.event_types("t-api")


async def test_the_cli_dying_mid_run_is_reported_as_a_crash(rig: AgentRig) -> None:
    nonce = uuid.uuid4().hex
    await rig.create("t-cli", prompt=f'[[scenario:crash {{"target": "cli", "id": "{nonce}"}}]] go')
    agent = await rig.start_session("t-cli")
    assert await agent.wait() == 1, agent.log()
    report = await report_of(rig.store, "t-cli")
    assert (report.state, report.reason) == ("error", "CliCrashed")


async def test_max_turns_ends_the_task_with_reason(rig: AgentRig) -> None:
    steps = json.dumps({"steps": [{"tool": "Bash", "input": {"command": "true"}}]})
    await rig.create("t-turns", prompt=f"[[scenario:script {steps}]] loop", maxTurns=2)
    agent = await rig.start_session("t-turns")
    assert await agent.wait() == 1, agent.log()
    report = await report_of(rig.store, "t-turns")
    assert (report.state, report.reason) == ("error", "MaxTurns")


async def test_a_hanging_model_hits_the_deadline_while_heartbeats_go_on(rig: AgentRig) -> None:
    await rig.create("t-hang", prompt="[[scenario:hang]] wait", timeoutSeconds=3)
    agent = await rig.start_session("t-hang")
    await rig.wait_for_event("t-hang", "init")
    # The model hangs, the agent does not: its heartbeat stays fresh.
    first = await rig.store.get_heartbeat("t-hang")
    await asyncio.sleep(1.0)
    later = await rig.store.get_heartbeat("t-hang")
    assert first is not None and later is not None and later.at > first.at
    assert await agent.wait() == 1, agent.log()
    report = await report_of(rig.store, "t-hang")
    assert (report.state, report.reason) == ("error", "DeadlineExceeded")


@pytest.mark.parametrize("scenario", ["slowtool", "slow"])
async def test_a_slow_tool_or_model_keeps_the_heartbeat_alive(rig: AgentRig, scenario: str) -> None:
    sid = f"t-{scenario}"
    await rig.create(sid, prompt=f'[[scenario:{scenario} {{"seconds": 6}}]] take your time')
    agent = await rig.start_session(sid)
    await rig.wait_for_event(sid, "init")
    # For twice the heartbeat TTL (2 s) the key never disappears while the step runs.
    seen = []
    for _ in range(20):
        beat = await rig.store.get_heartbeat(sid)
        seen.append(beat is not None and beat.state == "running")
        await asyncio.sleep(0.2)
    assert all(seen), seen
    assert await agent.wait() == 0, agent.log()


async def test_a_hung_agent_process_stops_heartbeating(rig: AgentRig) -> None:
    await rig.create("t-stop", prompt='[[scenario:slowtool {"seconds": 30}]] work')
    agent = await rig.start_session("t-stop")
    await rig.wait_for_event("t-stop", "tool_use")
    assert await rig.store.get_heartbeat("t-stop") is not None
    agent.send(signal.SIGSTOP)  # the process hangs (as if wedged): no more heartbeats
    try:
        deadline = time.monotonic() + 10
        while await rig.store.get_heartbeat("t-stop") is not None:
            assert time.monotonic() < deadline, "the heartbeat of a stopped process never expired"
            await asyncio.sleep(0.1)
    finally:
        agent.send(signal.SIGKILL)


async def test_sigterm_mid_task_reports_interrupted_and_exits(rig: AgentRig) -> None:
    await rig.create("t-term", prompt='[[scenario:slowtool {"seconds": 60}]] work')
    agent = await rig.start_session("t-term")
    await rig.wait_for_event("t-term", "tool_use")
    agent.send(signal.SIGTERM)
    assert await agent.wait(timeout=10) == 128 + signal.SIGTERM, agent.log()
    report = await report_of(rig.store, "t-term")
    assert (report.state, report.reason) == ("interrupted", "Signal")
    events = await rig.event_types("t-term")
    assert events[-2:] == ["agent_stopping", "agent_finished"]


async def test_a_finished_task_is_not_run_again(rig: AgentRig) -> None:
    await rig.create("t-again", prompt="[[scenario:text]] once")
    first = await rig.start_session("t-again")
    assert await first.wait() == 0
    requests_before = len(rig.model.state.requests)
    second = await rig.start_session("t-again")
    assert await second.wait() == 0
    assert len(rig.model.state.requests) == requests_before
    assert "task_already_done" in second.log()


# -- chat mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("second_machine", ["same-path-wiped", "another-path"])
async def test_chat_keeps_its_history_across_a_killed_agent_and_a_fresh_machine(
    rig: AgentRig, second_machine: str
) -> None:
    await rig.create("c1", mode="chat")
    await rig.store.send_message("c1", '[[scenario:text {"text": "noted"}]] alpha is the first message')
    first = await rig.start_session("c1", machine="m-1")
    await wait_for_report(rig.store, "c1", lambda r: r.turns == 1 and r.state == "idle")
    await rig.store.send_message("c1", "beta is the second message")
    report = await wait_for_report(rig.store, "c1", lambda r: r.turns == 2 and r.state == "idle")
    claude_sid = report.claudeSessionId
    assert claude_sid
    kill_machine(rig, first)

    # A brand-new machine: an empty disk (same image path, or another one).
    machine = "m-1" if second_machine == "same-path-wiped" else "m-2"
    shutil.rmtree(rig.tmp_path / "m-1")
    await rig.store.send_message("c1", "[[scenario:echo]] gamma is the third message")
    second = await rig.start_session("c1", machine=machine)
    report = await wait_for_report(rig.store, "c1", lambda r: r.turns == 3 and r.state == "idle")
    assert report.machineId == machine
    assert report.claudeSessionId == claude_sid
    answer = report.resultText or ""
    assert "I received 3 user messages" in answer, answer
    for earlier in ("alpha is the first message", "beta is the second message", "gamma is the third message"):
        assert earlier in answer, answer
    assert await rig.store.inbox_pending("c1") == 0
    second.send(signal.SIGTERM)
    assert await second.wait(timeout=10) == 0  # a signal while idle is a clean stop


async def test_chat_replays_a_message_whose_turn_died_with_the_agent(rig: AgentRig) -> None:
    nonce = uuid.uuid4().hex
    await rig.create("c-crash", mode="chat")
    await rig.store.send_message(
        "c-crash", f'[[scenario:crash {{"target": "agent", "id": "{nonce}"}}]] risky'
    )
    first = await rig.start_session("c-crash")
    code = await first.wait()
    assert code == -signal.SIGKILL, first.log()  # the tool killed the agent mid-turn
    kill_machine(rig, first)
    assert await rig.store.inbox_pending("c-crash") == 1  # not acknowledged: not lost

    second = await rig.start_session("c-crash", machine="m-2")
    report = await wait_for_report(rig.store, "c-crash", lambda r: r.turns == 1 and r.state == "idle")
    assert report.resultText == "survived"
    assert await rig.store.inbox_pending("c-crash") == 0
    second.send(signal.SIGTERM)
    assert await second.wait(timeout=10) == 0


async def test_chat_turns_follow_the_inbox_in_order_and_go_idle(rig: AgentRig) -> None:
    await rig.create("c-order", mode="chat", prompt="[[scenario:echo]] opening prompt")
    for text in ("one", "two", "three"):
        await rig.store.send_message("c-order", text)
    agent = await rig.start_session("c-order")
    report = await wait_for_report(rig.store, "c-order", lambda r: r.turns == 4 and r.state == "idle")
    assert report.resultText is not None
    assert report.resultText.splitlines()[1:] == ["1. opening prompt", "2. one", "3. two", "4. three"]
    # The heartbeat follows the report (poked right after it is stored).
    deadline = time.monotonic() + 5
    while (beat := await rig.store.get_heartbeat("c-order")) is None or beat.state != "idle":
        assert time.monotonic() < deadline, f"the heartbeat still says {beat}"
        await asyncio.sleep(0.05)
    agent.send(signal.SIGTERM)
    assert await agent.wait(timeout=10) == 0


async def test_sigterm_mid_chat_turn_interrupts_it_and_leaves_the_message_for_replay(rig: AgentRig) -> None:
    await rig.create("c-term", mode="chat")
    await rig.store.send_message("c-term", '[[scenario:slowtool {"seconds": 60}]] long job')
    agent = await rig.start_session("c-term")
    await rig.wait_for_event("c-term", "tool_use")
    agent.send(signal.SIGTERM)
    assert await agent.wait(timeout=10) == 128 + signal.SIGTERM, agent.log()
    report = await report_of(rig.store, "c-term")
    assert (report.state, report.reason) == ("interrupted", "Signal")
    assert await rig.store.inbox_pending("c-term") == 1


async def test_a_failed_chat_turn_is_answered_and_the_chat_goes_on(rig: AgentRig) -> None:
    await rig.create("c-fail", mode="chat")
    await rig.store.send_message("c-fail", '[[scenario:error {"status": 529}]] first')
    await rig.store.send_message("c-fail", '[[scenario:text {"text": "fine now"}]] second')
    agent = await rig.start_session("c-fail")
    report = await wait_for_report(rig.store, "c-fail", lambda r: r.turns == 2 and r.state == "idle")
    assert report.resultText == "fine now" and report.reason is None
    # The report is stored before the turn's events are published: wait for the event, then count.
    await rig.wait_for_event("c-fail", "turn_finished")
    events = await rig.event_types("c-fail")
    assert events.count("turn_failed") == 1 and events.count("turn_finished") == 1
    agent.send(signal.SIGTERM)
    assert await agent.wait(timeout=10) == 0


# -- start-up and least privilege -----------------------------------------------------------------


async def test_refuses_a_missing_session_with_a_clear_log_line(rig: AgentRig) -> None:
    agent = rig.start(rig.env("ghost", await rig.token("ghost")))
    assert await agent.wait() == 3, agent.log()
    assert "session_not_found" in agent.log()


async def test_refuses_an_invalid_spec_and_reports_it(rig: AgentRig, redis_client: aioredis.Redis) -> None:
    await rig.create("bad", prompt="x")
    await redis_client.hset(keys.session("bad"), "spec", json.dumps({"prompt": "x", "maxTurns": -5}))
    agent = await rig.start_session("bad")
    assert await agent.wait() == 3, agent.log()
    assert "session_spec_invalid" in agent.log()
    raw = await redis_client.hget(keys.session("bad"), "agent")
    report = AgentReport.model_validate_json(raw)
    assert (report.state, report.reason) == ("error", "SpecInvalid")


async def test_refuses_to_start_without_its_environment(rig: AgentRig) -> None:
    env = rig.env("x", await rig.token("x"))
    del env["FLYSWARM_SESSION_ID"]
    agent = rig.start(env)
    assert await agent.wait() == 2, agent.log()
    assert "agent_config_invalid" in agent.log()


async def test_a_revoked_token_cannot_start_the_agent(rig: AgentRig) -> None:
    await rig.create("t-revoked", prompt="[[scenario:text]] x")
    token = await rig.token("t-revoked")
    await rig.store.revoke_session_token("t-revoked")
    agent = rig.start(rig.env("t-revoked", token))
    assert await agent.wait() == 4, agent.log()
    assert "session_token_refused" in agent.log()
    session = await rig.store.get("t-revoked")
    assert session is not None and session.agent is None


async def test_the_agent_cannot_run_another_session_with_its_token(rig: AgentRig) -> None:
    await rig.create("mine", prompt="[[scenario:text]] x")
    await rig.create("theirs", prompt="[[scenario:text]] y")
    env = rig.env("theirs", await rig.token("mine"))
    agent = rig.start(env)
    assert await agent.wait() == 4, agent.log()
    assert "session_token_of_another_session" in agent.log()
    for sid in ("mine", "theirs"):
        session = await rig.store.get(sid)
        assert session is not None and session.agent is None


async def test_the_agent_environment_holds_no_secret_after_start(rig: AgentRig) -> None:
    steps = json.dumps(
        {
            "steps": [
                {
                    "tool": "Bash",
                    "input": {
                        "command": "env > env.txt; cat /proc/$FLYSWARM_AGENT_PID/environ > agent-environ.txt"
                    },
                },
                {"text": "ok"},
            ]
        }
    )
    await rig.create("t-env", prompt=f"[[scenario:script {steps}]] dump env")
    token = await rig.token("t-env")
    agent = rig.start(rig.env("t-env", token, FLY_API_TOKEN="fly-token-must-not-leak"))
    assert await agent.wait() == 0, agent.log()
    dumped = (rig.work_dir("t-env") / "env.txt").read_text()
    assert "FLYSWARM_SESSION_ID=t-env" in dumped
    assert "FLYSWARM_REDIS" not in dumped and "REDIS_URL" not in dumped
    assert "fly-token-must-not-leak" not in dumped
    # The CLI (and so its tools) gets the session's own token as its key: the only credential here.
    assert f"ANTHROPIC_API_KEY={token}" in dumped
    # The agent process itself re-executed without the token in its environment.
    agent_environ = (rig.work_dir("t-env") / "agent-environ.txt").read_bytes().split(b"\0")
    assert b"FLYSWARM_SESSION_ID=t-env" in agent_environ
    assert not [v for v in agent_environ if token.encode() in v or b"fly-token" in v]
    assert token not in agent.log()


async def test_a_spent_budget_ends_the_task_with_reason(rig: AgentRig) -> None:
    await rig.create("t-budget", prompt="[[scenario:default]] write", maxCostUsd=0.001)
    agent = await rig.start_session("t-budget")
    assert await agent.wait() == 1, agent.log()
    report = await report_of(rig.store, "t-budget")
    assert (report.state, report.reason) == ("error", "BudgetExceeded")
    assert report.costUsd is not None and report.costUsd > 0.001


async def test_a_chat_turn_past_its_deadline_is_interrupted_and_the_chat_goes_on(rig: AgentRig) -> None:
    await rig.create("c-slow", mode="chat", timeoutSeconds=2)
    await rig.store.send_message("c-slow", "[[scenario:hang]] never answered")
    await rig.store.send_message("c-slow", '[[scenario:text {"text": "quick"}]] next')
    agent = await rig.start_session("c-slow")
    report = await wait_for_report(rig.store, "c-slow", lambda r: r.turns == 2 and r.state == "idle")
    assert report.resultText == "quick"
    failed = [
        e.event for e in await rig.store.read_events("c-slow", count=1000) if e.event.type == "turn_failed"
    ]
    assert [e.data.get("reason") for e in failed] == ["DeadlineExceeded"]
    agent.send(signal.SIGTERM)
    assert await agent.wait(timeout=10) == 0
