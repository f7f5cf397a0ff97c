"""``flyswarm diff``: the workspace changes a task session's agent recorded, as a user reads them."""

from __future__ import annotations

from pathlib import Path

from api.models import AgentReport
from api.workspace_models import ChangedFile, SourceResult, WorkspaceReport
from tests.cli.conftest import Cli, store_call
from tests.store import Store

DIFF = (
    "diff --git a/app/calc.py b/app/calc.py\n"
    "--- a/app/calc.py\n+++ b/app/calc.py\n@@ -1 +1 @@\n-    return a - b\n+    return a + b\n"
)


def test_diff_prints_the_recorded_diff_and_stat_lists_the_files(
    cli: Cli, api_url: str, redis_url: str, tmp_path: Path
) -> None:
    assert (
        cli(
            "apply",
            "-f",
            "-",
            input="kind: Session\napiVersion: flyswarm.dev/v1\n"
            "metadata: {name: fixed}\nspec: {prompt: fix}\n",
        ).exit_code
        == 0
    )
    assert cli("diff", "fixed").exit_code == 1  # nothing recorded yet: said, not an empty success
    source = SourceResult(
        path="app",
        url="https://git.example.com/demo.git",
        commit="0" * 40,
        changedFiles=[
            ChangedFile(path="app/calc.py", status="modified"),
            ChangedFile(path="app/new.py", status="added"),
        ],
        diff=DIFF,
        diffBytes=len(DIFF),
    )

    async def report(store: Store) -> None:
        await store.write_agent_report(
            "fixed", AgentReport(state="done", workspace=WorkspaceReport(sources=[source]))
        )

    store_call(redis_url, report)
    shown = cli("diff", "session/fixed")
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout == DIFF
    stat = cli("diff", "fixed", "--stat")
    assert stat.stdout.splitlines() == ["M app/calc.py", "A app/new.py"]
    described = cli("describe", "session", "fixed").stdout
    assert "  Workspace:            app from 000000000000: 2 changed file(s)" in described
