"""``python -m agent``: run the agent for ``FLYSWARM_SESSION_ID`` (see agent/AGENT.md).

The token handoff (a re-exec without the session or pool token in the environment) comes before
anything else is imported: the imports of :mod:`agent.runner` would otherwise be paid twice, and
the token would stay readable in ``/proc/<pid>/environ`` for as long as they take.
"""

from agent import token_handoff

if __name__ == "__main__":
    token_handoff.hand_off()
    from agent.runner import main

    main()
