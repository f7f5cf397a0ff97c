"""The agent's report: the ``agent`` part of the Session, written by the agent alone.

The reporter keeps the current report in memory and writes the whole of it on every change
(the store puts it in its own hash field, so it never clobbers spec or status). Writes are retried
briefly when Redis is away; a report that cannot be written is logged, and the next change writes
the whole state again anyway.

Once the agent starts to stop on a signal the state is *locked* to ``interrupted``: a turn that
ends while the agent is shutting down can still add its cost, but cannot make the report say idle.
"""

from __future__ import annotations

import asyncio
from typing import Any

from api.logs import get_logger
from api.models import AgentReport, AgentState, utcnow
from api.store_agent import AgentStore
from api.store_base import StoreUnavailable

log = get_logger("agent.reporter")


class Reporter:
    def __init__(self, store: AgentStore, session_id: str, report: AgentReport) -> None:
        self._store = store
        self._session_id = session_id
        self.report = report
        self._lock = asyncio.Lock()
        self._locked_state: AgentState | None = None
        self.write_attempts = 5

    @property
    def state(self) -> str:
        return self.report.state

    def lock_state(self, state: AgentState) -> None:
        self._locked_state = state

    async def update(self, **changes: Any) -> AgentReport:
        attempts = self.write_attempts
        async with self._lock:
            if self._locked_state is not None:
                changes["state"] = self._locked_state
            changes["updatedAt"] = utcnow()
            self.report = self.report.model_copy(update=changes)
            delay = 0.1
            for attempt in range(attempts):
                try:
                    await self._store.write_agent_report(self._session_id, self.report)
                    break
                except StoreUnavailable:
                    log.warning("report_write_failed", state=self.report.state, attempt=attempt + 1)
                    if attempt + 1 < attempts:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 1.0)
            return self.report
