"""``flyswarm`` with pools against a real API (uvicorn + Redis): apply, get, describe, delete."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import redis
import yaml

from api import keys
from tests.cli.conftest import Cli

MIXED = """
apiVersion: flyswarm.dev/v1
kind: Session
metadata: {name: ci-job, labels: {team: ci}}
spec: {prompt: run the tests}
---
apiVersion: flyswarm.dev/v1
kind: Pool
metadata: {name: ci-fra, labels: {team: ci}}
spec:
  size: {size}
  mode: suspended
  template: {region: fra, guest: {cpuKind: shared, cpus: 1, memoryMb: 1024}}
  selector: {matchLabels: {team: ci}}
"""


def test_apply_of_a_session_and_a_pool_then_get_describe_and_delete_the_pool(
    cli: Cli, api_url: str, clean_redis: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text(textwrap.dedent(MIXED.replace("{size}", "20")))
    applied = cli("apply", "-f", str(path))
    assert applied.exit_code == 0, applied.stderr
    assert applied.stdout.splitlines() == ["session/ci-job created", "pool/ci-fra created"]
    assert clean_redis.exists(keys.session("ci-job")) and clean_redis.zscore(keys.POOLS, "ci-fra") == 0
    assert cli("apply", "-f", str(path)).stdout.splitlines()[1] == "pool/ci-fra unchanged"
    path.write_text(textwrap.dedent(MIXED.replace("{size}", "30")))
    assert cli("apply", "-f", str(path)).stdout.splitlines() == [
        "session/ci-job unchanged",
        "pool/ci-fra configured",
    ]

    # What the controller would write: counts and a condition.
    status = {
        "ready": 25,
        "booting": 3,
        "claimed": 2,
        "lastError": "create: 429 Too Many Requests",
        "conditions": [
            {
                "type": "Filled",
                "status": "False",
                "reason": "Refilling",
                "lastTransitionTime": "2026-12-01T05:00:00Z",
            }
        ],
    }
    clean_redis.hset(keys.pool("ci-fra"), "status", json.dumps(status))

    table = cli("get", "pools").stdout.splitlines()
    assert table[0].split() == ["NAME", "MODE", "SIZE", "READY", "BOOTING", "CLAIMED", "AGE"]
    assert table[1].split()[:6] == ["ci-fra", "suspended", "30", "25", "3", "2"]
    assert cli("get", "pools", "-l", "team=web").stdout.strip() == "No pools found."
    assert cli("get", "pools", "-o", "name").stdout.strip() == "pool/ci-fra"
    wide = cli("get", "pools", "-o", "wide").stdout
    assert "TEMPLATE" in wide and "fra shared-cpu-1x" in wide  # cut to fit 80 columns
    assert all(len(line) <= 80 for line in wide.splitlines())

    as_yaml = cli("get", "pool", "ci-fra", "-o", "yaml").stdout
    resource = yaml.safe_load(as_yaml)
    assert (resource["kind"], resource["spec"]["size"], resource["status"]["ready"]) == ("Pool", 30, 25)
    back = tmp_path / "back.yaml"
    back.write_text(as_yaml)
    assert cli("apply", "-f", str(back)).stdout.strip() == "pool/ci-fra unchanged"

    page = cli("describe", "pool", "ci-fra").stdout
    for line in (
        "Template:             fra shared-cpu-1x 1024MB",
        "Serves sessions:      team=ci",
        "Ready:                25",
        "Last error:           create: 429 Too Many Requests",
    ):
        assert f"  {line}" in page, line
    assert "Filled" in page and "Refilling" in page

    deleted = cli("delete", "pool", "ci-fra", "ghost")
    assert deleted.exit_code == 1
    assert deleted.stdout.strip() == "pool/ci-fra deleted" and "pool/ghost not found" in deleted.stderr
    assert clean_redis.hexists(keys.pool("ci-fra"), "deleted")
    assert cli("get", "pools").stdout.splitlines()[1].split()[:2] == ["ci-fra", "suspended"]
    assert "(deleting)" in cli("get", "pools").stdout
    assert cli("get", "pools", "--phase", "Running").exit_code == 2
    assert clean_redis.exists(keys.session("ci-job")) and not clean_redis.hexists(
        keys.session("ci-job"), "deleted"
    )


def test_an_invalid_pool_document_is_named_by_file_document_and_field_and_nothing_is_sent(
    cli: Cli, api_url: str, clean_redis: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent(
            """
            apiVersion: flyswarm.dev/v1
            kind: Pool
            spec: {size: 1}
            ---
            apiVersion: flyswarm.dev/v1
            kind: Pool
            metadata: {name: big}
            spec:
              size: 5
              maxSize: 2
              template: {guest: {cpuKind: performance, cpus: 2, memoryMb: 4096}}
            """
        )
    )
    result = cli("apply", "-f", str(path))

    assert result.exit_code == 1
    assert f"{path}: document 1: metadata.name: required (a Pool is named)" in result.stderr
    assert f"{path}: document 2: spec.maxSize: must be at least size (5)" in result.stderr
    assert clean_redis.zcard(keys.POOLS) == 0
    fixed = path.read_text().replace("maxSize: 2", "maxSize: 6")
    path.write_text(fixed.split("---")[1])
    refused = cli("apply", "-f", str(path))
    assert refused.exit_code == 1
    assert f"{path}: document 1: spec.template.guest.memoryMb: Fly suspends only machines" in refused.stderr
