"""Benchmark of waking a sleeping chat session: message -> ``turn_started``, on the local stack.

A chat session with ``idleTimeoutSeconds: 1`` falls asleep after every turn; it is then sent a
message either (a) the moment ``status.phase`` turns ``Sleeping`` (its machine is still
``suspending``/``stopping``: the race that used to wait for the next resync) or (b) once the
machine has settled (``suspended``/``stopped``). The figure is the time from the ``POST
/sessions/{id}/messages`` to the agent's ``turn_started`` event (stamped by the agent), p50 / p95 /
max over ``--rounds`` rounds, for ``sleep: suspend`` and ``sleep: stop``.

The whole local stack runs (``flyswarm up`` in a temporary state directory on free ports: Redis,
the Fly emulator, the scripted model, the API, the controller with its default 15 s resync) and the
machines run the real agent (real SDK and CLI). The emulator's transition times are set per state
through ``FLYSWARM_EMULATOR_TRANSITION_DELAYS``; two profiles are measured:

* ``local``: the emulator's defaults (every transient state visible for 0.2 s);
* ``fly``: Fly-like latencies (suspending 0.5 s, starting 0.5 s - a resume takes hundreds of ms -,
  stopping 1.5 s).

A woken ``stop`` session boots a fresh agent (Python start-up, the SDK import, the CLI), so its
figure includes that; a ``suspend`` session resumes the same process.

Goals (issue #9): worst case <= 1.5 s for suspend and <= 5 s for stop, where the old controller
took up to 16 s and 15 s (the resync interval).

Run: ``python bench/wake.py`` (a few minutes), or ``--profiles local --rounds 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from api.models import Phase, utcnow  # noqa: E402
from api.store import ApiStore as Store  # noqa: E402
from local.redis_server import free_port  # noqa: E402

PROFILES: dict[str, dict[str, float]] = {
    "local": {},
    "fly": {"suspending": 0.5, "starting": 0.5, "stopping": 1.5},
}
GOALS = {"suspend": 1.5, "stop": 5.0}
BEFORE = {"suspend": 16.0, "stop": 15.0}
SETTLED = {"suspend": "suspended", "stop": "stopped"}


class LocalStack:
    """``flyswarm up`` / ``down`` in a temporary state directory on free ports."""

    def __init__(self, root: Path, delays: dict[str, float]) -> None:
        self.root = root
        self.env = dict(os.environ)
        self.env.pop("ANTHROPIC_API_KEY", None)
        self.env.update(
            FLYSWARM_LOCAL_DIR=str(root),
            FLYSWARM_REDIS_PORT=str(free_port()),
            FLYSWARM_EMULATOR_PORT=str(free_port()),
            FLYSWARM_MODEL_PORT=str(free_port()),
            PORT=str(free_port()),
            FLYSWARM_CONTROLLER_PORT=str(free_port()),
            FLYSWARM_EMULATOR_TRANSITION_DELAYS=json.dumps(delays),
            LOG_LEVEL="warning",
        )

    def _cli(self, verb: str) -> None:
        subprocess.run(
            [sys.executable, "-c", "from cli.main import main; main()", verb],
            env=self.env,
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def up(self) -> None:
        self._cli("up")

    def down(self) -> None:
        self._cli("down")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['PORT']}"

    @property
    def emulator_url(self) -> str:
        return f"http://127.0.0.1:{self.env['FLYSWARM_EMULATOR_PORT']}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.env['FLYSWARM_REDIS_PORT']}/0"

    def fly_token(self) -> str:
        return (self.root / "secrets" / "fly-api-token").read_text().strip()


async def _until(check: Any, timeout: float, what: str, every: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


async def _machine_state(fly: httpx.AsyncClient, app: str, machine_id: str) -> str:
    response = await fly.get(f"/v1/apps/{app}/machines/{machine_id}")
    return str(response.json().get("state")) if response.status_code == 200 else "unknown"


#: Milestones of a wake, in order, as the event stream shows them (the last one is the figure).
MILESTONES = ("lifecycle:Wake", "agent_started", "run_started", "turn_started")


async def _turn_started(
    store: Store, session_id: str, message_id: str, after: str | None
) -> tuple[datetime, str, dict[str, datetime]] | None:
    seen: dict[str, datetime] = {}
    for stored in await store.read_events(session_id, after_id=after, count=1000):
        event = stored.event
        key = f"lifecycle:{event.reason}" if event.type == "lifecycle" else event.type
        if key in MILESTONES:
            seen.setdefault(key, event.time)
        if event.type == "turn_started" and event.data.get("messageId") == message_id:
            return event.time, stored.id, seen
    return None


async def measure(stack: LocalStack, sleep: str, rounds: int) -> dict[str, list[float]]:
    """``rounds`` wakes of each kind (a: at Sleeping, b: settled) for one ``sleep`` mode."""
    session_id = f"wake-{sleep}"
    store = Store.from_url(stack.redis_url)
    api = httpx.AsyncClient(base_url=stack.api_url, timeout=30)
    fly = httpx.AsyncClient(
        base_url=stack.emulator_url, headers={"Authorization": f"Bearer {stack.fly_token()}"}, timeout=30
    )
    app = stack.env.get("FLY_APP_NAME", "flyswarm-agents")
    results: dict[str, list[float]] = {"at_sleeping": [], "settled": []}
    #: (kind, milestone) -> seconds after the POST, for the breakdown line.
    steps: dict[tuple[str, str], list[float]] = {}
    try:
        response = await api.post(
            "/sessions",
            json={
                "metadata": {"name": session_id},
                "spec": {"mode": "chat", "idleTimeoutSeconds": 1, "sleep": sleep},
            },
        )
        response.raise_for_status()
        cursor: str | None = None
        for index in range(rounds * 2):
            kind = "at_sleeping" if index % 2 == 0 else "settled"

            async def sleeping() -> Any:
                session = await store.get(session_id)
                if session is None or session.status.phase is not Phase.SLEEPING:
                    return None
                return session

            session = await _until(sleeping, 120, "the session to fall asleep")
            if kind == "settled":
                machine_id = session.status.machineId

                async def settled(mid: str = machine_id) -> bool:
                    return await _machine_state(fly, app, mid) == SETTLED[sleep]

                await _until(settled, 60, "the machine to settle", every=0.05)
                await asyncio.sleep(0.5)
            sent_at = utcnow()
            reply = await api.post(
                f"/sessions/{session_id}/messages", json={"text": f"[[scenario:text]] round {index}"}
            )
            reply.raise_for_status()
            message_id = reply.json()["id"]

            async def started(mid: str = message_id, after: str | None = cursor) -> Any:
                return await _turn_started(store, session_id, mid, after)

            at, cursor, seen = await _until(started, 60, "turn_started")
            results[kind].append((at - sent_at).total_seconds())
            for name, when in seen.items():
                if when < sent_at:
                    continue  # an earlier boot's milestone
                steps.setdefault((kind, name), []).append((when - sent_at).total_seconds())

            async def answered(mid: str = message_id, after: str | None = cursor) -> bool:
                # The turn's end (a message may also be answered by the agent that was just going
                # to sleep: then the session never leaves Sleeping, and that is right).
                for stored in await store.read_events(session_id, after_id=after, count=1000):
                    event = stored.event
                    if event.type in ("turn_finished", "turn_failed") and event.data.get("messageId") == mid:
                        return True
                return False

            await _until(answered, 60, "the turn to finish")
    finally:
        await api.delete(f"/sessions/{session_id}")
        await api.aclose()
        await fly.aclose()
        await store.close()
    for (kind, name), values in sorted(steps.items()):
        results[f"{kind}:{name}"] = values
    return results


def _row(label: str, values: list[float], goal: float, before: float) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    worst = max(ordered)
    verdict = "meets" if worst <= goal else "MISSES"
    return (
        f"  {label:<26} n={len(values):<3} p50 {statistics.median(ordered):6.2f} s   p95 {p95:6.2f} s   "
        f"max {worst:6.2f} s   goal max <= {goal:.1f} s ({verdict}; before: up to {before:.0f} s)"
    )


async def run(args: argparse.Namespace) -> None:
    for profile in args.profiles:
        delays = PROFILES[profile]
        shown = json.dumps(delays) if delays else "emulator defaults (0.2 s per transient state)"
        print(f"profile {profile}: FLYSWARM_EMULATOR_TRANSITION_DELAYS = {shown}", flush=True)
        with tempfile.TemporaryDirectory(prefix="flyswarm-wake-") as tmp:
            stack = LocalStack(Path(tmp) / "local", delays)
            stack.up()
            try:
                for sleep in args.sleeps:
                    results = await measure(stack, sleep, args.rounds)
                    print(f" sleep: {sleep}  (message -> turn_started)")
                    for kind, label in (
                        ("at_sleeping", "(a) sent at Sleeping"),
                        ("settled", "(b) after it settled"),
                    ):
                        print(_row(label, results[kind], GOALS[sleep], BEFORE[sleep]), flush=True)
                        parts = [
                            f"{name} {statistics.median(results[f'{kind}:{name}']):.2f} s"
                            for name in MILESTONES
                            if f"{kind}:{name}" in results
                        ]
                        print(f"      medians after the POST: {', '.join(parts)}", flush=True)
            finally:
                stack.down()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--sleeps", nargs="+", default=["suspend", "stop"], choices=["suspend", "stop"])
    parser.add_argument("--rounds", type=int, default=10)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
