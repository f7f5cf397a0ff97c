"""The scripted model: the Messages API wire format, scenario choice, errors, logging, and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from local.model import ModelServer, create_app, parse_directive, start_in_thread
from local.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
TOOLS = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}]


def body(
    *messages: dict[str, Any], tools: list[dict[str, Any]] | None = None, stream: bool = True
) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 1000,
        "stream": stream,
        "messages": list(messages),
        "tools": TOOLS if tools is None else tools,
        # Keys the CLI sends that a strict mock would reject:
        "context_management": {"edits": []},
        "output_config": {"effort": "medium"},
        "thinking": {"type": "adaptive"},
        "system": [{"type": "text", "text": "You are a test."}],
    }


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def assistant(text: str = "x") -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def tool_result() -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]}


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def assemble(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rebuild the content blocks from a stream, as a client does."""
    blocks: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    for name, data in events:
        if name == "content_block_start":
            blocks.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            delta = data["delta"]
            if delta["type"] == "text_delta":
                blocks[data["index"]]["text"] += delta["text"]
            else:
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
        elif name == "content_block_stop" and data["index"] in partial:
            blocks[data["index"]]["input"] = json.loads(partial[data["index"]])
    return blocks


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://model") as c:
        yield c


async def post(client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
    return await client.post("/v1/messages?beta=true", json=payload, headers={"x-api-key": "sk-secret-value"})


async def test_streams_the_messages_api_event_sequence_with_a_tool_call(client: httpx.AsyncClient) -> None:
    response = await post(client, body(user("please work")))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert "content_block_delta" in names
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"]["output_tokens"] > 0
    assert events[0][1]["message"]["model"] == "claude-test"
    [block] = assemble(events)
    assert block["type"] == "tool_use" and block["name"] == "Bash"
    assert block["input"]["command"] == 'echo "hello" > "out.txt" && ls'


async def test_the_step_is_the_number_of_assistant_turns_since_the_latest_prompt(
    client: httpx.AsyncClient,
) -> None:
    after_tool = await post(client, body(user("work"), assistant(), tool_result()))
    events = sse_events(after_tool.text)
    assert assemble(events) == [{"type": "text", "text": "done"}]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    # A new prompt in the same conversation starts the script again.
    again = await post(
        client, body(user("work"), assistant(), tool_result(), assistant("done"), user("more"))
    )
    assert assemble(sse_events(again.text))[0]["type"] == "tool_use"


async def test_tolerates_system_role_entries_and_answers_non_streaming(client: httpx.AsyncClient) -> None:
    payload = body(
        user('[[scenario:text {"text": "plain"}]] hi'),
        {"role": "system", "content": "environment block"},
        stream=False,
    )
    response = await post(client, payload)
    assert response.status_code == 200
    message = response.json()
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "text", "text": "plain"}]
    assert message["stop_reason"] == "end_turn"


async def test_a_request_without_tools_is_a_side_query(client: httpx.AsyncClient) -> None:
    response = await post(client, body(user("[[scenario:hang]] title please"), tools=[], stream=False))
    assert response.json()["content"] == [{"type": "text", "text": "ok"}]


async def test_scripted_steps_run_in_order_and_the_last_repeats(client: httpx.AsyncClient) -> None:
    steps = json.dumps(
        {"steps": [{"tool": "Read", "input": {"file_path": "/x"}}, {"text": "one"}, {"text": "two"}]}
    )
    prompt = user(f"[[scenario:script {steps}]] go")
    history: list[dict[str, Any]] = [prompt]
    seen = []
    for _ in range(4):
        blocks = assemble(sse_events((await post(client, body(*history))).text))
        seen.append(blocks[0].get("text") or blocks[0].get("name"))
        history += [assistant(), tool_result()]
    assert seen == ["Read", "one", "two", "two"]


async def test_error_scenario_fails_count_times_with_an_anthropic_error_body(
    client: httpx.AsyncClient,
) -> None:
    payload = body(user('[[scenario:error {"status": 429, "count": 2, "retry_after": 1, "id": "e1"}]] hi'))
    first = await post(client, payload)
    second = await post(client, payload)
    third = await post(client, payload)
    assert [first.status_code, second.status_code, third.status_code] == [429, 429, 200]
    assert first.json()["type"] == "error"
    assert first.json()["error"]["type"] == "rate_limit_error"
    assert first.headers["retry-after"] == "1"
    assert assemble(sse_events(third.text)) == [{"type": "text", "text": "recovered"}]


@pytest.mark.parametrize(
    ("status", "kind"), [(500, "api_error"), (401, "authentication_error"), (529, "overloaded_error")]
)
async def test_error_statuses_carry_their_anthropic_error_type(
    client: httpx.AsyncClient, status: int, kind: str
) -> None:
    response = await post(client, body(user(f'[[scenario:error {{"status": {status}}}]] hi')))
    assert response.status_code == status
    assert response.json()["error"]["type"] == kind


async def test_echo_lists_every_earlier_prompt_without_reminders_or_directives(
    client: httpx.AsyncClient,
) -> None:
    history = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "first question"},
            ],
        },
        assistant("a1"),
        user("second question"),
        assistant("a2"),
        user("[[scenario:echo]] third question"),
    ]
    blocks = assemble(sse_events((await post(client, body(*history))).text))
    assert blocks[0]["text"].splitlines() == [
        "I received 3 user messages:",
        "1. first question",
        "2. second question",
        "3. third question",
    ]


async def test_in_a_merged_message_the_newer_prompts_directive_wins(client: httpx.AsyncClient) -> None:
    merged = {
        "role": "user",
        "content": [
            {"type": "text", "text": '[[scenario:error {"status": 500}]] failed turn'},
            {"type": "text", "text": '[[scenario:text {"text": "second"}]] next turn'},
        ],
    }
    response = await post(client, body(merged))
    assert assemble(sse_events(response.text)) == [{"type": "text", "text": "second"}]


async def test_requests_are_logged_by_header_name_never_by_secret_value(client: httpx.AsyncClient) -> None:
    log_file_app = client._transport.app  # type: ignore[attr-defined]
    await post(client, body(user("[[scenario:text]] hi")))
    [record] = log_file_app.state.script.requests
    assert "x-api-key" in record["header_names"]
    assert "sk-secret-value" not in json.dumps(record)
    assert record["scenario"] == "text" and record["query"] == "beta=true"
    listed = (await client.get("/_requests")).json()
    assert listed and "sk-secret-value" not in json.dumps(listed)


def test_directives_parse_names_and_json_options() -> None:
    directive = parse_directive('please [[scenario:slow {"seconds": 2, "text": "a ]] b"}]] now')
    assert directive is not None
    assert directive.name == "slow" and directive.options == {"seconds": 2, "text": "a ]] b"}
    assert parse_directive("[[scenario:Bad]] [[scenario:text]]") == parse_directive("[[scenario:text]]")
    assert parse_directive("no directive here") is None


async def test_an_unknown_scenario_is_a_400_not_a_crash(client: httpx.AsyncClient) -> None:
    response = await post(client, body(user("[[scenario:nonsense]] hi")))
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# -- over real sockets ----------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[ModelServer]:
    srv = start_in_thread()
    try:
        yield srv
    finally:
        srv.stop()


async def test_hang_never_answers_until_the_client_gives_up(server: ModelServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=0.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/messages?beta=true", json=body(user("[[scenario:hang]] wait")))
    assert server.state.requests[-1]["outcome"] == "hang"


async def test_slow_answers_after_its_delay(server: ModelServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        started = time.monotonic()
        response = await c.post(
            "/v1/messages?beta=true", json=body(user('[[scenario:slow {"seconds": 0.3}]] x'))
        )
        assert response.status_code == 200
        assert time.monotonic() - started >= 0.3  # the scripted delay itself, not a timing budget
    assert assemble(sse_events(response.text)) == [{"type": "text", "text": "slow answer"}]


def test_runs_as_a_module_on_the_given_port(tmp_path: Path) -> None:
    port = free_port()
    log_file = tmp_path / "requests.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "local.model", "--port", str(port), "--log", str(log_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the model server did not start"
            time.sleep(0.05)
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/messages?beta=true",
            json=body(user("[[scenario:text]] hi"), stream=False),
            headers={"x-api-key": "sk-secret-value"},
        )
        assert response.json()["content"][0]["text"] == "ok"
        logged = log_file.read_text()
        assert '"scenario": "text"' in logged and "sk-secret-value" not in logged
    finally:
        proc.terminate()
        proc.wait(10)


# -- the real CLI through the SDK -----------------------------------------------------------------


def sdk_env(server: ModelServer, home: Path) -> dict[str, str]:
    return {
        "ANTHROPIC_BASE_URL": server.url,
        "ANTHROPIC_API_KEY": "sk-test-dummy",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "IS_SANDBOX": "1",
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "CLAUDE_CODE_MAX_RETRIES": "1",
    }


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_the_real_cli_runs_the_default_scenario_and_writes_the_file(
    server: ModelServer, tmp_path: Path
) -> None:
    from claude_agent_sdk import ClaudeAgentOptions, ResultMessage, query

    work = tmp_path / "work"
    work.mkdir()
    options = ClaudeAgentOptions(
        cwd=str(work),
        env=sdk_env(server, tmp_path),
        permission_mode="bypassPermissions",
        tools=["Bash", "Read"],
        max_turns=5,
    )
    results = [
        m async for m in query(prompt="do the default", options=options) if isinstance(m, ResultMessage)
    ]
    assert (work / "out.txt").read_text() == "hello\n"
    assert results[-1].subtype == "success" and results[-1].num_turns == 2
    assert results[-1].total_cost_usd and results[-1].total_cost_usd > 0
    paths = {(r["path"], r["query"]) for r in server.state.requests}
    assert paths == {("/v1/messages", "beta=true")}


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_the_real_cli_sends_the_history_that_echo_repeats(server: ModelServer, tmp_path: Path) -> None:
    from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, ResultMessage

    options = ClaudeAgentOptions(
        cwd=str(tmp_path), env=sdk_env(server, tmp_path), permission_mode="bypassPermissions", max_turns=3
    )
    answers = []
    async with ClaudeSDKClient(options) as sdk:
        for prompt in ("[[scenario:text]] red", "green", "[[scenario:echo]] blue"):
            await sdk.query(prompt)
            answers += [m.result async for m in sdk.receive_response() if isinstance(m, ResultMessage)]
    assert answers[-1] is not None
    assert answers[-1].splitlines()[1:] == ["1. red", "2. green", "3. blue"]
