"""The package layering of DESIGN.md, enforced over the source with ``ast``.

* ``api`` imports none of the other packages;
* ``controller``, ``agent`` and ``gateway`` import only ``api`` (never ``local``, ``cli`` or each other);
* ``local`` may import ``api``, ``controller`` and ``agent`` (the stand-in agent uses the agent's channel);
* only the Fly client modules (``controller/fly*.py``) import httpx in the controller;
* only the store layer (``api/store.py``, ``api/store_*.py``, ``api/transcripts.py``) imports redis
  in ``api``, ``controller`` and ``gateway``;
* the agent imports no store module and no redis, even indirectly (it holds no Redis credential:
  its state goes through the control plane's agent channel); it shares only the store's errors
  (``api.store_errors``) and the transcript shapes (``api.transcript_types``), neither of which loads redis;
* each role imports only its own store: ``api`` the API's (``api.store``), ``controller`` the
  controller's (``api.store_controller``), ``gateway`` the gateway's (``api.store_gateway``) and the
  agent channel's (``api.store_channel``); the shared base (``api.store_base``: errors, helpers) is
  open to all but the agent;
* no code outside the store reaches the Redis client through attribute access
  (``self.store.redis.hset(...)``, ``store._redis``, ``x.pubsub()``, ``x.register_script(...)``):
  an import check alone cannot see that;
* ``controller/plan.py`` does no I/O: it imports neither httpx, redis, asyncio nor the client/store.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "controller", "agent", "gateway", "local", "cli", "flyswarm")

ALLOWED = {
    "api": set(),
    "controller": {"api"},
    "agent": {"api"},
    "gateway": {"api"},
    "local": {"api", "controller", "agent", "flyswarm"},
    "cli": {"api", "controller", "agent", "gateway", "local", "flyswarm"},
    "flyswarm": {"api"},
}
#: The ``flyswarm`` command's entry point runs the CLI (after making the server's packages importable).
ENTRY_POINTS = {ROOT / "flyswarm" / "_server" / "__init__.py": {"cli"}}
#: The SDK loads only the resource models (pydantic, no FastAPI, no Redis): flyswarm/_server/__init__.py.
SDK_API_MODULES = {"api.models", "api.pool_models", "api.webhook_models"}


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
            if (
                top in PACKAGES
                and top != package
                and top not in ALLOWED[package] | ENTRY_POINTS.get(path, set())
            ):
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def test_the_sdk_imports_only_the_resource_models() -> None:
    used = {name for path in _modules("flyswarm") for name in _imports(path) if name.split(".")[0] == "api"}
    assert used <= SDK_API_MODULES
    for module in SDK_API_MODULES | {"api.reasons", "api.workspace_models", "api.notify_models"}:
        path = ROOT / (module.replace(".", "/") + ".py")
        # Relative imports only among themselves: they load as flyswarm._server.api.* from a wheel.
        assert not {n for n in _imports(path) if n.split(".")[0] in PACKAGES}, module


# The controller's one other outbound HTTP client: webhook deliveries (with the SSRF guard).
WEBHOOK_CLIENT = {"webhook_sender.py"}


def test_only_the_fly_client_imports_httpx_in_the_controller() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in _modules("controller")
        if not p.name.startswith("fly")
        and p.name not in WEBHOOK_CLIENT
        and any(n.split(".")[0] == "httpx" for n in _imports(p))
    ]
    assert offenders == []


STORE_MODULES = {
    "api.store",
    "api.store_pool_records",
    "api.store_agent",
    "api.store_controller",
    "api.store_teardown",
    "api.store_lease",
    "api.store_gateway",
    "api.store_tokens",
    "api.store_volumes",
    "api.store_channel",
    "api.store_shards",
    "api.store_artifacts",
    "api.store_files",
    "api.store_pool_handoff",
    "api.store_pool_claims",
    "api.store_pool_slots",
    "api.store_webhooks",
    "api.store_webhook_queue",
    "api.transcripts",
}
SHARED_STORE_MODULES = {"api.store_base", "api.store_pools"}
# Runs Redis servers rather than storing data: forms a local cluster with CLUSTER commands, no keys.
REDIS_LAUNCHERS = {"local.redis_cluster"}
ROLE_STORES = {
    "api": {"api.store", "api.store_artifacts"},
    "controller": {"api.store_controller"},
    "agent": set(),
    "gateway": {"api.store_gateway", "api.store_channel", "api.store_artifacts", "api.store_pool_slots"},
    "local": set(),
    "cli": set(),
    "flyswarm": set(),
}
# Methods of the redis client (and its pipelines and pub/sub objects) that only the store calls.
RAW_CLIENT_METHODS = {
    "pubsub",
    "psubscribe",
    "subscribe",
    "register_script",
    "execute_command",
    "pipeline",
    "scan_iter",
    "publish",
    "xadd",
    "xread",
    "xrange",
    "xrevrange",
    "hset",
    "hget",
    "hgetall",
    "smembers",
    "sadd",
    "zadd",
    "zrange",
    "zrangebylex",
    "acl_setuser",
    "acl_deluser",
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _is_store_module(path: Path) -> bool:
    return _module_name(path) in STORE_MODULES | SHARED_STORE_MODULES


def _imported_names(path: Path) -> set[str]:
    """Modules imported, plus ``module.name`` for each ``from module import name``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = _imports(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_store_layer_talks_to_redis() -> None:
    offenders = []
    for package in ("api", "controller", "agent", "gateway", "local"):
        for path in _modules(package):
            if (
                _is_store_module(path)
                or (package == "local" and path.name == "redis_server.py")
                or _module_name(path) in REDIS_LAUNCHERS
            ):
                continue
            if any(n.split(".")[0] == "redis" for n in _imports(path)):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_agent_imports_no_store_module_and_no_redis() -> None:
    offenders = []
    for path in _modules("agent"):
        for name in _imported_names(path):
            if name.split(".")[0] == "redis" or name in STORE_MODULES | SHARED_STORE_MODULES:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
            elif name.rsplit(".", 1)[0] in STORE_MODULES | SHARED_STORE_MODULES:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


@pytest.mark.parametrize("package", PACKAGES)
def test_each_role_imports_only_its_own_store(package: str) -> None:
    allowed = ROLE_STORES[package] | (SHARED_STORE_MODULES if package != "agent" else set())
    violations = []
    for path in _modules(package):
        if _is_store_module(path):
            continue
        for name in _imported_names(path):
            module = name if name in STORE_MODULES | SHARED_STORE_MODULES else name.rsplit(".", 1)[0]
            if module in STORE_MODULES and module not in allowed:
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def _raw_client_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = ast.unparse(node.value)
        if node.attr in {"redis", "_redis"} and "store" in owner.lower():
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.attr}")
        elif node.attr in RAW_CLIENT_METHODS:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.attr}")
    return found


def test_no_code_outside_the_store_reaches_the_redis_client() -> None:
    offenders = []
    for package in PACKAGES:
        for path in _modules(package):
            if not _is_store_module(path) and _module_name(path) not in REDIS_LAUNCHERS:
                offenders += _raw_client_uses(path)
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
