"""The agent apps: which Fly apps hold agent machines, and which of them a create goes to.

Fly limits machine *creates* per app (1/s, burst 3; fly-machines-api.md §5) and every other action
per machine. One app therefore caps a burst of new sessions at about one per second; N apps give
N creates per second (an unpublished org-wide cap still applies above that). The controller takes a
list of apps (``FLYSWARM_FLY_APPS``; the single ``FLY_APP_NAME`` means a list of one) and:

* **spreads creates** (:class:`AppSpreader`): each app has its own pacing bucket at the client's
  create rate; a create takes the app whose bucket has a token soonest, then the least-loaded one
  (fewest machines of ours we know there), then the first in the configured order. The Fly client's
  own create buckets are keyed per app too, so its limiter agrees with the choice;
* **records the app** of each launch in its Redis launch record (``app``) before the create, and
  the client remembers the app of every machine it created or listed, so start, stop, destroy and
  friends are addressed to the machine's own app (``FlyClient.app_of``);
* **lists every app** on each resync, page by page and per app, plus any app a live launch record
  still names although it is no longer configured, so a session whose app was removed from the
  settings is still seen, stopped and torn down; such an app drops out of the listing once no
  launch record names it (machines of ours left there after that are the operator's to clean up).

Pools narrow the apps they create in (``PoolSpec.apps``): :meth:`AppSpreader.choose_app` and
:meth:`AppSpreader.reserve` take ``allowed``, the names a pool may use (None: all configured).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from controller.ratelimit import Limit, TokenBucket

#: Fly's app names: lowercase letters, digits and dashes, starting with a letter or digit.
APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def parse_app_list(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"app-a, app-b"`` (or a sequence) → ``("app-a", "app-b")``; ValueError naming the bad entry.

    Empty entries are ignored; a name that is not a valid Fly app name, or one given twice, is refused.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    apps: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if not APP_NAME_RE.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a Fly app name (lowercase letters, digits and dashes, at most 63)"
            )
        if name in apps:
            raise ValueError(f"app {name!r} is listed twice")
        apps.append(name)
    return tuple(apps)


class NoAllowedApp(ValueError):
    """None of the apps a caller allows is configured (e.g. a pool naming only unknown apps)."""


@dataclass(frozen=True)
class CreateSlot:
    """A create's turn: the app it goes to, and how many seconds until it may be sent."""

    app: str
    wait: float


class AppSpreader:
    """Chooses the app of each create: soonest create token first, then least loaded.

    ``limit`` is the create rate of ONE app (None: no pacing, creates spread by load alone);
    ``load()`` answers the number of our machines known per app (the Fly client's view).
    Not thread-safe; one event loop.
    """

    def __init__(
        self,
        apps: Sequence[str],
        limit: Limit | None,
        *,
        load: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not apps:
            raise ValueError("at least one app is needed")
        self.apps = tuple(apps)
        self._limit = limit
        self._load = load
        self._clock = clock
        now = clock()
        self._buckets = {app: TokenBucket(limit, now) for app in self.apps} if limit is not None else {}
        #: Creates reserved and not yet answered: a burst spreads before the client learns the machines.
        self._in_flight: dict[str, int] = dict.fromkeys(self.apps, 0)

    def set_share(self, share: float) -> None:
        """Run every app's bucket at ``share`` of the rate (N replicas share each app's budget)."""
        if self._limit is None:
            return
        for bucket in self._buckets.values():
            bucket.limit = self._limit.shared(share)

    def allowed(self, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
        """The configured apps among ``allowed`` (in configured order); all of them for None."""
        if allowed is None:
            return self.apps
        wanted = set(allowed)
        apps = tuple(app for app in self.apps if app in wanted)
        if not apps:
            raise NoAllowedApp(f"none of {sorted(wanted)} is a configured agent app ({', '.join(self.apps)})")
        return apps

    def wait_for(self, app: str) -> float:
        """Seconds until ``app`` has a create token (0 when it has one now)."""
        bucket = self._buckets.get(app)
        if bucket is None:
            return 0.0
        tokens = bucket.tokens(self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / bucket.limit.rate

    def choose_app(self, allowed: Sequence[str] | None = None) -> str:
        """The app the next create should go to (nothing is reserved)."""
        apps = self.allowed(allowed)
        load = self._load() if self._load is not None else {}
        order = {app: i for i, app in enumerate(apps)}
        return min(
            apps,
            key=lambda app: (
                round(self.wait_for(app), 3),
                load.get(app, 0) + self._in_flight[app],
                order[app],
            ),
        )

    def reserve(self, allowed: Sequence[str] | None = None) -> CreateSlot:
        """Choose an app and take its next create token: the app, and the wait before sending."""
        app = self.choose_app(allowed)
        bucket = self._buckets.get(app)
        wait = (bucket.reserve(self._clock()) or 0.0) if bucket is not None else 0.0
        self._in_flight[app] += 1
        return CreateSlot(app=app, wait=wait)

    def settled(self, app: str) -> None:
        """A reserved create was answered (or given up): it no longer counts as load in flight."""
        if self._in_flight.get(app, 0) > 0:
            self._in_flight[app] -= 1
