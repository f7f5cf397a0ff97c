"""The Apps API and the organization-wide machine list: ``/v1/apps…`` and ``/v1/orgs/{org}/machines``.

Apps are created with ``POST /v1/apps`` (422 ``name_taken`` when the name exists; a retry with the
same ``idempotency_key`` gets the first answer back) or, unlike Fly, implicitly by the first
machine created in them (so the local loop and the tests need no setup step; local/EMULATOR.md).
An app's ``machine_count`` and ``status`` come from its live machines.

The org list follows the spec's ``OrgMachinesResponse``: machines of every app of the org sorted
by ``updated_at`` (oldest first), ``updated_after``/``state``/``region``/``include_deleted``/
``summary`` filters, ``limit`` (at most 1000) and an opaque ``next_cursor``.
"""

from __future__ import annotations

import re
import secrets as secrets_mod
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from local.emulator_errors import FlyError, invalid

if TYPE_CHECKING:
    from local.emulator_state import Machine

#: Fly's app names: lowercase letters, digits and dashes, starting with a letter or digit.
_APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
APPS_LIMIT_MAX = 5000
ORG_LIMIT_MAX = 1000


@dataclass(frozen=True)
class App:
    id: str
    name: str
    org_slug: str
    network: str
    created_at_ms: int
    idempotency_key: str | None


def app_not_found() -> FlyError:
    return FlyError(404, "app not found")


class AppRegistry:
    """Every app the emulator knows, by name (names are global on Fly)."""

    def __init__(self, default_org: str) -> None:
        self.default_org = default_org
        self.apps: dict[str, App] = {}

    def clear(self) -> None:
        self.apps.clear()

    def ensure(self, name: str) -> App:
        """The app, created in the default org when a machine is the first to name it."""
        app = self.apps.get(name)
        if app is None:
            app = self._new(name, self.default_org, "default", None)
        return app

    def _new(self, name: str, org_slug: str, network: str, key: str | None) -> App:
        app = App(
            id=secrets_mod.token_hex(8),
            name=name,
            org_slug=org_slug,
            network=network,
            created_at_ms=int(time.time() * 1000),
            idempotency_key=key,
        )
        self.apps[name] = app
        return app

    def create(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        name, org_slug = body.get("name"), body.get("org_slug") or self.default_org
        key, network = body.get("idempotency_key") or None, body.get("network") or "default"
        for field, value in (("name", name), ("org_slug", org_slug), ("network", network), ("key", key)):
            if value is not None and not isinstance(value, str):
                raise invalid(f"{'idempotency_key' if field == 'key' else field} must be a string")
        if not name:
            raise invalid("name is required")
        if not _APP_NAME_RE.match(name):
            raise invalid(f"name: {name!r} may contain only lowercase letters, digits and dashes")
        if key is not None:
            for app in self.apps.values():
                if app.idempotency_key == key and app.name != name:
                    raise invalid(f"idempotency_key was already used to create app {app.name!r}")
        existing = self.apps.get(name)
        if existing is not None:
            if key is not None and existing.idempotency_key == key:
                return {"id": existing.id, "created_at": existing.created_at_ms}
            raise FlyError(422, f"app name {name!r} is already taken", "name_taken")
        app = self._new(name, org_slug, network, key)
        return {"id": app.id, "created_at": app.created_at_ms}

    def view(self, app: App, machines: Iterable[Machine]) -> dict[str, Any]:
        live = [m for m in machines if m.app == app.name and m.state != "destroyed"]
        return {
            "id": app.id,
            "name": app.name,
            "machine_count": len(live),
            "volume_count": 0,
            "network": app.network,
            "organization": {"name": app.org_slug, "slug": app.org_slug},
            "status": "deployed" if any(m.state == "started" for m in live) else "pending",
        }

    def show(self, name: str, machines: Iterable[Machine]) -> dict[str, Any]:
        app = self.apps.get(name)
        if app is None:
            raise app_not_found()
        return self.view(app, machines)

    def list(
        self, org_slug: str | None, limit: int | None, cursor: str | None, machines: list[Machine]
    ) -> dict[str, Any]:
        if not org_slug:
            raise invalid("org_slug is required")
        if limit is not None and not 1 <= limit <= APPS_LIMIT_MAX:
            raise invalid(f"limit must be between 1 and {APPS_LIMIT_MAX}")
        if cursor is not None and limit is None:
            raise invalid("cursor requires limit")
        apps = sorted((a for a in self.apps.values() if a.org_slug == org_slug), key=lambda a: a.name)
        start = _decode_offset(cursor) if cursor is not None else 0
        page = apps[start : start + limit] if limit is not None else apps[start:]
        out: dict[str, Any] = {"apps": [self.view(a, machines) for a in page], "total_apps": len(apps)}
        if limit is not None and start + limit < len(apps):
            out["next_cursor"] = _encode_offset(start + limit)
        return out

    def org_machines(
        self,
        org_slug: str,
        machines: Iterable[Machine],
        *,
        include_deleted: bool,
        summary: bool,
        region: str | None,
        states: frozenset[str] | None,
        updated_after: str | None,
        limit: int | None,
        cursor: str | None,
    ) -> dict[str, Any]:
        apps = {a.name for a in self.apps.values() if a.org_slug == org_slug}
        if not apps and org_slug != self.default_org:
            raise FlyError(404, f"organization {org_slug!r} not found")
        if limit is not None and not 1 <= limit <= ORG_LIMIT_MAX:
            raise invalid(f"limit must be between 1 and {ORG_LIMIT_MAX}")
        after = _parse_rfc3339(updated_after) if updated_after else None
        rows = [
            m
            for m in machines
            if m.app in apps
            and (include_deleted or m.state != "destroyed")
            and (region is None or m.region == region)
            and (states is None or m.state in states)
            and (after is None or m.updated_at > after)
        ]
        rows.sort(key=lambda m: (m.updated_at, m.id))
        start = _decode_offset(cursor) if cursor is not None else 0
        size = limit or ORG_LIMIT_MAX
        page = rows[start : start + size]
        out: dict[str, Any] = {"machines": [_org_machine(m, summary) for m in page], "error_regions": []}
        if page:
            out["last_machine_id"] = page[-1].id
            out["last_updated_at"] = _rfc3339(page[-1].updated_at)
        if start + size < len(rows):
            out["next_cursor"] = _encode_offset(start + size)
        return out


def _org_machine(m: Machine, summary: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": m.id,
        "name": m.name,
        "app_name": m.app,
        "state": m.state,
        "region": m.region,
        "private_ip": m.private_ip,
        "version": m.version,
        "created_at": _rfc3339(m.created_at),
        "updated_at": _rfc3339(m.updated_at),
    }
    if not summary:
        config = m.config
        out["config"] = {
            "image": config.get("image", ""),
            "guest": config.get("guest", {}),
            "metadata": config.get("metadata") or {},
        }
    return out


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(value: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise invalid(f"updated_after: {value!r} is not an RFC 3339 timestamp") from None


def _encode_offset(offset: int) -> str:
    return f"o1.{offset}"


def _decode_offset(cursor: str) -> int:
    if not cursor.startswith("o1.") or not cursor[3:].isdigit():
        raise invalid("invalid cursor")
    return int(cursor[3:])
