"""What :meth:`~flyswarm.Client.wait` waits for: a phase, one of several, or any test of the session.

``until=None`` waits for a terminal phase (Succeeded or Failed). ``wait`` also returns as soon as the
session is finished whatever ``until`` asked (a finished session never changes phase again), so a
caller that waited for ``Running`` checks ``session.status.phase`` on return.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeAlias

from flyswarm.errors import Timeout
from flyswarm.models import TERMINAL_PHASES, Phase, SessionView, shown_phase

Until: TypeAlias = Phase | str | Collection[Phase | str] | Callable[[SessionView], bool] | None
#: How often ``wait`` looks, by default (seconds).
DEFAULT_INTERVAL = 1.0
DEFAULT_TIMEOUT = 600.0


def _phase(value: Phase | str) -> Phase:
    for phase in Phase:
        if phase.value.lower() == str(value).strip().lower():
            return phase
    raise ValueError(f"unknown phase {value!r} (one of {', '.join(p.value for p in Phase)})")


def condition(until: Until) -> tuple[Callable[[SessionView], bool], str]:
    """The test of a session ``until`` names, and how to say it in a timeout message."""
    if until is None:
        return (lambda s: shown_phase(s) in TERMINAL_PHASES), "a terminal phase"
    if callable(until):
        return until, getattr(until, "__name__", "the condition")
    if isinstance(until, Phase | str):
        wanted = {_phase(until)}
    else:
        wanted = {_phase(p) for p in until}
    names = " or ".join(sorted(p.value for p in wanted))
    return (lambda s: shown_phase(s) in wanted), f"phase {names}"


def settled(session: SessionView, test: Callable[[SessionView], bool]) -> bool:
    return test(session) or shown_phase(session) in TERMINAL_PHASES


def timed_out(session: SessionView, described: str, timeout: float) -> Timeout:
    phase = shown_phase(session).value
    return Timeout(f"session {session.id} did not reach {described} within {timeout:g} s (phase is {phase})")
