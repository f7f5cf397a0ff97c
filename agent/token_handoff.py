"""How the session token gets from the machine's environment into the agent, and nowhere else.

The controller puts the session's token in the machine's environment (``FLYSWARM_SESSION_TOKEN``):
that is what a Fly machine config offers. But a process's *initial* environment stays readable in
``/proc/<pid>/environ`` for its whole life, whatever it later removes from ``os.environ``, and the
model's tools run as the same user. So the agent's first act is :func:`hand_off`: when its
environment holds the token (or another variable no tool may see), it writes the token into a pipe
and re-executes itself (same pid) with an environment without it, telling the new image only the
pipe's descriptor (``FLYSWARM_SESSION_TOKEN_FD``). The new image reads the token from the pipe and
closes it (:func:`receive`): the token then lives in the agent's memory only.

``FLYSWARM_SESSION_TOKEN_FILE`` names a file instead (e.g. a Fly ``files`` entry): it is read and
deleted at once.

A pool machine's agent starts with a pool slot token instead (``FLYSWARM_POOL_TOKEN``, see
:mod:`agent.pool_wait`): it leaves the environment the same way, through its own pipe
(``FLYSWARM_POOL_TOKEN_FD``, read by :func:`receive_pool_token`).

The CLI the agent starts gets the token as its ``ANTHROPIC_API_KEY`` (the gateway authenticates model
requests by it), so the model's tools can see that much: one token that opens only this session's
model traffic and channel, at the control plane only, and is revoked when the session ends.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TOKEN_ENV = "FLYSWARM_SESSION_TOKEN"
TOKEN_FD_ENV = "FLYSWARM_SESSION_TOKEN_FD"
TOKEN_FILE_ENV = "FLYSWARM_SESSION_TOKEN_FILE"
POOL_TOKEN_ENV = "FLYSWARM_POOL_TOKEN"
POOL_TOKEN_FD_ENV = "FLYSWARM_POOL_TOKEN_FD"
# Each secret the environment may bring, and the variable naming the pipe it is handed over in.
_HANDED_OVER = {TOKEN_ENV: TOKEN_FD_ENV, POOL_TOKEN_ENV: POOL_TOKEN_FD_ENV}
# Never present on an agent machine (the control plane holds them); dropped should an operator set them.
FORBIDDEN_ENV = (
    "FLY_API_TOKEN",
    "FLY_ACCESS_TOKEN",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "FLYSWARM_REDIS_URL",
    "FLYSWARM_REDIS_USERNAME",
    "FLYSWARM_REDIS_PASSWORD",
    "REDIS_URL",
)
_MAX_TOKEN_BYTES = 4096


def hand_off(argv: list[str] | None = None) -> None:
    """Re-execute this process without the tokens (and forbidden variables) in its environment.

    Returns only when there is nothing to hide (the re-executed image calls it again and returns).
    """
    present = {name: os.environ[name] for name in _HANDED_OVER if name in os.environ}
    if not present and not any(name in os.environ for name in FORBIDDEN_ENV):
        return
    env = {k: v for k, v in os.environ.items() if k not in _HANDED_OVER and k not in FORBIDDEN_ENV}
    for name, token in present.items():
        read_end, write_end = os.pipe()
        os.write(write_end, token.encode()[:_MAX_TOKEN_BYTES])
        os.close(write_end)
        os.set_inheritable(read_end, True)
        env[_HANDED_OVER[name]] = str(read_end)
    sys.stdout.flush()
    sys.stderr.flush()
    args = argv or [sys.executable, "-m", "agent"]
    os.execve(args[0], args, env)


def receive() -> str | None:
    """The session token handed over by :func:`hand_off` (or in a file), read once; None if none."""
    token = _read_pipe(TOKEN_FD_ENV)
    if token is not None:
        return token
    path = os.environ.pop(TOKEN_FILE_ENV, None)
    if path is not None:
        file = Path(path)
        try:
            return file.read_text().strip() or None
        except OSError:
            return None
        finally:
            file.unlink(missing_ok=True)
    return None


def receive_pool_token() -> str | None:
    """The pool slot token handed over by :func:`hand_off`, read once; None when there is none."""
    return _read_pipe(POOL_TOKEN_FD_ENV)


def _read_pipe(fd_env: str) -> str | None:
    fd = os.environ.pop(fd_env, None)
    if fd is None:
        return None
    try:
        with os.fdopen(int(fd), "rb") as pipe:
            return pipe.read(_MAX_TOKEN_BYTES).decode().strip() or None
    except (OSError, ValueError):
        return None
