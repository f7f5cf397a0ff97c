"""Workspaces end to end: real git, the real agent, the real CLI tools, the gateway's git proxy.

A bare repository is served over smart HTTP (``git http-backend`` behind :mod:`local.git_server`,
behind Basic auth: a private repository) and another over ``file://``. The scripted model reads
and edits a file through the CLI's own Read and Edit tools; the result's diff and changed files
must be exactly that edit, and the push must land in the bare repository on a new branch, with the
credential nowhere on the machine's side.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.workspace import MARKER, Workspace
from api.models import Session
from api.workspace_models import MAX_DIFF_BYTES, TRUNCATION_MARKER, WorkspaceSpec
from local.git_server import DEMO_FILES, GitServer, make_bare_repo, start_in_thread
from local.model import ModelServer
from local.redis_server import RedisServer
from tests.agent.conftest import AgentRig, gateway_for
from tests.gateway.conftest import GatewayServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CREDENTIAL = "alice:git-Cred-7f3a91e2c4"
SECRETS = {"demo-private": CREDENTIAL}


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GitServer, Path, str]]:
    """A private repository over smart HTTP (``demo.git``) and the same content as a file:// one."""
    root = tmp_path_factory.mktemp("git")
    (root / "served").mkdir()
    sha = make_bare_repo(root / "served" / "demo.git", DEMO_FILES)
    make_bare_repo(root / "lib.git", {"lib.txt": "library\n"})
    server = start_in_thread(root / "served", credentials=CREDENTIAL)
    try:
        yield server, root, sha
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, model_server: ModelServer) -> Iterator[GatewayServer]:
    """The control plane's gateway, which alone knows the repository's credential."""
    server = gateway_for(redis_server.url, model_server, git_secrets=SECRETS)
    try:
        yield server
    finally:
        server.stop()


def edit_prompt(work: Path, rel: str) -> str:
    target = str(work / rel)
    steps = [
        {"tool": "Read", "input": {"file_path": target}},
        {"tool": "Edit", "input": {"file_path": target, "old_string": "a - b", "new_string": "a + b"}},
        {"text": "fixed"},
    ]
    return f"[[scenario:script {json.dumps({'steps': steps})}]] fix add()"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


async def run_to_end(rig: AgentRig, *session_ids: str) -> list[Session]:
    """Run the sessions' agents side by side (one machine each) until they exit."""
    agents = [await rig.start_session(sid, machine=f"m-{sid}") for sid in session_ids]
    sessions = []
    for sid, agent in zip(session_ids, agents, strict=True):
        await agent.wait()
        session = await rig.store.get(sid)
        assert session is not None and session.agent is not None, agent.log()
        sessions.append(session)
    return sessions


async def test_a_private_repo_is_cloned_edited_diffed_and_pushed_without_the_credential_on_the_machine(
    rig: AgentRig, repos: tuple[GitServer, Path, str]
) -> None:
    server, root, sha = repos
    work = rig.work_dir("ws1", machine="m-ws1")
    bare = root / "served" / "demo.git"
    git(bare, "branch", "taken", "main")  # someone's branch: a session may not push over it
    lib_sha = git(root / "lib.git", "rev-parse", "HEAD").strip()
    await rig.create(
        "ws1",
        prompt=edit_prompt(work, "app/calc.py"),
        workspace={
            "git": [
                {"url": f"{server.url}/demo.git", "ref": "main", "path": "app", "secret": "demo-private"},
                {"url": f"file://{root / 'lib.git'}", "ref": lib_sha, "path": "vendor/lib", "depth": 1},
            ],
            "files": [{"path": "notes/run.sh", "content": "echo hi\n", "mode": "0755"}],
        },
        output={"push": {"branch": "flyswarm/fix-add", "commitMessage": "Fix add"}},
    )
    # A second session wants to push to the existing branch: refused, its diff kept.
    await rig.create(
        "ws2",
        prompt=edit_prompt(rig.work_dir("ws2", machine="m-ws2"), "calc.py"),
        workspace={"git": [{"url": f"{server.url}/demo.git", "secret": "demo-private"}]},
        output={"push": {"branch": "taken"}},
    )
    session, second = await run_to_end(rig, "ws1", "ws2")
    again = second.agent
    assert again is not None and (again.state, again.reason) == ("error", "WorkspaceFailed")
    assert "already exists" in (again.message or "")
    assert again.workspace is not None and again.workspace.sources[0].changedFiles  # the diff is kept
    assert git(bare, "rev-parse", "refs/heads/taken").strip() == sha
    report = session.agent
    assert report is not None and report.state == "done", report
    assert report.workspace is not None
    app, lib = report.workspace.sources
    # The diff and the changed files are exactly the model's edit.
    assert app.commit == sha and lib.commit == lib_sha
    assert [(f.path, f.status) for f in app.changedFiles] == [("app/calc.py", "modified")]
    minus = [ln for ln in app.diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln for ln in app.diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert (minus, plus) == (["-    return a - b"], ["+    return a + b"])
    assert "--- a/app/calc.py" in app.diff and not app.diffTruncated
    assert lib.changedFiles == [] and lib.diff == ""
    assert (work / "vendor/lib/lib.txt").read_text() == "library\n"
    assert (work / "notes/run.sh").stat().st_mode & 0o777 == 0o755
    # The push landed on a new branch of the bare repository: one commit on main, that edit.
    assert app.push is not None and app.push.error is None and app.push.commit
    assert git(bare, "rev-parse", "refs/heads/flyswarm/fix-add").strip() == app.push.commit
    assert git(bare, "rev-parse", "refs/heads/flyswarm/fix-add~1").strip() == sha
    assert git(bare, "log", "-1", "--format=%s", "flyswarm/fix-add").strip() == "Fix add"
    assert git(bare, "diff", "--name-only", "main", "flyswarm/fix-add").split() == ["calc.py"]
    # Through the proxy (the server saw upload-pack and receive-pack), and the credential nowhere else.
    assert {("POST", "/demo.git/git-upload-pack"), ("POST", "/demo.git/git-receive-pack")} <= set(
        server.app.requests
    )
    events = await rig.store.read_events("ws1", count=10_000)
    seen = [
        json.dumps(rig.agents[0].env),
        rig.agents[0].log(),
        session.model_dump_json(),
        json.dumps([e.event.model_dump(mode="json") for e in events]),
        (work / "app/.git/config").read_text(),
    ]
    for text in seen:
        assert CREDENTIAL not in text and CREDENTIAL.split(":")[1] not in text
    assert "workspace_prepared" in [e.event.type for e in events]


async def test_an_unknown_ref_or_an_unreachable_repo_fails_the_session_with_gits_message_before_any_turn(
    rig: AgentRig, repos: tuple[GitServer, Path, str]
) -> None:
    server, root, _ = repos
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "bad-ref": ({"url": f"file://{root / 'lib.git'}", "ref": "no-such-branch"}, "no-such-branch"),
        "no-secret": ({"url": f"{server.url}/demo.git"}, "403"),
        "down": ({"url": "http://127.0.0.1:9/nothing.git"}, "http://127.0.0.1:9/nothing.git"),
    }
    agents = {}
    for sid, (source, _) in cases.items():
        await rig.create(sid, prompt="[[scenario:text]] hi", workspace={"git": [source]})
        agents[sid] = await rig.start_session(sid, machine=f"m-{sid}")
    for sid, (_, expected) in cases.items():
        await agents[sid].wait()
        session = await rig.store.get(sid)
        report = session.agent if session else None
        assert report is not None and (report.state, report.reason) == ("error", "WorkspaceFailed")
        assert expected in (report.message or ""), report.message
        assert "/git/0" not in (report.message or "")  # the proxy's address is replaced by the source's
        types = await rig.event_types(sid)
        assert "workspace_failed" in types and "init" not in types  # no model run on an empty dir


async def test_a_prepared_workspace_is_kept_on_restart_and_a_half_done_one_is_redone(
    tmp_path: Path, repos: tuple[GitServer, Path, str]
) -> None:
    _, root, _ = repos
    spec = WorkspaceSpec.model_validate(
        {"git": [{"url": f"file://{root / 'lib.git'}"}], "files": [{"path": "a.txt", "content": "A"}]}
    )
    work, state = tmp_path / "work", tmp_path / "state"
    state.mkdir()

    def workspace() -> Workspace:
        return Workspace(
            spec, None, work_dir=work, state_dir=state, home_dir=tmp_path, control_url="http://x", token=""
        )

    assert await workspace().prepare() is True
    (work / "lib.txt").write_text("edited by the model\n")
    assert await workspace().prepare() is False  # the marker says done: the edit stays
    assert (work / "lib.txt").read_text() == "edited by the model\n"
    (state / MARKER).unlink()  # as if the agent died mid-clone
    (work / "junk").write_text("half done")
    assert await workspace().prepare() is True
    assert (work / "lib.txt").read_text() == "library\n" and not (work / "junk").exists()
    prepared = workspace()
    assert await prepared.prepare() is False
    (work / "lib.txt").write_text("changed\n")
    report = await prepared.results(push=False)  # a.txt is the spec's input, not a change
    assert [(f.path, f.status) for f in report.sources[0].changedFiles] == [("lib.txt", "modified")]
    # A diff over the cap is cut, and says so.
    (work / "big.txt").write_text("line of text\n" * 40_000)
    (work / "lib.txt").unlink()
    big = (await prepared.results(push=False)).sources[0]
    assert [(f.path, f.status) for f in big.changedFiles] == [("big.txt", "added"), ("lib.txt", "deleted")]
    assert big.diffTruncated and big.diffBytes > MAX_DIFF_BYTES
    assert big.diff.endswith(TRUNCATION_MARKER.format(limit=MAX_DIFF_BYTES, total=big.diffBytes))
