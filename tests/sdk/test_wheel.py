"""The installed layout: a wheel built from this checkout, installed into a fresh venv, exposes
``flyswarm`` and no generic top-level package (``api``, ``cli``, ...), and its ``flyswarm`` command runs.

The wheel is built from a copy of the sources (the checkout stays clean); the fresh venv gets the
project's dependencies from this venv's site-packages by a ``.pth`` line (no network), which adds the
folder without running its own ``.pth`` files, so the editable install of the checkout is not seen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "flyswarm", "api", "controller", "agent", "gateway", "local", "cli")
SERVER_PACKAGES = ("api", "controller", "agent", "gateway", "local", "cli")

pytestmark = pytest.mark.e2e

CHECK = f"""
import importlib.util, sys
import flyswarm
leaked = [n for n in {SERVER_PACKAGES!r} if importlib.util.find_spec(n) is not None]
assert leaked == [], leaked
assert not [m for m in sys.modules if m.split(".")[0] in {SERVER_PACKAGES!r}], "loaded a top-level name"
assert flyswarm.Session.__module__ == "flyswarm._server.api.models", flyswarm.Session.__module__
assert "site-packages" in flyswarm.__file__, flyswarm.__file__
flyswarm.Client("http://127.0.0.1:9").close()
heavy = [m for m in ("fastapi", "starlette", "redis", "uvicorn") if m in sys.modules]
assert heavy == [], heavy
print("ok")
"""


@pytest.mark.timeout(120)
def test_the_wheel_installs_only_flyswarm_and_its_command_runs(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)  # type: ignore[operator]
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "-q", "-w", str(dist)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("flyswarm-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Installed before the dependencies are visible: pip must not see this venv's (editable) flyswarm.
    # Not with the suite's PYTHONPATH: the checkout's flyswarm.egg-info would pass for an installed flyswarm.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run(command, check=True, env=clean)
    (Path(purelib) / "flyswarm-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    top_level = sorted(p.name for p in Path(purelib).iterdir() if not p.name.endswith((".pth", "-info")))
    assert top_level == ["flyswarm"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    checked = subprocess.run(
        [str(python), "-c", CHECK], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert checked.stdout.strip() == "ok", checked.stderr
    helped = subprocess.run(
        [str(venv / "bin" / "flyswarm"), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert helped.returncode == 0 and "flyswarm: run Claude Agent SDK sessions" in helped.stdout, (
        helped.stderr
    )
    # The command's verbs reach the server's packages (activated for the command only).
    api_help = subprocess.run(
        [str(venv / "bin" / "flyswarm"), "api", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert api_help.returncode == 0 and "Run the HTTP API" in api_help.stdout, api_help.stderr
