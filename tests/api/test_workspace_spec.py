"""``spec.workspace`` and ``spec.output.push`` at the API: bad input is a 422 naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.workspace_models import MAX_FILES_BYTES
from tests.api.app_harness import api_settings
from tests.api.test_app import client_for, error_fields
from tests.store import Store

REPO = "https://git.example.com/org/repo.git"


@pytest.fixture
async def api(store: Store, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(api_settings(redis_url), store)) as client:
        yield client


def body(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "flyswarm.dev/v1", "kind": "Session", "spec": {"prompt": "fix it", **spec}}


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        ({"workspace": {"git": [{"url": REPO, "path": "../up"}]}}, "spec.workspace.git[0].path", ".."),
        ({"workspace": {"git": [{"url": REPO, "path": "/etc"}]}}, "spec.workspace.git[0].path", "absolute"),
        ({"workspace": {"files": [{"path": "a/../../x"}]}}, "spec.workspace.files[0].path", ".."),
        ({"workspace": {"files": [{"path": "."}]}}, "spec.workspace.files[0].path", "work dir itself"),
        (
            {"workspace": {"files": [{"path": "big", "content": "x" * (MAX_FILES_BYTES + 1)}]}},
            "spec.workspace.files[0].content",
            str(MAX_FILES_BYTES),
        ),
        (
            {"workspace": {"files": [{"path": f"f{i}", "content": "x" * 200_000} for i in range(3)]}},
            "spec.workspace.files.content",
            "bytes in all",
        ),
        ({"workspace": {"files": [{"path": "f", "mode": "777x"}]}}, "spec.workspace.files[0].mode", "octal"),
        ({"workspace": {"git": [{"url": "ssh://git@host/r.git"}]}}, "spec.workspace.git[0].url", "scheme"),
        (
            {"workspace": {"git": [{"url": "https://me:tok@host/r.git"}]}},
            "spec.workspace.git[0].url",
            "secret",
        ),
        (
            {"workspace": {"git": [{"url": REPO, "ref": "--upload-pack=x"}]}},
            "spec.workspace.git[0].ref",
            "sha",
        ),
        ({"workspace": {"git": [{"url": REPO, "depth": 0}]}}, "spec.workspace.git[0].depth", "1"),
        (
            {"workspace": {"git": [{"url": REPO, "path": "a"}, {"url": REPO, "path": "a/b"}]}},
            "spec.workspace.git",
            "overlaps",
        ),
        (
            {"workspace": {"git": [{"url": "file:///srv/r.git", "secret": "s"}]}},
            "spec.workspace.git[0].secret",
            "no secret",
        ),
        ({"output": {"push": {"branch": "x"}}}, "spec.output.push.source", "to push from"),
        (
            {"output": {"push": {"branch": "a..b"}}, "workspace": {"git": [{"url": REPO}]}},
            "spec.output.push.branch",
            "new branch",
        ),
        (
            {"workspace": {"git": [{"url": REPO, "path": "src"}], "files": [{"path": "src"}]}},
            "spec.workspace",
            "where source",
        ),
    ],
)
async def test_bad_workspaces_are_refused_naming_the_field(
    api: httpx.AsyncClient, store: Store, spec: dict[str, Any], field: str, says: str
) -> None:
    response = await api.post("/sessions", json=body(**spec))
    assert response.status_code == 422, response.text
    fields = error_fields(response)
    assert field in fields, fields
    assert says in fields[field]
    assert await store.count() == 0


async def test_a_valid_workspace_is_stored_as_given(api: httpx.AsyncClient) -> None:
    spec = {
        "workspace": {
            "git": [{"url": REPO, "ref": "main", "path": "./src/", "depth": 1, "secret": "gh-bot"}],
            "files": [{"path": "CLAUDE.md", "content": "be brief", "mode": "0600"}],
        },
        "output": {"push": {"branch": "flyswarm/fix", "commitMessage": "Fix"}},
    }
    created = await api.post("/sessions", json=body(**spec))
    assert created.status_code == 201, created.text
    stored = created.json()["spec"]
    assert stored["workspace"]["git"][0]["path"] == "src"  # normalized
    assert stored["workspace"]["git"][0]["secret"] == "gh-bot"
    assert stored["output"]["push"] == {"branch": "flyswarm/fix", "commitMessage": "Fix", "source": 0}
