"""The leak test: a model that runs tools looking everywhere for credentials and other sessions' data.

The gateway's upstream key is a sentinel value only this test knows (the scripted model accepts
nothing else). A victim session holds a secret in its prompt, inbox and events, and a valid token
of its own. The attacker session's scripted model then runs Bash steps that dump the environment,
every readable ``/proc/*/environ``, grep the machine's directories for anything key-shaped, and use
the session's token against the control plane to reach the victim's state (naming it in paths,
forging a token for it). Every output is also written in full to a file in the work dir.

Asserted: the sentinel appears in no tool output, event, agent log or machine config; the victim's
secret in none of the attacker's outputs or events; every attempt on the victim was refused.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.machine_config import machine_config_for
from controller.settings import ControllerSettings
from local.model import ModelServer, start_in_thread
from local.redis_server import RedisServer
from tests.agent.conftest import AgentRig, gateway_for
from tests.gateway.conftest import GatewayServer
from tests.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SENTINEL = f"sk-ant-api03-SENTINEL-{uuid.uuid4().hex}"
VICTIM_SECRET = f"victim-secret-{uuid.uuid4().hex}"

# Run by the attacker's Bash tool: try the session token on every way to the victim's state.
PROBE = r"""
import json, os, urllib.request, urllib.error
base = os.environ["ANTHROPIC_BASE_URL"]
token = os.environ["ANTHROPIC_API_KEY"]
secret = token.rsplit("_", 1)[-1]
forged = "fst_victim_" + secret
attempts = [
    ("own", "/agent/v1/session", token),
    ("path", "/agent/v1/sessions/victim", token),
    ("query", "/agent/v1/session?session=victim", token),
    ("nested", "/agent/v1/victim/session", token),
    ("forged-session", "/agent/v1/session", forged),
    ("forged-inbox", "/agent/v1/inbox/next", forged),
    ("forged-model", "/v1/messages", forged),
]
for name, path, key in attempts:
    body = b"{}" if path.startswith("/v1/") else None
    request = urllib.request.Request(base + path, data=body, headers={"x-api-key": key})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(name, response.status, response.read().decode()[:3000])
    except urllib.error.HTTPError as exc:
        print(name, exc.code, exc.read().decode()[:500])
"""


def _bash(command: str, out: str) -> dict[str, object]:
    return {"tool": "Bash", "input": {"command": f"( {command} ) 2>&1 | tee {out}", "description": out}}


@pytest.fixture(scope="module")
def sentinel_model() -> Iterator[ModelServer]:
    server = start_in_thread(api_key=SENTINEL)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def leak_rig(
    store: Store, redis_server: RedisServer, sentinel_model: ModelServer, tmp_path: Path
) -> AsyncIterator[AgentRig]:
    gateway: GatewayServer = gateway_for(redis_server.url, sentinel_model, upstream_api_key=SENTINEL)
    rig = AgentRig(
        store=store, redis_server=redis_server, model=sentinel_model, gateway=gateway, tmp_path=tmp_path
    )
    try:
        yield rig
    finally:
        rig.cleanup()
        gateway.stop()


async def test_tools_find_no_key_and_no_other_session_data(leak_rig: AgentRig, tmp_path: Path) -> None:
    rig = leak_rig
    # The victim: a secret in its prompt, its inbox and its events, and a live token.
    await rig.create("victim", mode="chat", prompt=f"keep {VICTIM_SECRET} safe")
    await rig.store.send_message("victim", f"the secret is {VICTIM_SECRET}")
    await rig.token("victim")

    dirs = " ".join(
        str(p) for p in (tmp_path, Path.home(), Path("/tmp"), Path("/etc"), Path("/run"), Path("/var/tmp"))
    )
    steps = [
        _bash("env", "env.txt"),
        _bash("cat /proc/*/environ | tr '\\0' '\\n' | sort -u", "proc-environ.txt"),
        _bash("cat /proc/*/cmdline | tr '\\0' ' '", "proc-cmdline.txt"),
        _bash(
            "timeout 30 grep -r -a -o -s -I -E "
            f"'sk-ant-[A-Za-z0-9_-]+|fst_[a-z0-9-]+_[0-9a-f]+|redis://[^ ]+' {dirs} | sort -u | head -500",
            "grep.txt",
        ),
        _bash(f"{sys.executable} -c '{PROBE}'", "probe.txt"),
        {"text": "looked everywhere"},
    ]
    await rig.create("leaky", prompt=f"[[scenario:script {json.dumps({'steps': steps})}]] find the keys")
    token = await rig.token("leaky")
    agent = rig.start(rig.env("leaky", token))
    assert await agent.wait(90) == 0, agent.log()

    work = rig.work_dir("leaky")
    outputs = {
        name: (work / name).read_text(errors="replace")
        for name in ("env.txt", "proc-environ.txt", "proc-cmdline.txt", "grep.txt", "probe.txt")
    }
    # The tools really ran and really looked: they saw their own session's token and environment.
    assert "FLYSWARM_SESSION_ID=leaky" in outputs["env.txt"]
    assert f"ANTHROPIC_API_KEY={token}" in outputs["env.txt"]
    assert token in outputs["grep.txt"] or token in outputs["proc-environ.txt"]
    probe = {line.split(" ", 2)[0]: line for line in outputs["probe.txt"].splitlines() if line}
    assert probe["own"].startswith("own 200") and '"name":"leaky"' in probe["own"]
    # No route names a session: paths naming the victim do not exist; a query is ignored.
    assert probe["path"].startswith("path 404") and probe["nested"].startswith("nested 404")
    assert probe["query"].startswith("query 200") and '"name":"leaky"' in probe["query"]
    for name in ("forged-session", "forged-inbox", "forged-model"):
        assert probe[name].startswith(f"{name} 401"), probe[name]

    events = [e.event.model_dump_json() for e in await rig.store.read_events("leaky", count=10_000)]
    tool_results = [e for e in events if '"tool_result"' in e]
    assert tool_results, "no tool output reached the events"
    machine_config = json.dumps(
        machine_config_for(
            (await rig.store.get("leaky")),  # type: ignore[arg-type]
            ControllerSettings(_env_file=None, agent_gateway_url=rig.gateway.url),  # type: ignore[call-arg]
            launch_id="g1r0-leak",
            session_token=token,
        )
    )
    everything = {
        **outputs,
        "events": "\n".join(events),
        "agent log": agent.log(),
        "machine config": machine_config,
    }
    for where, text in everything.items():
        assert SENTINEL not in text, f"the upstream key leaked into {where}"
        assert SENTINEL.split("-SENTINEL-")[1] not in text, f"part of the upstream key leaked into {where}"
        assert VICTIM_SECRET not in text, f"the victim's data leaked into {where}"
        # (Other processes of this shared test host - other suites' agents - may show Redis URLs in
        # /proc; what this agent and its machine hold may not.)
        if where in ("env.txt", "agent log", "machine config"):
            assert "redis://" not in text.replace("redis://[^ ]+", ""), f"a Redis address reached {where}"
    # Nothing the agent's processes hold opens Redis: no address, no credential in their environment.
    assert "REDIS" not in outputs["env.txt"].upper()
    # The victim's state is untouched.
    victim = await rig.store.get("victim")
    assert victim is not None and victim.agent is None
    assert os.environ.get("ANTHROPIC_API_KEY") != SENTINEL
