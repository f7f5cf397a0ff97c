"""The real bundled CLI (through claude-agent-sdk's ``query()``, as the agent runs it) holding only
a session token, with the gateway as its ANTHROPIC_BASE_URL: its whole traffic works and is metered."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import GatewayRig, wait_for

sdk = pytest.importorskip("claude_agent_sdk", reason="the agent extra (claude-agent-sdk) is not installed")


def _options(tmp_path: Path, base_url: str, token: str, *, quiet: bool = True) -> Any:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": token,
        "IS_SANDBOX": "1",  # the tests run as root; the CLI refuses bypassPermissions otherwise
        "CLAUDE_CODE_MAX_RETRIES": "1",
    }
    if quiet:
        env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"  # as the agent sets it
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return sdk.ClaudeAgentOptions(
        tools=["Bash"],
        allowed_tools=["Bash"],
        permission_mode="bypassPermissions",
        max_turns=4,
        cwd=str(work),
        env=env,
    )


async def _run(options: Any, prompt: str) -> Any:
    result = None
    async for message in sdk.query(prompt=prompt, options=options):
        if isinstance(message, sdk.ResultMessage):
            result = message
    return result


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_the_bundled_cli_works_through_the_gateway_with_only_a_session_token(
    rig: GatewayRig, tmp_path: Path
) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-cli")
    assert "ANTHROPIC_API_KEY" not in os.environ or os.environ["ANTHROPIC_API_KEY"] != token.value
    result = await _run(_options(tmp_path, gw.url, token.value), "write the file")
    assert result is not None and not result.is_error, result
    assert (tmp_path / "work" / "out.txt").read_text().strip() == "hello"
    seen = rig.model.state.requests
    # Every request reached the model through the gateway (the model refuses any other key).
    assert [(r["path"], r["query"], r["status"]) for r in seen] == [("/v1/messages", "beta=true", 200)] * 2

    async def metered() -> object:
        usage = await rig.usage("s-cli")
        return usage if usage is not None and usage.requests == len(seen) else None

    usage = await wait_for(metered)
    assert usage.costUsd > 0 and usage.outputTokens > 0


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_without_the_quiet_switch_the_clis_extra_traffic_is_served_too(
    rig: GatewayRig, tmp_path: Path
) -> None:
    gw = rig.gateway()
    _session, token = await rig.session("s-cli-chatty")
    result = await _run(_options(tmp_path, gw.url, token.value, quiet=False), "write the file")
    assert result is not None and not result.is_error, result
    paths = {(r["path"], r["status"]) for r in rig.model.state.requests}
    assert paths <= {("/v1/messages", 200), ("/v1/messages/count_tokens", 200)}, paths
