"""``flyswarm`` with webhooks against a real API (uvicorn + Redis): apply, get, describe, deliveries."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import redis

from api import keys
from tests.cli.conftest import Cli

HOOK = """
apiVersion: flyswarm.dev/v1
kind: Webhook
metadata: {name: ci-hook}
spec:
  url: https://hooks.example.com/flyswarm
  selector: {matchLabels: {team: ci}}
  events: [session.finished, session.budget_warning]
"""


def test_apply_get_describe_deliveries_and_delete_a_webhook(
    cli: Cli, api_url: str, clean_redis: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "hook.yaml"
    path.write_text(textwrap.dedent(HOOK))
    applied = cli("apply", "-f", str(path))
    assert applied.exit_code == 0, applied.stderr
    assert applied.stdout.splitlines() == ["webhook/ci-hook created"]
    secret = applied.stderr.strip().rsplit(" ", 1)[-1]
    assert "shown once" in applied.stderr and secret.startswith("whsec_")
    assert clean_redis.hget(keys.webhook("ci-hook"), "secret") == secret
    again = cli("apply", "-f", str(path))
    assert again.stdout.splitlines() == ["webhook/ci-hook unchanged"] and "whsec_" not in again.stderr

    table = cli("get", "webhooks")
    assert table.exit_code == 0
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "URL", "SELECTOR", "EVENTS"]
    assert row.split()[0] == "ci-hook" and row.split()[-2] == "set"
    assert "team=ci" in row and "finished,budget_warning" in row and "https://hooks.exa" in row
    as_yaml = cli("get", "webhook", "ci-hook", "-o", "yaml")
    assert "secretSet: true" in as_yaml.stdout and secret not in as_yaml.stdout
    names = cli("get", "webhooks", "-o", "name")
    assert names.stdout.splitlines() == ["webhook/ci-hook"]

    described = cli("describe", "webhook", "ci-hook")
    assert described.exit_code == 0 and "set (write-only)" in described.stdout
    assert "No deliveries yet." in described.stdout and secret not in described.stdout
    listed = cli("deliveries", "webhook", "ci-hook", "-o", "json")
    assert listed.exit_code == 0 and json.loads(listed.stdout) == {"items": []}
    assert cli("deliveries", "pool", "x").exit_code == 2

    deleted = cli("delete", "webhook/ci-hook")
    assert deleted.exit_code == 0 and deleted.stdout.splitlines() == ["webhook/ci-hook deleted"]
    assert not clean_redis.exists(keys.webhook("ci-hook"))
    assert cli("get", "webhook", "ci-hook").exit_code == 1


def test_a_webhook_manifest_is_checked_before_anything_is_sent(
    cli: Cli, api_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent(
            HOOK.replace("metadata: {name: ci-hook}", "metadata: {}").replace("https://", "ftp://")
        )
    )
    result = cli("apply", "-f", str(path))
    assert result.exit_code == 1
    assert "metadata.name: required (a Webhook is named)" in result.stderr
