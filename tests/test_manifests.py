"""manifests/: the Fly app configs, Dockerfiles, deploy script, CI workflow and example sessions.

No Docker engine or Fly account is available here, so these tests check what can be checked
offline: every file parses, holds the settings the design needs, and agrees with the project
(extras in pyproject.toml, the Session schema, the process verbs of the CLI).
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.models import Guest, Session
from api.pool_models import Pool, fits
from cli.manifests import load

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
EXAMPLES = MANIFESTS / "examples"


def _toml(name: str) -> dict[str, Any]:
    return tomllib.loads((MANIFESTS / name).read_text())


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- fly.toml files ---------------------------------------------------------------------------------


def test_controller_app_is_always_on_in_frankfurt_with_https_and_health_checks() -> None:
    config = _toml("fly.controller.toml")

    assert config["primary_region"] == "fra"
    assert config["processes"] == {
        "api": "flyswarm api",
        "controller": "flyswarm controller",
        "gateway": "flyswarm gateway",
    }
    service = config["http_service"]
    assert service["processes"] == ["api"]
    assert service["internal_port"] == int(config["env"]["PORT"]) == 8080
    assert service["force_https"] is True
    assert service["auto_stop_machines"] == "off"
    assert service["min_machines_running"] == 1
    assert service["concurrency"]["type"] == "requests"
    assert 0 < service["concurrency"]["soft_limit"] <= service["concurrency"]["hard_limit"]
    assert [c["path"] for c in service["checks"]] == ["/readyz"]
    controller_checks = [c for c in config["checks"].values() if c.get("processes") == ["controller"]]
    assert len(controller_checks) == 1
    check = controller_checks[0]
    assert (check["type"], check["path"], check["port"]) == ("http", "/readyz", 9090)
    (gateway_check,) = [c for c in config["checks"].values() if c.get("processes") == ["gateway"]]
    assert (gateway_check["path"], gateway_check["port"]) == (
        "/readyz",
        int(config["env"]["FLYSWARM_GATEWAY_PORT"]),
    )


def test_controller_app_env_holds_no_secret_and_points_at_the_agent_app() -> None:
    config = _toml("fly.controller.toml")
    env = config["env"]

    assert not {"FLY_API_TOKEN", "REDIS_URL", "API_TOKENS", "ANTHROPIC_API_KEY"} & set(env)
    assert env["FLY_APP_NAME"] == _toml("fly.agent.toml")["app"]
    # Fly's proxy and health checks reach the processes over the VM's network, not loopback.
    assert env["HOST"] == "0.0.0.0"
    assert env["FLYSWARM_CONTROLLER_HOST"] == "0.0.0.0"


def test_agent_app_is_image_only() -> None:
    config = _toml("fly.agent.toml")

    assert config["primary_region"] == "fra"
    assert config["build"]["dockerfile"] == "Dockerfile.agent"
    assert not {"http_service", "services", "processes", "checks"} & set(config)


def test_fly_configs_name_dockerfiles_that_exist_next_to_them() -> None:
    for name in ("fly.controller.toml", "fly.agent.toml"):
        assert (MANIFESTS / _toml(name)["build"]["dockerfile"]).is_file()


# -- Dockerfiles ------------------------------------------------------------------------------------


def _pip_installs(dockerfile: str) -> list[list[str]]:
    """The argument lists of every ``pip install`` in a Dockerfile's RUN instructions."""
    text = (MANIFESTS / dockerfile).read_text().replace("\\\n", " ")
    installs = []
    for line in text.splitlines():
        if not line.startswith("RUN "):
            continue
        for command in re.split(r"&&|;", line[4:]):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"] or words[1:3] == ["-m", "pip"]:
                installs.append(words)
    return installs


def _project_targets(installs: list[list[str]]) -> list[str]:
    return [w for words in installs for w in words if w == "." or w.startswith(".[")]


def test_agent_image_installs_the_agent_extra_with_the_sdk_pinned_by_constraints() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    installs = _pip_installs("Dockerfile.agent")

    assert any(dep.startswith("claude-agent-sdk") for dep in extras["agent"])
    assert _project_targets(installs) and set(_project_targets(installs)) == {".[agent]"}
    assert all("-c" in words and "constraints.txt" in words for words in installs)


def test_controller_image_installs_without_the_sdk() -> None:
    installs = _pip_installs("Dockerfile.controller")
    lines = (MANIFESTS / "Dockerfile.controller").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))

    assert set(_project_targets(installs)) == {"."}
    assert all("-c" in words and "constraints.txt" in words for words in installs)
    assert "claude-agent-sdk" not in text and "[agent]" not in text
    # The base dependencies themselves must not pull the SDK in.
    assert not any(dep.startswith("claude-agent-sdk") for dep in _pyproject()["project"]["dependencies"])


def test_dockerfiles_run_as_non_root_on_python_311_slim() -> None:
    for name, cmd in (
        ("Dockerfile.agent", '["python", "-m", "agent"]'),
        ("Dockerfile.controller", '["flyswarm", "api"]'),
    ):
        text = (MANIFESTS / name).read_text()
        assert re.search(r"^FROM python:3\.11-slim\b", text, re.M), name
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1] not in ("root", "0"), name
        assert f"CMD {cmd}" in text, name
        assert not re.search(r"^ENV .*IS_SANDBOX", text, re.M), name


def test_dockerfiles_copy_every_package_setuptools_expects() -> None:
    # The wheel's packages come from these folders: flyswarm and the server's, mapped by package-dir.
    packages = ["flyswarm", *_pyproject()["tool"]["setuptools"]["package-dir"].values()]
    for name in ("Dockerfile.agent", "Dockerfile.controller"):
        text = (MANIFESTS / name).read_text()
        copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
        assert copied == set(packages), name


def test_dockerignore_lives_at_the_build_context_root_and_keeps_secrets_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()

    assert {".git", ".venv", ".local", "**/.env"} <= set(ignored)
    assert not (MANIFESTS / ".dockerignore").exists()


# -- .env.example -----------------------------------------------------------------------------------


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (MANIFESTS / ".env.example").read_text().splitlines():
        line = line.strip()
        if line.startswith("#") and "=" in line and re.match(r"#\s*[A-Z][A-Z0-9_]*=", line):
            line = line.lstrip("#").strip()
        elif not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        values[name.strip()] = value
    return values


def test_env_example_lists_every_setting_of_every_process() -> None:
    from agent.settings import AgentSettings
    from api.settings import ApiSettings
    from controller.settings import ControllerSettings
    from local.emulator_settings import EmulatorSettings

    documented = set(_env_example())
    expected: set[str] = set()
    for settings in (ApiSettings, ControllerSettings):
        for name, field in settings.model_fields.items():
            alias = field.validation_alias
            expected.add(alias if isinstance(alias, str) else name.upper())
    expected |= {f"FLYSWARM_{name.upper()}" for name in AgentSettings.model_fields}
    expected |= {f"FLYSWARM_EMULATOR_{name.upper()}" for name in EmulatorSettings.model_fields}
    expected |= {
        "FLYSWARM_LOCAL_DIR",
        "FLYSWARM_REDIS_PORT",
        "FLYSWARM_REDIS_MODE",
        "FLYSWARM_EMULATOR_PORT",
        "FLYSWARM_MODEL_PORT",
        "FLYSWARM_UP_TIMEOUT",
        "FLYSWARM_DOWN_TIMEOUT",
        "FLYSWARM_URL",
        "FLYSWARM_TOKEN",
        "ANTHROPIC_API_KEY",
    }
    assert expected - documented == set()


def test_env_example_sets_no_real_secret() -> None:
    values = _env_example()
    for name in ("FLY_API_TOKEN", "ANTHROPIC_API_KEY", "API_TOKENS", "FLYSWARM_TOKEN"):
        assert values.get(name, "") == "", name


# -- deploy.sh and the workflow ---------------------------------------------------------------------


def test_deploy_script_parses_and_is_strict() -> None:
    script = MANIFESTS / "deploy.sh"
    text = script.read_text()

    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "set -euo pipefail" in text
    assert "set -x" not in text
    assert script.stat().st_mode & stat.S_IXUSR


@pytest.mark.parametrize("missing", ["FLY_API_TOKEN", "REDIS_URL", "API_TOKENS", "ANTHROPIC_API_KEY"])
def test_deploy_script_refuses_to_run_without_a_required_variable(missing: str, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "FLY_API_TOKEN": "fly-secret-1",
        "REDIS_URL": "redis://:pw@redis.internal:6379",
        "API_TOKENS": "api-secret-1",
        "ANTHROPIC_API_KEY": "sk-ant-secret-1",
    }
    del env[missing]
    out = subprocess.run(
        ["bash", str(MANIFESTS / "deploy.sh"), "staging"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )

    assert out.returncode != 0
    assert missing in out.stderr
    for secret in ("fly-secret-1", "api-secret-1", "sk-ant-secret-1", "pw@"):
        assert secret not in out.stdout + out.stderr


def test_deploy_script_refuses_an_unknown_environment(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(MANIFESTS / "deploy.sh"), "prod"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        cwd=tmp_path,
    )

    assert out.returncode == 2
    assert "staging|production" in out.stderr


def test_workflow_deploys_staging_on_main_and_production_on_tags_after_lint_and_tests() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "deploy.yml").read_text())
    # YAML 1.1 reads the key `on` as True.
    triggers = workflow.get("on", workflow.get(True))

    assert triggers["push"]["branches"] == ["main"]
    assert triggers["push"]["tags"] == ["v*"]
    jobs = workflow["jobs"]
    test_steps = " ".join(str(step.get("run", "")) for step in jobs["test"]["steps"])
    assert "make lint test" in test_steps
    deploy = jobs["deploy"]
    assert deploy["needs"] == "test"
    run = " ".join(str(step.get("run", "")) for step in deploy["steps"])
    assert "manifests/deploy.sh" in run
    env = {k: v for step in deploy["steps"] for k, v in (step.get("env") or {}).items()}
    assert env["FLY_API_TOKEN"] == "${{ secrets.FLY_API_TOKEN }}"


# -- example sessions -------------------------------------------------------------------------------


def test_every_example_validates_against_the_schema_of_its_kind() -> None:
    documents = load([str(EXAMPLES)])

    assert [d.kind for d in documents].count("Session") == 13
    for doc in documents:
        model = Pool if doc.kind == "Pool" else Session
        assert model.model_validate(doc.resource).metadata.name == doc.name


def test_the_example_pool_keeps_twenty_suspended_machines_for_ci_sessions_in_fra() -> None:
    (doc,) = load([str(EXAMPLES / "pool.yaml")])
    pool = Pool.model_validate(doc.resource)
    spec = pool.spec

    assert (spec.mode, spec.size, spec.template.region) == ("suspended", 20, "fra")
    assert spec.template.guest == Guest(cpuKind="shared", cpus=1, memoryMb=1024)
    assert spec.selector is not None and spec.selector.matchLabels == {"team": "ci"}
    ci_session = {**load([str(EXAMPLES / "task.yaml")])[0].resource}
    ci_session["metadata"] = {**ci_session["metadata"], "labels": {"team": "ci"}}
    assert fits(spec, Session.model_validate(ci_session))
    assert not fits(spec, Session.model_validate(load([str(EXAMPLES / "task.yaml")])[0].resource))


def test_examples_cover_a_task_a_sleeping_chat_and_a_labelled_batch_of_ten() -> None:
    task = load([str(EXAMPLES / "task.yaml")])
    chat = load([str(EXAMPLES / "chat.yaml")])
    batch = load([str(EXAMPLES / "batch.yaml")])

    assert [d.resource["spec"].get("mode", "task") for d in task] == ["task"]
    chat_spec = Session.model_validate(chat[0].resource).spec
    assert (chat_spec.mode, chat_spec.idleTimeoutSeconds, chat_spec.sleep) == ("chat", 300, "suspend")
    # Fly suspends only machines of up to 2 GB.
    assert chat_spec.machine.guest.memoryMb <= 2048
    assert len(batch) == 10
    labels = [Session.model_validate(d.resource).metadata.labels for d in batch]
    assert all(label.get("batch") == "word-count" for label in labels)
    assert len({d.name for d in batch}) == 10


def test_the_fix_bug_example_clones_the_local_demo_repository_the_stack_serves() -> None:
    from local.stack import StackConfig

    (doc,) = load([str(EXAMPLES / "fix-bug.yaml")])
    spec = Session.model_validate(doc.resource).spec
    assert spec.workspace is not None and spec.mode == "task"
    port = StackConfig.from_env({}).git_port
    assert [s.url for s in spec.workspace.git] == [f"http://127.0.0.1:{port}/demo.git"]


FAKE_FLYCTL = r"""#!/usr/bin/env bash
# A stand-in for flyctl that keeps its state in files: apps, secrets per app, every command line.
set -euo pipefail
state=$FAKE_FLY_STATE
printf '%s\n' "$*" >> "$state/argv"
case "$1 $2" in
  "status --app") [[ -e "$state/apps/$3" ]] ;;
  "apps create") mkdir -p "$state/apps" && touch "$state/apps/$3" ;;
  "secrets import") mkdir -p "$state/secrets" && cat >> "$state/secrets/$4" ;;
  "secrets list") cat "$state/secrets/$4" 2>/dev/null || true ;;
  "secrets unset") sed -i "/^$3=/d" "$state/secrets/$5" ;;
  "deploy .") ;;
  *) echo "fake flyctl: unexpected $*" >&2; exit 64 ;;
esac
"""

SECRETS = {
    "FLY_API_TOKEN": "fly-secret-1",
    "REDIS_URL": "redis://default:redis-pw-1@redis.internal:6379/0",
    "API_TOKENS": "api-secret-1,api-secret-2",
    "ANTHROPIC_API_KEY": "sk-ant-secret-1",
}


def _run_deploy(
    tmp_path: Path, *, existing_state: bool = False, **extra: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    state = tmp_path / "fly"
    state.mkdir(exist_ok=existing_state)
    flyctl = tmp_path / "flyctl"
    flyctl.write_text(FAKE_FLYCTL)
    flyctl.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "FLYCTL": str(flyctl),
        "FAKE_FLY_STATE": str(state),
        "FLYSWARM_IMAGE_LABEL": "abc123",
        **SECRETS,
        **extra,
    }
    out = subprocess.run(
        ["bash", str(MANIFESTS / "deploy.sh"), "staging"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    return out, state


def test_deploy_puts_each_secret_on_its_app_through_stdin_only(tmp_path: Path) -> None:
    out, state = _run_deploy(tmp_path)

    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (state / "apps").iterdir()) == [
        "flyswarm-agents-staging",
        "flyswarm-staging",
    ]
    # Every secret, the Anthropic key included, is the control plane's; the agent app holds none.
    assert not (state / "secrets" / "flyswarm-agents-staging").exists()
    controller = (state / "secrets" / "flyswarm-staging").read_text().splitlines()
    assert sorted(controller) == sorted(f"{k}={v}" for k, v in SECRETS.items())
    argv = (state / "argv").read_text()
    for value in SECRETS.values():
        assert value not in argv
        assert value not in out.stdout + out.stderr
    deploys = [line for line in argv.splitlines() if line.startswith("deploy ")]
    assert len(deploys) == 2
    assert "--build-only --push" in deploys[0] and "--image-label staging-abc123" in deploys[0]
    assert "FLY_AGENT_IMAGE=registry.fly.io/flyswarm-agents-staging:staging-abc123" in deploys[1]
    assert "FLY_APP_NAME=flyswarm-agents-staging" in deploys[1]
    assert "FLYSWARM_AGENT_GATEWAY_URL=http://gateway.process.flyswarm-staging.internal:8082" in deploys[1]


def test_deploy_removes_a_key_an_older_deploy_left_on_the_agent_app(tmp_path: Path) -> None:
    state = tmp_path / "fly"
    (state / "secrets").mkdir(parents=True)
    (state / "secrets" / "flyswarm-agents-staging").write_text("ANTHROPIC_API_KEY=sk-ant-old\n")
    out, state = _run_deploy(tmp_path, existing_state=True)

    assert out.returncode == 0, out.stderr
    assert (state / "secrets" / "flyswarm-agents-staging").read_text() == ""
    assert "secrets unset ANTHROPIC_API_KEY --app flyswarm-agents-staging" in (state / "argv").read_text()


def test_deploy_gives_the_controller_its_own_fly_token_when_one_is_set(tmp_path: Path) -> None:
    out, state = _run_deploy(tmp_path, FLYSWARM_CONTROLLER_FLY_API_TOKEN="scoped-secret-9")

    assert out.returncode == 0, out.stderr
    controller = (state / "secrets" / "flyswarm-staging").read_text().splitlines()
    assert "FLY_API_TOKEN=scoped-secret-9" in controller
    assert "scoped-secret-9" not in (state / "argv").read_text() + out.stdout + out.stderr


def test_deploy_refuses_a_secret_that_flyctl_import_would_alter(tmp_path: Path) -> None:
    out, state = _run_deploy(tmp_path, API_TOKENS="token-with-#-hash")

    assert out.returncode == 1
    assert "API_TOKENS contains" in out.stderr
    assert "token-with-#-hash" not in out.stdout + out.stderr
    assert not (state / "secrets").exists() and not (state / "argv").exists()


def test_deploy_creates_every_agent_app_and_points_the_controller_at_all_of_them(tmp_path: Path) -> None:
    state = tmp_path / "fly"
    (state / "secrets").mkdir(parents=True)
    (state / "secrets" / "agents-b").write_text("ANTHROPIC_API_KEY=sk-ant-old\n")
    out, state = _run_deploy(tmp_path, existing_state=True, FLYSWARM_AGENT_APPS="agents-a, agents-b")

    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (state / "apps").iterdir()) == ["agents-a", "agents-b", "flyswarm-staging"]
    assert (state / "secrets" / "agents-b").read_text() == ""  # no agent app keeps an old key
    deploys = [line for line in (state / "argv").read_text().splitlines() if line.startswith("deploy ")]
    assert "--app agents-a" in deploys[0]  # the image is pushed once, to the first app
    assert "FLY_AGENT_IMAGE=registry.fly.io/agents-a:staging-abc123" in deploys[1]
    assert "FLY_APP_NAME=agents-a" in deploys[1] and "FLYSWARM_FLY_APPS=agents-a,agents-b" in deploys[1]

    (tmp_path / "bad").mkdir()
    refused, _ = _run_deploy(tmp_path / "bad", FLYSWARM_AGENT_APPS="agents-a,Agents_B")
    assert refused.returncode == 1 and "Agents_B" in refused.stderr
