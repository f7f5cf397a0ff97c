"""A redis-server with AOF that a test can kill -9 and bring back on the same port (and its fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from local.redis_server import RedisServer, start_redis


class RestartableRedis:
    """A redis-server with AOF on a fixed port that a test can kill and bring back."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: RedisServer = start_redis(data_dir, appendonly=True)
        self.port = self.server.port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """kill -9: no shutdown save; what survives is what the AOF (fsync every second) holds."""
        self.server.process.kill()
        self.server.process.wait(timeout=5)

    def start(self) -> None:
        self.server = start_redis(self.data_dir, port=self.port, appendonly=True)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    """A Redis of the test's own (the session-wide one must not be killed under other tests)."""
    redis = RestartableRedis(tmp_path / "redis-aof")
    try:
        yield redis
    finally:
        redis.stop()
