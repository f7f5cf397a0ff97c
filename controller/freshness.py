"""How fresh one session's inputs must be read: from the last resync, its heartbeat only, or whole.

A worker plans a session from the resync's snapshot when that is still right, and reads Redis
only as much as correctness needs (reads scale with actions, not with sessions):

* ``snapshot``: the session was queued by the resync that just read everything: use that read.
* ``heartbeat``: a timer fired (the plan's requeue) and nothing else happened to the session: the
  snapshot is right about everything but the heartbeat, which agents refresh without telling
  anyone; one GET.
* ``full``: a trigger said the session changed (the change feed, a wake), or we acted on it since
  the snapshot was read.

One object keeps the three facts that decide it, per session, instead of three loose sets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

Read = Literal["snapshot", "heartbeat", "full"]


class Freshness:
    def __init__(self) -> None:
        self._changed: set[str] = set()  #: a trigger said so, or a read failed
        self._resynced: set[str] = set()  #: queued by the resync that just read it
        self._acted: dict[str, datetime] = {}  #: when we last acted on it

    def changed(self, key: str) -> None:
        """Something we did not read may have changed: the next look reads the session whole."""
        self._changed.add(key)

    def resynced(self, key: str) -> None:
        self._resynced.add(key)

    def acted(self, key: str, at: datetime) -> None:
        self._acted[key] = at

    def read_whole(self, key: str) -> None:
        """The session was just read whole: triggers so far are answered."""
        self._changed.discard(key)

    def how_to_read(self, key: str, snapshot_read_from: datetime) -> Read:
        """How to read ``key`` for the look that is starting now (consumes the resync mark)."""
        from_resync = key in self._resynced
        self._resynced.discard(key)
        acted = self._acted.get(key)
        if key in self._changed or (acted is not None and acted >= snapshot_read_from):
            return "full"
        return "snapshot" if from_resync else "heartbeat"

    def forget(self, key: str) -> None:
        self._changed.discard(key)
        self._resynced.discard(key)
        self._acted.pop(key, None)
