"""The agent's token handoff, in a real process: the token leaves the process environment for good.

Kept apart from tests/agent/test_settings.py (a unit module): this one starts an interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fst_handoff-test_" + "ab" * 32


def test_the_handoff_re_executes_without_the_token_in_the_process_environment(tmp_path: Path) -> None:
    # A tiny program doing what the agent's main() does first; it prints what it received and its
    # own /proc/self/environ as the kernel shows it to any process of the same user.
    program = (
        "import sys, pathlib\n"
        "from agent import token_handoff\n"
        "token_handoff.hand_off([sys.executable, '-c', sys.argv[1], sys.argv[1]])\n"
        "print('received', token_handoff.receive())\n"
        "print('environ', pathlib.Path('/proc/self/environ').read_bytes())\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "FLYSWARM_SESSION_TOKEN": TOKEN,
        "ANTHROPIC_API_KEY": "sk-ant-must-go",
    }
    out = subprocess.run(
        [sys.executable, "-c", program, program],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert f"received {TOKEN}" in out
    environ_line = next(line for line in out.splitlines() if line.startswith("environ"))
    assert TOKEN not in environ_line and "sk-ant-must-go" not in environ_line
    assert "FLYSWARM_SESSION_TOKEN_FD" in environ_line  # the pipe's number only
