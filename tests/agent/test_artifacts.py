"""Artifacts and live files through the real agent, SDK, CLI, gateway and API.

One chat session whose first turn (the scripted model driving the real Bash tool) writes files, then
waits inside a tool call until the test says go: the live-file API is exercised while that turn runs;
at the turn's end the agent uploads ``spec.output.artifacts`` under the default caps; the API serves them
byte for byte; the session's removal deletes every artifact key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from agent.artifacts import matching_files
from agent.files import answer
from api import keys
from api.app import create_app
from api.models import SessionSpec
from tests.agent.conftest import AgentRig
from tests.api.app_harness import api_settings
from tests.store import Store

MAX_FILE = 10 * 1024 * 1024  # the default FLYSWARM_ARTIFACT_MAX_FILE_BYTES

WRITE = (
    "mkdir -p out/sub && printf 'hello\\n' > out/a.txt"
    " && head -c 3000 /dev/urandom > out/sub/b.bin && printf '\\000\\377\\001' >> out/sub/b.bin"
    f" && head -c {MAX_FILE + 1} /dev/zero > big.bin && ln -s /etc/hostname link-out"
    " && echo live > live.txt"
)
WAIT_FOR_GO = "while [ ! -f go ]; do read -t 0.2 <> <(:); done; echo went"
PROMPT = (
    "[[scenario:script "
    + json.dumps(
        {
            "steps": [
                {"tool": "Bash", "input": {"command": WRITE, "description": "write outputs"}},
                {"tool": "Bash", "input": {"command": WAIT_FOR_GO, "description": "wait for go"}},
                {"text": "done"},
            ]
        }
    )
    + "]]"
)


def _api(store: Store, redis_url: str, timeout: float) -> httpx.AsyncClient:
    app = create_app(api_settings(redis_url, files_timeout_seconds=timeout), store)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


async def _until(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _field(response: httpx.Response) -> str:
    return str(response.json()["error"]["fields"][0]["field"])


async def test_artifacts_and_live_files_through_the_real_agent(
    rig: AgentRig, store: Store, redis_client: aioredis.Redis, redis_url: str
) -> None:
    sid = "art-e2e"
    await rig.create(
        sid, mode="chat", prompt=PROMPT, output={"artifacts": ["out/**/*", "big.bin", "link-out"]}
    )
    agent = await rig.start_session(sid)
    work = rig.work_dir(sid)
    async with _api(store, redis_url, timeout=30.0) as api:
        # -- live files, while the turn is running (the agent is inside the waiting Bash call) ---
        await _until(lambda: _exists(work / "live.txt"), "the scripted agent to write live.txt")
        listing = await api.get(f"/sessions/{sid}/files")
        assert listing.status_code == 200, listing.text
        assert listing.headers["x-flyswarm-file-type"] == "directory"
        names = {e["name"]: e["type"] for e in listing.json()["entries"]}
        assert names["out"] == "directory" and names["live.txt"] == "file" and names["link-out"] == "symlink"
        live = await api.get(f"/sessions/{sid}/files", params={"path": "live.txt"})
        assert (live.status_code, live.content) == (200, b"live\n")
        sub = await api.get(f"/sessions/{sid}/files", params={"path": "out/sub/"})
        assert [e["name"] for e in sub.json()["entries"]] == ["b.bin"]
        for bad in ("../secret", "/etc/hostname", "out/../../x"):
            refused = await api.get(f"/sessions/{sid}/files", params={"path": bad})
            assert (refused.status_code, _field(refused)) == (400, "path"), bad
        # A symlink out of the work dir is refused by the agent, which resolves it.
        outside = await api.get(f"/sessions/{sid}/files", params={"path": "link-out"})
        assert (outside.status_code, _field(outside)) == (400, "path")
        missing = await api.get(f"/sessions/{sid}/files", params={"path": "nope.txt"})
        assert missing.status_code == 404
        assert "turn_finished" not in await rig.event_types(sid)  # all of it answered mid-turn

        # -- artifacts, uploaded at the end of the turn ----------------------------------------
        (work / "go").touch()
        await rig.wait_for_event(sid, "turn_finished")
        listed = (await api.get(f"/sessions/{sid}/artifacts")).json()
        expected = {name: (work / name).read_bytes() for name in ("out/a.txt", "out/sub/b.bin")}
        assert {i["name"]: (i["size"], i["sha256"]) for i in listed["items"]} == {
            name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in expected.items()
        }
        skipped = {s["name"]: s["reason"] for s in listed["skipped"]}
        assert set(skipped) == {"big.bin", "link-out"}
        assert "per-file cap" in skipped["big.bin"] and "symlink" in skipped["link-out"]
        for name, data in expected.items():
            got = await api.get(f"/sessions/{sid}/artifacts/{name}")
            assert got.status_code == 200 and got.content == data
            assert int(got.headers["content-length"]) == len(data)
        assert b"\x00\xff\x01" in expected["out/sub/b.bin"]
        for bad_name in ("%2E%2E/out/a.txt", "out/%2E%2E/%2E%2E/x"):
            refused = await api.get(f"/sessions/{sid}/artifacts/{bad_name}")
            assert (refused.status_code, _field(refused)) == (400, "name"), bad_name

        # The gateway enforces its caps itself, whatever an agent sends.
        token = agent.env["FLYSWARM_SESSION_TOKEN"]
        async with httpx.AsyncClient(base_url=rig.gateway.url, headers={"x-api-key": token}) as gw:
            too_big = await gw.put("/agent/v1/artifacts", params={"name": "x"}, content=b"z" * (MAX_FILE + 1))
            assert (too_big.status_code, too_big.json()["error"]["code"]) == (413, "file_too_large")
            sneaky = await gw.put("/agent/v1/artifacts", params={"name": "../x"}, content=b"z")
            assert sneaky.status_code == 422
        agent.send(signal.SIGTERM)
        await agent.wait()

    data_keys = [k async for k in redis_client.scan_iter(match=keys.session_key_pattern(sid)) if ":art" in k]
    assert len(data_keys) == 4  # the record hash, the skipped hash, one data key per artifact
    await store.remove(sid)
    assert [k async for k in redis_client.scan_iter(match=keys.session_key_pattern(sid))] == []


async def test_a_task_uploads_its_artifacts_before_its_final_report(rig: AgentRig, store: Store) -> None:
    sid = "art-task"
    prompt = '[[scenario:default {"file": "result.txt", "content": "forty-two"}]]'
    await rig.create(sid, prompt=prompt, output={"artifacts": ["*.txt", "missing/**"]})
    agent = await rig.start_session(sid)
    assert await agent.wait() == 0, agent.log()

    artifacts, skipped = await store.list_artifacts(sid)
    assert [(a.name, a.size, a.contentType) for a in artifacts] == [("result.txt", 10, "text/plain")]
    assert b"".join([c async for c in store.artifact_bytes(artifacts[0])]) == b"forty-two\n"
    assert skipped == []
    session = await store.get(sid)
    assert session is not None and session.agent is not None and session.agent.state == "done"
    events = [e.event for e in await store.read_events(sid, count=1000)]
    uploaded = next(e for e in events if e.type == "artifacts_uploaded")
    assert uploaded.data["uploaded"] == 1 and uploaded.data["bytes"] == 10
    # Uploaded before the outcome was reported: after that the session's token may be revoked.
    types = [e.type for e in events]
    assert types.index("artifacts_uploaded") < types.index("agent_finished")


async def _exists(path: Path) -> bool:
    return path.exists()


async def test_live_files_need_a_live_agent_and_answer_504_when_it_is_silent(
    store: Store, redis_client: aioredis.Redis, redis_url: str
) -> None:
    sid = "files-idle"
    await store.create_or_get(store.new_session(sid, SessionSpec(prompt="p")))
    async with _api(store, redis_url, timeout=0.3) as api:
        no_agent = await api.get(f"/sessions/{sid}/files")
        assert no_agent.status_code == 409 and "no running agent" in no_agent.json()["error"]["message"]
        # A heartbeat but nobody answering (the agent hung): 504 after the timeout, naming it.
        await store.heartbeat(sid, "m-1", 30, "running")
        silent = await api.get(f"/sessions/{sid}/files", params={"path": "x"})
        assert (silent.status_code, silent.json()["error"]["code"]) == (504, "agent_timeout")
        assert (await api.get("/sessions/nobody/files")).status_code == 404
        assert (await api.get(f"/sessions/{sid}/artifacts")).json() == {
            "items": [],
            "skipped": [],
            "totalBytes": 0,
        }
        assert (await api.get(f"/sessions/{sid}/artifacts/none.txt")).status_code == 404
        # The spec's globs are validated: relative, no '..', bounded in number.
        for output, reason in (
            ({"artifacts": ["/etc/*"]}, "absolute"),
            ({"artifacts": ["../*"]}, ".."),
            ({"artifacts": ["*"] * 33}, "at most 32"),
        ):
            body = {"prompt": "p", "output": output}
            refused = await api.post("/sessions", json=body)
            assert refused.status_code == 422
            problem = refused.json()["error"]["fields"][0]
            assert problem["field"].startswith("output.artifacts") and reason in problem["reason"], problem


def test_globs_match_regular_files_inside_the_work_dir_only(tmp_path: Path) -> None:
    work, outside = tmp_path / "work", tmp_path / "outside"
    (work / "out" / "deep").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("s")
    (work / "out" / "a.txt").write_text("a")
    (work / "out" / "deep" / "b.txt").write_text("b")
    (work / "out" / "back\\slash.txt").write_text("c")
    (work / "out" / "inner-link.txt").symlink_to(work / "out" / "a.txt")
    (work / "out" / "escape.txt").symlink_to(outside / "secret")
    (work / "out" / "dir-link").symlink_to(outside, target_is_directory=True)

    names, skipped = matching_files(work, ["out/**/*.txt", "out/dir-link/*", "out/a.txt"])

    assert names == ["out/a.txt", "out/deep/b.txt", "out/inner-link.txt"]
    assert {name: reason.split(" ")[0] for name, reason, _ in skipped} == {
        "out/back%5Cslash.txt": "a",
        "out/escape.txt": "symlink",
        "out/dir-link/secret": "symlink",
    }


def test_live_file_answers_stay_in_the_work_dir_and_under_the_size_bound(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_bytes(b"\x00notes")
    (work / "big.log").write_bytes(b"x" * 11)
    (work / "up").symlink_to(tmp_path)

    def ask(path: str) -> dict[str, object]:
        return answer(work, {"id": "r", "path": path, "maxBytes": 10})

    assert ask("notes.md") == {"type": "file", "path": "notes.md", "size": 6, "content": "AG5vdGVz"}
    assert ask("big.log")["error"] == "too_large" and ask("big.log")["size"] == 11
    assert ask("up")["error"] == "refused" and ask("up/work/notes.md")["type"] == "file"
    assert ask("../work/notes.md")["error"] == "refused" and ask("/etc/hostname")["error"] == "refused"
    assert ask("nothing")["error"] == "not_found"
    listing = ask(".")
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [  # type: ignore[attr-defined]
        ("big.log", "file"),
        ("notes.md", "file"),
        ("up", "symlink"),
    ]
