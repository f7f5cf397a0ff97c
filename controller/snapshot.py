"""Reading the world: the whole of it once per resync, one session of it when that is enough.

* :meth:`WorldReader.read` makes a :class:`Snapshot`: ONE paginated Fly ``list`` per agent app
  (metadata filter ``flyswarm_managed=true``, ``summary=true`` while summaries carry metadata,
  through :meth:`FlyClient.iter_machines` and its page cap) and ONE batched Redis read (every
  session, heartbeat, launch record and inbox state, pipelined). Never a call per session.
  The apps listed are the configured ones plus any app a live launch record still names
  (:mod:`controller.fly_apps`): the first read learns those from the launch records before it
  lists, later reads from the previous read (settings do not change under a running process, so
  such an app can only newly appear with a shard this replica just took; its sessions' machines
  are then read back by id, at the app their launch record names, until the next read lists it).
  A removed app that Fly no longer knows (404) holds nothing.
* :meth:`WorldReader.read_session` reads one session's whole input (four small reads, together).

It also keeps what the reader learnt about its sources, which the plan needs to tell "unknown"
from "dead": whether Redis and Fly answered (``redis_ok``, ``fly_ok``), and since when heartbeats
can be trusted (:attr:`WorldReader.heartbeats_known_since`): a new reader (a controller start, a
leadership change), a Redis outage it saw, and a Redis server that restarted all reset it, because
in each case agents may not have been able to write the heartbeats it would otherwise read as
missing (agents write them through the gateway, which cannot while Redis is away).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from api.logs import get_logger
from api.models import Heartbeat, Session
from api.store_base import StoreUnavailable
from api.store_controller import ControllerStore
from controller import fly_errors
from controller.executor import observed_from_fly
from controller.expectations import Expectations
from controller.fly import FlyClient
from controller.metrics import ControllerMetrics
from controller.observed import (
    MANAGED_VALUE,
    TAG_MANAGED,
    TAG_SESSION,
    CreateFailure,
    LaunchRecord,
    ObservedMachine,
)

_log = get_logger("controller.snapshot")

#: Fly's ``limit`` maximum: the fewest pages per list.
LIST_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Snapshot:
    """One resync's view of the world: the whole desired state and the whole observed state."""

    listed_from: datetime  #: when the Fly list started (a machine change after this may be missing)
    read_from: datetime  #: when the Redis read started
    taken_mono: float  #: monotonic time of completion (for staleness)
    sessions: dict[str, Session]
    heartbeats: dict[str, Heartbeat]
    launches: dict[str, LaunchRecord]
    create_failures: dict[str, CreateFailure]
    inbox: dict[str, int]
    machines: dict[str, list[ObservedMachine]]  #: by session id (tag); untagged ones under ""
    all_machines: list[ObservedMachine]
    #: every session id in the index at the read, ours or not (orphans are judged against it);
    #: a session in here but not in ``sessions`` belongs to a shard this snapshot did not cover
    all_ids: frozenset[str] = frozenset()


@dataclass
class KeyView:
    """One session's inputs to the plan, and how they were read."""

    session: Session | None
    heartbeat: Heartbeat | None
    launch: LaunchRecord | None
    inbox: int
    read: str  #: snapshot, heartbeat or full
    create_failure: CreateFailure | None = None


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def tick(self) -> None:
        self.count += 1


class WorldReader:
    """Reads Redis and Fly for one reconciler, and remembers what it learnt about them."""

    def __init__(
        self,
        *,
        store: ControllerStore,
        fly: FlyClient,
        expectations: Expectations,
        metrics: ControllerMetrics,
        call_timeout_seconds: float,
        page_size: int = LIST_PAGE_SIZE,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.fly = fly
        self.expectations = expectations
        self.metrics = metrics
        self.call_timeout_seconds = call_timeout_seconds
        self.page_size = page_size
        self._now = clock
        self.redis_ok = False
        self.fly_ok = False
        self._summary_has_metadata = True
        self._redis_run_id: str | None = None
        self._redis_started_at: datetime | None = None
        # A new reader has not watched heartbeats arrive: its view of them begins now.
        self._redis_recovered_at: datetime | None = clock()
        self._redis_lost = False
        #: Apps named by the launch records of the last read (None: not read yet).
        self._launch_apps: set[str] | None = None

    # -- the whole world ----------------------------------------------------------------------------

    async def read(
        self, owns: Callable[[str], bool] | None = None, *, orphans: bool = True
    ) -> tuple[Snapshot, int]:
        """ONE paginated Fly list, then ONE batched Redis read (in that order, see below).

        Sharded: ``owns(session_id)`` says which sessions are this replica's. The index (ids only)
        is read whole; sessions, heartbeats, launch records and inboxes only for the sessions it
        owns, so a replica's Redis reads shrink with its share. Fly cannot be asked for one shard,
        so the list is whole; only our sessions' machines (and, with ``orphans``, machines of no
        session at all) are kept.
        """
        # Fly first: a session always exists before its machine is created and is removed only
        # after its machines are gone, so every listed machine's session is in the later read.
        listed_from = self._now()
        if self._launch_apps is None:
            try:
                self._launch_apps = await self._apps_in_launches(owns)
            except StoreUnavailable:
                self.redis_down()
                raise
        try:
            machines, pages = await self._list_machines(self._apps_to_list())
        except fly_errors.FlyError:
            self.fly_ok = False
            raise
        self.fly_ok = True
        read_from = self._now()
        try:
            await self._check_redis_server(read_from)
            all_ids = await self.store.all_ids()
            wanted = [sid for sid in all_ids if owns(sid)] if owns is not None else all_ids
            sessions = await self.store.get_many(wanted)
            ids = [s.id for s in sessions]
            heartbeats = await self.store.heartbeats(ids)
            raw_launches = await self.store.get_launches(ids)
            inbox = await self.store.inbox_pending_many(ids) if ids else {}
        except StoreUnavailable:
            self.redis_down()
            raise
        self.redis_up()
        for what in ("sessions", "heartbeats", "launches", "inbox"):
            self.metrics.redis_reads.labels(what=what).inc()
        launches = {sid: rec for sid, raw in raw_launches.items() if (rec := LaunchRecord.from_store(raw))}
        self._launch_apps = self._note_launch_apps(launches.values())
        failures = {sid: f for sid, raw in raw_launches.items() if (f := CreateFailure.from_store(raw))}
        known, mine = frozenset(all_ids), {s.id for s in sessions}
        if owns is not None:
            machines = [m for m in machines if _keep(m.metadata.get(TAG_SESSION), mine, known, orphans)]
        observed = [observed_from_fly(m) for m in machines]
        by_session: dict[str, list[ObservedMachine]] = {}
        for machine in observed:
            by_session.setdefault(machine.session_id or "", []).append(machine)
        snapshot = Snapshot(
            listed_from=listed_from,
            read_from=read_from,
            taken_mono=time.monotonic(),
            sessions={s.id: s for s in sessions},
            heartbeats=heartbeats,
            launches=launches,
            create_failures=failures,
            inbox=inbox,
            machines=by_session,
            all_machines=observed,
            all_ids=known,
        )
        return snapshot, pages

    # -- the agent apps -----------------------------------------------------------------------------

    async def _apps_in_launches(self, owns: Callable[[str], bool] | None) -> set[str]:
        """The apps the launch records name (before the first list: see the module docstring)."""
        ids = await self.store.all_ids()
        wanted = [sid for sid in ids if owns(sid)] if owns is not None else ids
        raws = await self.store.get_launches(wanted)
        return self._note_launch_apps(r for raw in raws.values() if (r := LaunchRecord.from_store(raw)))

    def _note_launch_apps(self, launches: Iterable[LaunchRecord]) -> set[str]:
        """The apps ``launches`` name; and the app of each recorded machine, for the client's calls."""
        apps: set[str] = set()
        default = self.fly.config.app_name
        for launch in launches:
            app = launch.app or default
            apps.add(app)
            if launch.machine_id and self.fly.app_of(launch.machine_id) is None:
                self.fly.remember(launch.machine_id, app)
        return apps

    def _apps_to_list(self) -> list[str]:
        configured = list(self.fly.config.apps)
        retired = sorted((self._launch_apps or set()) - set(configured))
        return configured + retired

    async def _list_machines(self, apps: list[str]) -> tuple[list[Any], int]:
        """Every machine of ours in ``apps``; an app no longer configured that Fly does not know
        (deleted with its machines) holds none."""
        machines: list[Any] = []
        pages = 0
        for app in apps:
            started = time.monotonic()
            try:
                found, app_pages = await self._list_app(app)
            except fly_errors.NotFound:
                if app in self.fly.config.apps:
                    raise
                _log.info("fly_retired_app_gone", app=app)
                continue
            self.fly.retain_listed(app, (m.id for m in found), started)
            machines.extend(found)
            pages += app_pages
            self.metrics.fly_app_machines.labels(app=app).set(len(found))
        return machines, pages

    async def _list_app(self, app: str) -> tuple[list[Any], int]:
        """Every machine of ours in one app, in as few pages as Fly allows.

        ``summary=true`` is cheaper, but only useful if it still carries ``config.metadata`` (our
        identity tags); when a summary comes back without them, we switch to full listings.
        """
        tags = {TAG_MANAGED: MANAGED_VALUE}
        pages = 0
        for summary in (True, False):
            if summary and not self._summary_has_metadata:
                continue
            pages_seen = _Counter()
            found = {
                machine.id: machine
                async for machine in self.fly.iter_machines(
                    metadata=tags,
                    summary=summary,
                    page_size=self.page_size,
                    deadline=self.call_timeout_seconds,
                    on_page=pages_seen.tick,
                    app=app,
                )
            }
            pages += pages_seen.count
            if summary and any(not m.metadata for m in found.values()):
                self._summary_has_metadata = False
                _log.info("fly_summary_lacks_metadata")
                continue
            return list(found.values()), pages
        raise fly_errors.FlyError("no listing mode left")  # pragma: no cover - the loop always returns

    # -- one session --------------------------------------------------------------------------------

    async def read_session(self, key: str) -> KeyView:
        """One session's whole input from Redis (four small reads, issued together)."""
        session, heartbeat, raw_launch, inbox = await asyncio.gather(
            self.store.get(key),
            self.store.get_heartbeat(key),
            self.store.get_launch(key),
            self.store.inbox_pending(key, cap=1),
        )
        self.redis_up()
        launch = self.expectations.launch(key, LaunchRecord.from_store(raw_launch))
        return KeyView(session, heartbeat, launch, inbox, "full", CreateFailure.from_store(raw_launch))

    async def read_heartbeat(self, key: str, snapshot: Snapshot) -> KeyView | None:
        """The snapshot's view of ``key`` with only its heartbeat read afresh (one GET)."""
        session = snapshot.sessions.get(key)
        if session is None:
            return None
        heartbeat = await self.store.get_heartbeat(key)
        return self.from_snapshot(key, snapshot, heartbeat=heartbeat, read="heartbeat")

    def from_snapshot(
        self, key: str, snapshot: Snapshot, *, heartbeat: Heartbeat | None = None, read: str = "snapshot"
    ) -> KeyView | None:
        session = snapshot.sessions.get(key)
        if session is None:
            return None
        beat = heartbeat if read == "heartbeat" else snapshot.heartbeats.get(key)
        launch = self.expectations.launch(key, snapshot.launches.get(key))
        return KeyView(
            session, beat, launch, snapshot.inbox.get(key, 0), read, snapshot.create_failures.get(key)
        )

    # -- what we know about Redis -------------------------------------------------------------------

    async def _check_redis_server(self, now: datetime) -> None:
        """Notice a new Redis server (restarted, failed over): heartbeats written before it, or while
        it was down, may be gone although their agents live (see :attr:`heartbeats_known_since`)."""
        run_id, uptime = await self.store.server_identity()
        self._redis_started_at = now - timedelta(seconds=uptime)
        if run_id != self._redis_run_id:
            _log.info("redis_server_seen", uptime_seconds=round(uptime, 1))
            self._redis_run_id = run_id

    def redis_down(self) -> None:
        self.redis_ok = False
        self._redis_lost = True

    def redis_up(self) -> None:
        self.redis_ok = True
        if self._redis_lost:
            # Agents could not beat while we could not read: their heartbeats may have expired.
            self._redis_lost = False
            self._redis_recovered_at = self._now()

    @property
    def heartbeats_known_since(self) -> datetime | None:
        """Since when a missing heartbeat can mean a lost agent (see ``plan``'s rule 6)."""
        marks = [t for t in (self._redis_started_at, self._redis_recovered_at) if t is not None]
        return max(marks) if marks else None


def _keep(session_id: str | None, mine: set[str], known: frozenset[str], orphans: bool) -> bool:
    """A listed machine matters to this replica: its session is ours, or it is an orphan we collect."""
    if session_id is not None and session_id in mine:
        return True
    return orphans and (session_id is None or session_id not in known)
