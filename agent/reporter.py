"""The agent's report: the ``agent`` part of the Session, written by the agent alone.

The reporter keeps the current report in memory and writes the whole of it on every change
(the store puts it in its own hash field, so it never clobbers spec or status). Progress writes are
retried briefly when the control plane is away; one that cannot be written is logged, and the next
change writes the whole state again anyway. A *durable* write (the final report, a finished turn) is
retried until the control plane stores it - through an outage of it or of its Redis - or until the
machine is told to stop: a finished result is never lost, so it is never computed again.

Once the agent starts to stop on a signal the state is *locked* to ``interrupted``: a turn that
ends while the agent is shutting down can still add its cost, but cannot make the report say idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from agent.channel import AgentChannel
from api.logs import get_logger
from api.models import AgentReport, AgentState, utcnow
from api.store_errors import StoreUnavailable

log = get_logger("agent.reporter")


class Reporter:
    def __init__(
        self,
        store: AgentChannel,
        session_id: str,
        report: AgentReport,
        *,
        give_up: asyncio.Event | None = None,
    ) -> None:
        self._store = store
        self._session_id = session_id
        self.report = report
        self._lock = asyncio.Lock()
        self._locked_state: AgentState | None = None
        self.write_attempts = 5
        #: Set when the machine is told to stop: durable writes fall back to a few attempts.
        self.give_up = give_up or asyncio.Event()
        self.max_retry_delay = 2.0

    @property
    def state(self) -> str:
        return self.report.state

    def lock_state(self, state: AgentState) -> None:
        self._locked_state = state

    async def update(self, *, durable: bool = False, **changes: Any) -> AgentReport:
        """Change the report and write it whole; ``durable``: retry until stored (see above)."""
        async with self._lock:
            if self._locked_state is not None:
                changes["state"] = self._locked_state
            changes["updatedAt"] = utcnow()
            self.report = self.report.model_copy(update=changes)
            stored = await self.persist(
                lambda: self._store.write_agent_report(self._session_id, self.report),
                what="report",
                durable=durable,
            )
            if not stored:
                log.error("report_not_stored", state=self.report.state)
            return self.report

    async def persist(self, write: Callable[[], Awaitable[object]], *, what: str, durable: bool) -> bool:
        """Run ``write`` until it succeeds: a few attempts, or (``durable``) until :attr:`give_up`."""
        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                await write()
                return True
            except StoreUnavailable as exc:
                log.warning("store_write_failed", what=what, attempt=attempt, error=type(exc).__name__)
            if (not durable or self.give_up.is_set()) and attempt >= self.write_attempts:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_retry_delay)
