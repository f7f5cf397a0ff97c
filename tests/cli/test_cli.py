"""The ``flyswarm`` user verbs against a real API (uvicorn + Redis): what a user sees and what it changes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from api.models import AgentReport, Phase, SessionEvent, SessionStatus
from api.store_artifacts import ArtifactLimits, Skipped
from api.store_channel import ChannelStore
from flyswarm import Client
from local.redis_server import free_port
from tests.cli.conftest import Cli, LiveApi, store_call
from tests.store import Store

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
T = TypeVar("T")


def _manifest(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


TASK = """
apiVersion: flyswarm.dev/v1
kind: Session
metadata:
  name: {name}
  labels: {{team: ios}}
spec:
  prompt: {prompt}
"""

CHAT = """
apiVersion: flyswarm.dev/v1
kind: Session
metadata:
  name: {name}
spec:
  mode: chat
"""


def _session_names(api_url: str) -> list[str]:
    with Client(api_url) as client:
        return sorted(s.metadata.name for s in client.list())


# -- apply ------------------------------------------------------------------------------------------


def test_apply_reports_created_then_unchanged_then_configured(cli: Cli, api_url: str, tmp_path: Path) -> None:
    path = _manifest(tmp_path, TASK.format(name="fix-login", prompt="fix the login"))
    first = cli("apply", "-f", str(path))
    second = cli("apply", "-f", str(path))
    path.write_text(TASK.format(name="fix-login", prompt="fix the login on iOS 18"))
    third = cli("apply", "-f", str(path))

    assert (first.exit_code, first.stdout.strip()) == (0, "session/fix-login created")
    assert (second.exit_code, second.stdout.strip()) == (0, "session/fix-login unchanged")
    assert (third.exit_code, third.stdout.strip()) == (0, "session/fix-login configured")
    with Client(api_url) as client:
        stored = client.get("fix-login")
    assert stored.spec.prompt == "fix the login on iOS 18"
    assert stored.metadata.generation == 2


def test_apply_takes_a_directory_of_multi_document_yaml(cli: Cli, api_url: str) -> None:
    result = cli("apply", "-f", str(EXAMPLES))

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 14 and "pool/ci-fra created" in lines  # examples/pool.yaml
    assert all(line.endswith(" created") for line in lines)
    expected = sorted(["hello-task", "coach-demo", "fix-bug", *[f"batch-{i:02d}" for i in range(1, 11)]])
    assert _session_names(api_url) == expected


def test_apply_reads_json_from_stdin_and_generates_missing_names(cli: Cli, api_url: str) -> None:
    docs = [
        {
            "apiVersion": "flyswarm.dev/v1",
            "kind": "Session",
            "metadata": {"name": "from-json"},
            "spec": {"prompt": "a"},
        },
        {"apiVersion": "flyswarm.dev/v1", "kind": "Session", "spec": {"prompt": "b"}},
    ]
    result = cli("apply", "-f", "-", input=json.dumps(docs))

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "session/from-json created"
    generated = lines[1].removeprefix("session/").removesuffix(" created")
    assert generated != lines[1] and generated.startswith("s-")
    assert _session_names(api_url) == sorted(["from-json", generated])


def test_invalid_manifest_names_file_document_field_and_reason_and_sends_nothing(
    cli: Cli, api_url: str, tmp_path: Path
) -> None:
    path = _manifest(
        tmp_path,
        """
        apiVersion: flyswarm.dev/v1
        kind: Session
        metadata: {name: good-one}
        spec: {prompt: fine}
        ---
        apiVersion: flyswarm.dev/v1
        kind: Session
        metadata: {name: Bad_Name}
        spec:
          prompt: x
          maxTurns: 0
          colour: blue
        ---
        apiVersion: flyswarm.dev/v1
        kind: Pod
        metadata: {name: other}
        """,
        "bad.yaml",
    )
    result = cli("apply", "-f", str(path))

    assert result.exit_code == 1
    err = result.stderr
    assert f"{path}: document 2: metadata.name: must be a DNS label" in err
    assert f"{path}: document 2: spec.maxTurns: Input should be greater than or equal to 1" in err
    assert f"{path}: document 2: spec.colour: unknown field" in err
    assert f"{path}: document 3: kind: must be Session, Pool or Webhook, not 'Pod'" in err
    assert _session_names(api_url) == []


def test_invalid_yaml_and_missing_files_are_reported_with_their_place(
    cli: Cli, api_url: str, tmp_path: Path
) -> None:
    broken = _manifest(tmp_path, "spec: [unclosed\n", "broken.yaml")
    result = cli("apply", "-f", str(broken), "-f", str(tmp_path / "absent.yaml"))

    assert result.exit_code == 1
    assert f"{broken}: not valid YAML or JSON: line 2" in result.stderr
    assert f"{tmp_path / 'absent.yaml'}: no such file or directory" in result.stderr


def test_server_side_rejection_is_reported_per_session(cli: Cli, api_url: str, tmp_path: Path) -> None:
    chat = _manifest(tmp_path, CHAT.format(name="mode-change"))
    assert cli("apply", "-f", str(chat)).exit_code == 0
    as_task = _manifest(tmp_path, TASK.format(name="mode-change", prompt="now a task"), "task.yaml")

    result = cli("apply", "-f", str(as_task))

    assert result.exit_code == 1
    assert "error: session/mode-change:" in result.stderr
    assert "spec.mode: is immutable" in result.stderr


# -- get --------------------------------------------------------------------------------------------


def test_get_sessions_filters_by_selector_and_phase(cli: Cli, api_url: str, redis_url: str) -> None:
    assert cli("apply", "-f", str(EXAMPLES / "batch.yaml")).exit_code == 0
    store_call(redis_url, lambda s: s.write_status("batch-07", SessionStatus(phase=Phase.RUNNING)))

    by_label = cli("get", "sessions", "-l", "item in (3,4)", "-o", "name")
    by_phase = cli("get", "sessions", "--phase", "running", "-o", "name")

    assert by_label.stdout.split() == ["session/batch-03", "session/batch-04"]
    assert by_phase.stdout.split() == ["session/batch-07"]


def test_get_tables_fit_eighty_columns(cli: Cli, api_url: str, tmp_path: Path) -> None:
    long_name = "a-very-long-session-name-that-goes-on-and-on-for-sixty-three-ch"
    path = _manifest(
        tmp_path,
        f"""
        apiVersion: flyswarm.dev/v1
        kind: Session
        metadata:
          name: {long_name}
          labels: {{team: ios, tier: free, owner: someone-with-a-long-name, purpose: testing-wide-tables}}
        spec: {{prompt: x}}
        """,
    )
    assert cli("apply", "-f", str(path)).exit_code == 0

    tables = {}
    for output in ("table", "wide"):
        result = cli("get", "sessions", "-o", output)
        lines = result.stdout.rstrip("\n").splitlines()
        assert len(lines) == 2
        assert max(len(line) for line in lines) <= 80, result.stdout
        tables[output] = lines
    assert tables["table"][0].split() == ["NAME", "MODE", "PHASE", "REASON", "RESTARTS", "AGE"]
    assert tables["table"][1].startswith(long_name[:20]) and "…" in tables["table"][1]
    assert {"NAME", "PHASE", "MACHINE", "COST", "LABELS"} <= set(tables["wide"][0].split())


def test_get_session_prints_the_resource_as_json_or_yaml(cli: Cli, api_url: str, tmp_path: Path) -> None:
    path = _manifest(tmp_path, TASK.format(name="one", prompt="do it"))
    assert cli("apply", "-f", str(path)).exit_code == 0

    as_json = json.loads(cli("get", "session", "one", "-o", "json").stdout)
    as_yaml = yaml.safe_load(cli("get", "session", "session/one", "-o", "yaml").stdout)
    listed = json.loads(cli("get", "sessions", "-o", "json").stdout)

    assert as_json["metadata"]["name"] == as_yaml["metadata"]["name"] == "one"
    assert as_json["status"]["phase"] == "Pending"
    assert "session_id" not in as_json
    assert listed["kind"] == "SessionList" and [i["metadata"]["name"] for i in listed["items"]] == ["one"]


def test_get_output_can_be_applied_back_unchanged(cli: Cli, api_url: str, tmp_path: Path) -> None:
    path = _manifest(tmp_path, TASK.format(name="round-trip", prompt="go"))
    assert cli("apply", "-f", str(path)).exit_code == 0
    dumped = cli("get", "session", "round-trip", "-o", "yaml").stdout

    result = cli("apply", "-f", "-", input=dumped)

    assert (result.exit_code, result.stdout.strip()) == (0, "session/round-trip unchanged")


def test_get_missing_session_fails_with_the_servers_reason(cli: Cli, api_url: str) -> None:
    result = cli("get", "session", "nope")

    assert result.exit_code == 1
    assert "no session nope" in result.stderr and "404" in result.stderr


# -- describe ---------------------------------------------------------------------------------------


def test_describe_shows_spec_status_conditions_agent_result_and_events(
    cli: Cli, api_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = _manifest(tmp_path, TASK.format(name="described", prompt="write hello.txt"))
    assert cli("apply", "-f", str(path)).exit_code == 0

    async def progress(store: Store) -> None:
        await store.append_event(
            "described", SessionEvent(type="machine_created", message="machine 9080e6 in fra")
        )
        await store.append_event(
            "described", SessionEvent(type="tool_use", source="agent", message="Bash: echo hello > hello.txt")
        )
        await store.write_agent_report(
            "described",
            AgentReport(state="done", turns=2, resultText="I wrote hello into hello.txt.", costUsd=0.0123),
        )

    store_call(redis_url, progress)
    result = cli("describe", "session", "described")

    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Name:                   described" in out
    assert "write hello.txt" in out
    assert "Phase:                Succeeded" in out
    assert "I wrote hello into hello.txt." in out
    assert "$0.0123" in out
    assert "machine 9080e6 in fra" in out and "Bash: echo hello > hello.txt" in out
    assert out.index("Conditions:") < out.index("Agent:") < out.index("Events:")


# -- logs -------------------------------------------------------------------------------------------


def test_logs_prints_the_history_in_order(cli: Cli, api_url: str, redis_url: str, tmp_path: Path) -> None:
    assert cli("apply", "-f", str(_manifest(tmp_path, TASK.format(name="talky", prompt="x")))).exit_code == 0

    async def events(store: Store) -> None:
        for i in range(5):
            await store.append_event(
                "talky", SessionEvent(type="assistant_text", source="agent", message=f"step {i}")
            )

    store_call(redis_url, events)
    text = cli("logs", "talky")
    raw = cli("logs", "talky", "-o", "json")

    assert [line.split(": ", 1)[1] for line in text.stdout.splitlines()] == [f"step {i}" for i in range(5)]
    assert [json.loads(line)["message"] for line in raw.stdout.splitlines()] == [
        f"step {i}" for i in range(5)
    ]


def _in_thread(target: Callable[[], T]) -> tuple[threading.Thread, list[T]]:
    box: list[T] = []
    thread = threading.Thread(target=lambda: box.append(target()), daemon=True)
    thread.start()
    return thread, box


@pytest.mark.timeout(60)
def test_logs_follow_streams_new_events_and_returns_when_the_session_finishes(
    cli: Cli, api_url: str, redis_url: str, tmp_path: Path
) -> None:
    assert cli("apply", "-f", str(_manifest(tmp_path, TASK.format(name="live", prompt="x")))).exit_code == 0
    thread, box = _in_thread(lambda: cli("logs", "live", "-f"))

    async def work(store: Store) -> None:
        for i in range(3):
            await store.append_event(
                "live", SessionEvent(type="assistant_text", source="agent", message=f"m{i}")
            )
            await asyncio.sleep(0.3)
        await store.write_agent_report("live", AgentReport(state="done", resultText="ok"))
        await store.append_event("live", SessionEvent(type="result", source="agent", message="done"))

    store_call(redis_url, work)
    thread.join(30)

    assert not thread.is_alive()
    result = box[0]
    assert result.exit_code == 0
    assert [line.split(": ", 1)[-1] for line in result.stdout.splitlines()] == ["m0", "m1", "m2", "done"], (
        result.output
    )


# -- send -------------------------------------------------------------------------------------------


def test_send_queues_a_chat_message_and_refuses_task_sessions(
    cli: Cli, api_url: str, redis_url: str, tmp_path: Path
) -> None:
    assert cli("apply", "-f", str(_manifest(tmp_path, CHAT.format(name="chatty")))).exit_code == 0
    assert (
        cli(
            "apply", "-f", str(_manifest(tmp_path, TASK.format(name="tasky", prompt="x"), "t.yaml"))
        ).exit_code
        == 0
    )

    sent = cli("send", "chatty", "how far should I run today?")
    refused = cli("send", "tasky", "hello?")

    assert sent.exit_code == 0 and sent.stdout.startswith("session/chatty message ")
    inbox = store_call(redis_url, lambda s: s.inbox_next("chatty"))
    assert inbox is not None and inbox.text == "how far should I run today?"
    assert refused.exit_code == 1
    assert "only chat sessions take messages" in refused.stderr


# -- artifacts and cp -------------------------------------------------------------------------------


def test_artifacts_lists_and_cp_downloads_byte_for_byte(
    cli: Cli, api_url: str, redis_url: str, tmp_path: Path
) -> None:
    assert (
        cli("apply", "-f", str(_manifest(tmp_path, TASK.format(name="outputs", prompt="x")))).exit_code == 0
    )
    data = bytes(range(256)) * 3

    async def upload() -> None:
        channel = ChannelStore.from_url(redis_url)
        try:
            limits = ArtifactLimits(1 << 20, 1 << 22, 10)
            digest = hashlib.sha256(data).hexdigest()
            assert await channel.put_artifact("outputs", "out/b.bin", data, digest, "x/y", limits) is None
            await channel.record_skipped("outputs", [Skipped("huge.log", "larger than the per-file cap", 9)])
        finally:
            await channel.close()

    asyncio.run(upload())
    listed = cli("artifacts", "outputs")
    dest = tmp_path / "dl"
    dest.mkdir()
    copied = cli("cp", "outputs:out/b.bin", str(dest))
    live = cli("cp", "outputs:notes.txt", "-")

    assert listed.exit_code == 0 and "out/b.bin" in listed.stdout and "768 B" in listed.stdout
    assert "huge.log" in listed.stdout and "per-file cap" in listed.stdout
    assert copied.exit_code == 0 and (dest / "b.bin").read_bytes() == data
    # No artifact of that name: cp asks the running agent, and there is none.
    assert live.exit_code == 1 and "no running agent" in live.stderr


# -- delete -----------------------------------------------------------------------------------------


@pytest.fixture
def finalizer(redis_url: str) -> Iterator[None]:
    """Stands in for the controller's finalization: removes sessions marked deleted."""
    stop = threading.Event()

    async def loop() -> None:
        store = Store.from_url(redis_url)
        try:
            while not stop.is_set():
                for session in await store.all_sessions():
                    if session.deleted:
                        await store.remove(session.id)
                await asyncio.sleep(0.1)
        finally:
            await store.close()

    thread = threading.Thread(target=lambda: asyncio.run(loop()), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def test_delete_marks_sessions_and_reports_missing_ones(cli: Cli, api_url: str, redis_url: str) -> None:
    assert cli("apply", "-f", str(EXAMPLES / "batch.yaml")).exit_code == 0

    result = cli("delete", "batch-01", "session/batch-02", "ghost")

    assert result.exit_code == 1
    assert result.stdout.split("\n")[:2] == ["session/batch-01 deleted", "session/batch-02 deleted"]
    assert "session/ghost not found" in result.stderr
    deleted = store_call(redis_url, lambda s: s.get("batch-01"))
    assert deleted is not None and deleted.deleted
    assert cli("delete", "ghost", "--ignore-not-found").exit_code == 0


def test_delete_from_file_waits_until_the_sessions_are_gone(cli: Cli, api_url: str, finalizer: None) -> None:
    assert cli("apply", "-f", str(EXAMPLES / "batch.yaml")).exit_code == 0
    assert cli("apply", "-f", str(EXAMPLES / "task.yaml")).exit_code == 0

    result = cli("delete", "-f", str(EXAMPLES / "batch.yaml"), "--wait", "--timeout", "30s")

    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 10
    assert _session_names(api_url) == ["hello-task"]


def test_delete_wait_times_out_when_nothing_finalizes(cli: Cli, api_url: str, tmp_path: Path) -> None:
    assert cli("apply", "-f", str(_manifest(tmp_path, TASK.format(name="stuck", prompt="x")))).exit_code == 0

    result = cli("delete", "stuck", "--wait", "--timeout", "1s")

    assert result.exit_code == 1
    assert "timed out waiting for session/stuck to be deleted" in result.stderr


# -- wait -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_wait_returns_when_the_phase_is_reached(
    cli: Cli, api_url: str, redis_url: str, tmp_path: Path
) -> None:
    assert cli("apply", "-f", str(_manifest(tmp_path, TASK.format(name="waited", prompt="x")))).exit_code == 0
    thread, box = _in_thread(
        lambda: cli("wait", "waited", "--for=phase=Succeeded", "--timeout", "30s", "--interval", "0.1")
    )

    async def finish(store: Store) -> None:
        await asyncio.sleep(0.5)
        await store.write_status("waited", SessionStatus(phase=Phase.RUNNING, machineId="m1"))
        await asyncio.sleep(1.0)
        await store.write_status("waited", SessionStatus(phase=Phase.SUCCEEDED, machineId="m1"))

    store_call(redis_url, finish)
    thread.join(30)

    result = box[0]
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "session/waited condition met: phase=Succeeded"
    # Not a terminal: one progress line per change of state it saw (a loaded machine may start the
    # waiting thread only after the session already runs: then Pending was never seen).
    lines = result.stderr.splitlines()
    pending = "waiting for session/waited phase=Succeeded: Pending"
    running = "waiting for session/waited phase=Succeeded: Running, machine m1"
    assert lines in ([pending, running], [running]), lines


def test_wait_fails_when_the_session_lands_in_another_terminal_phase(
    cli: Cli, api_url: str, redis_url: str, tmp_path: Path
) -> None:
    assert cli("apply", "-f", str(_manifest(tmp_path, TASK.format(name="doomed", prompt="x")))).exit_code == 0
    store_call(
        redis_url,
        lambda s: s.write_status("doomed", SessionStatus(phase=Phase.FAILED, reason="BudgetExceeded")),
    )

    result = cli("wait", "doomed", "--for=phase=Succeeded", "--timeout", "30s")

    assert result.exit_code == 1
    assert "finished in phase Failed (BudgetExceeded), not phase=Succeeded" in result.stderr


def test_wait_times_out_with_a_non_zero_exit(cli: Cli, api_url: str, tmp_path: Path) -> None:
    assert cli("apply", "-f", str(_manifest(tmp_path, TASK.format(name="slow", prompt="x")))).exit_code == 0

    result = cli("wait", "slow", "--for=phase=Succeeded", "--timeout", "1s", "--interval", "0.2")

    assert result.exit_code == 1
    assert "timed out after 1s waiting for session/slow phase=Succeeded (phase is Pending)" in result.stderr


def test_wait_rejects_an_unknown_condition(cli: Cli, api_url: str) -> None:
    result = cli("wait", "x", "--for=phase=Done")

    assert result.exit_code == 2
    assert "unknown phase 'Done'" in result.stderr


# -- errors -----------------------------------------------------------------------------------------


def test_a_missing_server_is_named_with_what_to_do(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("FLYSWARM_URL", url)

    result = cli("get", "sessions")

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: cannot reach the flyswarm API at {url}: connection refused — is `make up` running?"
    )


def test_a_wrong_token_is_named_without_echoing_it(
    cli: Cli, secured_api: LiveApi, clean_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYSWARM_URL", secured_api.url)
    monkeypatch.setenv("FLYSWARM_TOKEN", "wrong-token-value")

    rejected = cli("get", "sessions")
    monkeypatch.setenv("FLYSWARM_TOKEN", "right-token")
    accepted = cli("get", "sessions")

    assert rejected.exit_code == 1
    assert "rejected the request (401 unauthorized)" in rejected.stderr
    assert "set FLYSWARM_TOKEN to one of the server's API_TOKENS" in rejected.stderr
    assert "wrong-token-value" not in rejected.stderr + rejected.stdout
    assert (accepted.exit_code, accepted.stdout.strip()) == (0, "No sessions found.")


def test_get_loads_neither_the_sdk_nor_the_servers() -> None:
    code = textwrap.dedent(
        f"""
        import os, sys
        os.environ["FLYSWARM_URL"] = "http://127.0.0.1:{free_port()}"
        from cli.main import main
        try:
            main(["get", "sessions"])
        except SystemExit:
            pass
        modules = ("claude_agent_sdk", "uvicorn", "fastapi", "controller", "agent", "redis")
        heavy = [m for m in modules if m in sys.modules]
        print("HEAVY=" + ",".join(heavy))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)

    assert "HEAVY=\n" in out.stdout, out.stdout + out.stderr
    assert "cannot reach the flyswarm API" in out.stderr


def test_help_lists_user_and_process_verbs(cli: Cli) -> None:
    result = cli("--help")

    listed = {
        line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ") and line.split()
    }
    assert {"apply", "get", "describe", "logs", "send", "delete", "wait", "artifacts", "cp"} <= listed
    assert {
        "api",
        "controller",
        "agent",
        "emulator",
        "model",
        "up",
        "down",
        "status",
        "logs-follow",
        "demo",
    } <= listed


def test_durations_accept_kubectl_spellings() -> None:
    from cli.main import parse_duration

    assert [parse_duration(v) for v in ("300", "300s", "5m", "1h", "1m30s", "250ms")] == [
        300.0,
        300.0,
        300.0,
        3600.0,
        90.0,
        0.25,
    ]


def test_importing_the_cli_loads_only_click_and_the_standard_library() -> None:
    modules = "('yaml', 'httpx', 'pydantic', 'api')"
    code = f"import sys, cli.main; print(sorted(m for m in {modules} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
