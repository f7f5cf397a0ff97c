"""The package layering of DESIGN.md, enforced over the source with ``ast``.

* ``api`` imports none of the other packages;
* ``controller`` and ``agent`` import only ``api`` (never ``local``, ``cli`` or each other);
* ``local`` may import ``api`` and ``controller``;
* only the Fly client modules (``controller/fly*.py``) import httpx in the controller;
* only the store layer (``api/store.py``, ``api/transcripts.py``) imports redis in ``api``,
  ``controller`` and ``agent`` — except the leader lease, which owns its own key;
* ``controller/plan.py`` does no I/O: it imports neither httpx, redis, asyncio nor the client/store.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "controller", "agent", "local", "cli")

ALLOWED = {
    "api": set(),
    "controller": {"api"},
    "agent": {"api"},
    "local": {"api", "controller"},
    "cli": {"api", "controller", "agent", "local"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_the_layers_below_them(package: str) -> None:
    violations = []
    for path in _modules(package):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def test_only_the_fly_client_imports_httpx_in_the_controller() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in _modules("controller")
        if not p.name.startswith("fly") and any(n.split(".")[0] == "httpx" for n in _imports(p))
    ]
    assert offenders == []


def test_only_the_store_layer_talks_to_redis() -> None:
    allowed = {"api/store.py", "api/transcripts.py", "controller/leader.py"}
    offenders = []
    for package in ("api", "controller", "agent"):
        for path in _modules(package):
            rel = str(path.relative_to(ROOT))
            if rel in allowed:
                continue
            if any(n.split(".")[0] == "redis" for n in _imports(path)):
                offenders.append(rel)
    assert offenders == []


def test_plan_is_pure() -> None:
    path = ROOT / "controller" / "plan.py"
    if not path.exists():
        pytest.skip("controller/plan.py does not exist yet")
    forbidden = {
        "httpx",
        "redis",
        "asyncio",
        "controller.fly",
        "controller.executor",
        "api.store",
        "time",
        "random",
    }
    found = {n for n in _imports(path) if n in forbidden or n.split(".")[0] in {"httpx", "redis", "asyncio"}}
    assert found == set()
