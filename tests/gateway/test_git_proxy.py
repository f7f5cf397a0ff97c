"""The gateway's git proxy (``/git/<index>/...``): only a live session's declared sources, only smart
HTTP, with the control plane's credential added and never handed back.

A real gateway over the suite's Redis in front of a real ``git http-backend`` behind Basic auth.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local.git_server import DEMO_FILES, GitServer, make_bare_repo, start_in_thread
from tests.gateway.conftest import GatewayRig

SECRETS = {"right": "u:p-4c1d", "wrong": "u:nope"}


@pytest.fixture(scope="module")
def git_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    root = tmp_path_factory.mktemp("git-host")
    make_bare_repo(root / "demo.git", DEMO_FILES)
    server = start_in_thread(root, credentials=SECRETS["right"])
    try:
        yield server
    finally:
        server.stop()


async def test_the_proxy_serves_declared_sources_with_the_secret_and_refuses_everything_else(
    rig: GatewayRig, http: httpx.AsyncClient, git_host: GitServer, tmp_path: Path
) -> None:
    gateway = rig.gateway(git_secrets=SECRETS)
    repo = f"{git_host.url}/demo.git"
    sources = [
        {"url": repo, "secret": "right", "path": "a"},
        {"url": repo, "secret": "wrong", "path": "b"},
        {"url": repo, "secret": "missing", "path": "c"},
        {"url": f"file://{tmp_path}", "path": "d"},
    ]
    _, token = await rig.session("gp1", workspace={"git": sources})
    auth = {"authorization": f"Bearer {token.value}"}
    base = f"{gateway.url}/git"
    upload = "info/refs?service=git-upload-pack"

    ok = await http.get(f"{base}/0/{upload}", headers=auth)
    assert ok.status_code == 200, ok.text
    assert ok.headers["content-type"] == "application/x-git-upload-pack-advertisement"
    assert b"refs/heads/main" in ok.content
    assert SECRETS["right"] not in ok.text and "authorization" not in ok.headers

    # Basic auth with the token as the password works too (what git sends after a challenge).
    basic = httpx.BasicAuth("x", token.value)
    assert (await http.get(f"{base}/0/{upload}", auth=basic)).status_code == 200

    refused = {
        "no token": await http.get(f"{base}/0/{upload}"),
        "undeclared index": await http.get(f"{base}/9/{upload}", headers=auth),
        "file source": await http.get(f"{base}/3/{upload}", headers=auth),
        "dumb protocol": await http.get(f"{base}/0/HEAD", headers=auth),
        "push not declared": await http.get(f"{base}/0/info/refs?service=git-receive-pack", headers=auth),
        "wrong credential": await http.get(f"{base}/1/{upload}", headers=auth),
        "unknown secret": await http.get(f"{base}/2/{upload}", headers=auth),
    }
    statuses = {name: r.status_code for name, r in refused.items()}
    assert statuses == {
        "no token": 401,
        "undeclared index": 404,
        "file source": 404,
        "dumb protocol": 404,
        "push not declared": 403,
        "wrong credential": 403,
        "unknown secret": 403,
    }
    assert "www-authenticate" not in refused["wrong credential"].headers  # git must not prompt
    assert "'missing' is not configured" in refused["unknown secret"].text
    for response in refused.values():
        assert SECRETS["right"] not in response.text and SECRETS["wrong"] not in response.text
