"""The agent loads no Redis client and no store module, even indirectly (checked in a fresh process).

Kept apart from tests/test_layering.py, whose checks read source files only (a unit module): this one
starts an interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_agent_loads_no_redis_even_indirectly() -> None:
    # What the import statements cannot show: a shared module that pulls redis in behind them.
    program = (
        "import sys\n"
        "import agent.runner, agent.channel, agent.channel_transcripts, agent.chat, agent.task\n"
        "import local.heartbeat_agent\n"
        "loaded = sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')"
        " or m.startswith('api.store') or m == 'api.transcripts')\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() in ("", "api.store_errors"), out.stdout
