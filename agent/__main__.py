"""``python -m agent``: run the agent for ``FLYSWARM_SESSION_ID`` (see agent/AGENT.md)."""

from agent.runner import main

if __name__ == "__main__":
    main()
