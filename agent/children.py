"""The agent's child processes (the Claude Code CLI), found through /proc.

The SDK ends a CLI gently: it closes stdin and waits 5 s, then SIGTERM and 5 s more, then SIGKILL.
A CLI in the middle of a tool call does not exit on stdin EOF, so that path takes 5-10 s, longer
than a machine's stop timeout. When the agent must stop *now* (a signal, a deadline) it sends
SIGTERM to its children itself, which makes the CLI stop its tools and exit at once, and the SDK's
teardown then finds it gone. Linux only (Fly machines); elsewhere nothing is found.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def child_pids(parent: int | None = None) -> list[int]:
    parent = os.getpid() if parent is None else parent
    found: list[int] = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[0] != "Z" and int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


def signal_children(sig: signal.Signals = signal.SIGTERM) -> int:
    """Send ``sig`` to every live child of this process; returns how many were signalled."""
    count = 0
    for pid in child_pids():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            count += 1
    return count
