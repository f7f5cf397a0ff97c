"""How a run ended: the final report's state and reason, and the process exit code.

Reasons are machine-readable CamelCase words the controller acts on (``DeadlineExceeded`` and
``BudgetExceeded`` finish a session for good; ``CliCrashed`` is worth a restart):

=====================  ========================================================================
reason                 when
=====================  ========================================================================
``ApiError``           the Messages API kept failing after the CLI's retries (429/5xx/401, ...)
``MaxTurns``           ``spec.maxTurns`` reached
``BudgetExceeded``     ``spec.maxCostUsd`` spent
``DeadlineExceeded``   ``spec.timeoutSeconds`` passed (task: whole run; chat: one turn)
``ExecutionError``     the CLI ended the run with another error result
``CliCrashed``         the CLI process died (non-zero exit, killed)
``CliUnavailable``     the CLI could not be found or started
``AgentError``         a bug or an unexpected failure in the agent itself
``Signal``             SIGTERM / SIGINT (state ``interrupted``)
``SpecInvalid``        the stored spec does not validate (start-up)
``WorkspaceFailed``    a clone or file of ``spec.workspace``, or the push, failed (agent/workspace.py)
=====================  ========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EXIT_OK = 0
EXIT_ERROR = 1  # the run failed (see the report's reason)
EXIT_CONFIG = 2  # the environment is invalid (FLYSWARM_* variables)
EXIT_SESSION = 3  # the session is missing or its spec is invalid
EXIT_UNREACHABLE = 4  # the control plane unreachable, or the session token refused, at start-up
EXIT_SIGNAL_BASE = 128  # interrupted work: 128 + signal number (143 SIGTERM, 130 SIGINT)

FinalState = Literal["done", "error", "interrupted"]


@dataclass(frozen=True)
class Outcome:
    state: FinalState
    reason: str | None = None
    message: str | None = None
    exit_code: int = EXIT_OK

    @classmethod
    def done(cls) -> Outcome:
        return cls("done")

    @classmethod
    def error(cls, reason: str, message: str | None = None) -> Outcome:
        return cls("error", reason, message, EXIT_ERROR)


def outcome_for_exception(exc: BaseException) -> Outcome:
    """Classify an exception that ended a run."""
    from claude_agent_sdk import CLIConnectionError, CLINotFoundError, ProcessError

    if isinstance(exc, TimeoutError):
        return Outcome.error("DeadlineExceeded", "the run passed spec.timeoutSeconds")
    if isinstance(exc, ProcessError):
        return Outcome.error("CliCrashed", f"the Claude Code CLI exited with code {exc.exit_code}")
    if isinstance(exc, (CLINotFoundError, CLIConnectionError)):
        return Outcome.error("CliUnavailable", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return Outcome.error("AgentError", f"{type(exc).__name__}: {exc}"[:500])
