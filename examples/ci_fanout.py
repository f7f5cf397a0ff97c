"""A CI script: fan out N task sessions at once, wait for all of them, print each result.

    FLYSWARM_URL=... FLYSWARM_TOKEN=... python examples/ci_fanout.py --count 50 \\
        --prompt "Review the change in shard {i} of {count}"

Every task is labelled with this run's id (``ci-run=<id>``), so ``flyswarm get sessions -l ci-run=<id>``
shows the run. Ids are chosen here (``<run>-<i>``), which makes each create idempotent: the SDK may
retry it through a 503 or a dropped connection without ever starting a task twice. Exits 0 when
every task succeeded, 1 otherwise (or when ``--timeout`` passes first).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys

import flyswarm


async def run(count: int, prompt: str, timeout: float, concurrency: int) -> int:
    run_id = f"ci-{secrets.token_hex(3)}"
    limit = asyncio.Semaphore(concurrency)  # bounds open requests, not sessions: all N run at once
    async with flyswarm.AsyncClient() as client:

        async def one(i: int) -> flyswarm.SessionView:
            async with limit:
                created = await client.create(
                    {
                        "session_id": f"{run_id}-{i}",
                        "prompt": prompt.format(i=i, count=count),
                        "labels": {"ci-run": run_id},
                    }
                )
            return await client.wait(created.id, timeout=timeout, interval=2.0)

        print(f"run {run_id}: {count} tasks")
        outcomes = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    failed = 0
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            failed += 1
            print(f"{run_id}-{i}  ERROR      {outcome}")
            continue
        phase = flyswarm.shown_phase(outcome)
        failed += phase is not flyswarm.Phase.SUCCEEDED
        agent = outcome.agent
        result = (agent.resultText or "").strip().replace("\n", " ")[:80] if agent else ""
        cost = f"{agent.costUsd:.4f} USD" if agent and agent.costUsd is not None else "-"
        print(f"{outcome.id}  {phase.value:<10} {cost:>12}  {result}")
    print(f"run {run_id}: {count - failed} succeeded, {failed} failed")
    return 0 if failed == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="how many tasks (default 50)")
    parser.add_argument("--prompt", default="Task {i} of {count}: list the files of the work dir")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for each task")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.count, args.prompt, args.timeout, args.concurrency)))


if __name__ == "__main__":
    main()
