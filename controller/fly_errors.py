"""Errors raised by the Fly Machines client, one type per way a caller must react.

The tree (every class carries ``status``, ``message``, ``error_status``, ``fly_request_id``,
``action`` and ``machine_id``)::

    FlyError                      base; ``transient`` says whether trying again later can succeed
    ├── NotFound                  404: machine (or lease, or metadata key) does not exist
    ├── Conflict                  409: ``current_version`` mismatch, or another conflict
    │   └── LeaseHeld             409 "lease currently held by ...": someone else owns the machine
    ├── PreconditionFailed        412: action invalid in the current (often transient) state,
    │                                  stale metadata ``machine_version``, non-forced destroy of a
    │                                  running machine
    ├── Capacity                  ``status: insufficient_capacity`` / ``volume_placement_capacity``,
    │                                  403 regional quota, 409 insufficient memory on the host:
    │                                  412 insufficient resources (volume host full):
    │                                  try another region (or later)
    ├── Transient                 408, 429, 5xx, connection errors and timeouts: the client retries
    │   │                              these itself (except for creates) within the call's deadline
    │   ├── RateLimited           429 (or our own token bucket could not serve within the deadline)
    │   └── WaitTimeout           ``wait`` reached its overall deadline without the state
    ├── AmbiguousCreate           408 / 5xx / timeout / connection lost *after* a create was sent:
    │                                  the machine may exist; look it up by metadata before retrying
    └── Permanent                 400, 401, 422 and other 4xx: the request itself is wrong

Two notions are kept apart on purpose. The *class* ``Transient`` is what the client retries
internally (with jittered backoff). The *attribute* ``transient`` is advice for the controller:
True means "requeue with backoff", False means "count it, do not retry" (``Permanent``) or
"the thing is gone" (``NotFound``). ``AmbiguousCreate`` is deliberately not a ``Transient``
subclass, so that generic "retry on Transient" code can never double-create a machine.

Messages never contain the API token: they are built from the response body and our own words,
and the body text is scrubbed of the token before it is stored.
"""

from __future__ import annotations

import json
from typing import Any

_MAX_BODY_CHARS = 500


class FlyError(Exception):
    """A Fly Machines API call failed."""

    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_status: str | None = None,
        fly_request_id: str | None = None,
        action: str | None = None,
        machine_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_status = error_status
        self.fly_request_id = fly_request_id
        self.action = action
        self.machine_id = machine_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = []
        if self.action:
            parts.append(self.action)
        if self.machine_id:
            parts.append(self.machine_id)
        where = " ".join(parts)
        head = f"{where}: " if where else ""
        code = f"{self.status} " if self.status is not None else ""
        rid = f" (fly-request-id {self.fly_request_id})" if self.fly_request_id else ""
        return f"{head}{code}{self.message}{rid}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class NotFound(FlyError):
    """404: the machine, lease or key does not exist (a destroy of it counts as done)."""


class Conflict(FlyError):
    """409: the machine changed under us (``current_version``) or another conflict."""

    transient = True


class LeaseHeld(Conflict):
    """409 with "lease currently held": another holder owns the machine's lease."""


class PreconditionFailed(FlyError):
    """412: the action is not valid in the machine's current state; wait and look again."""

    transient = True


class Capacity(FlyError):
    """No room for the machine: region full, org quota, host memory. Try another region."""

    transient = True


class Transient(FlyError):
    """408, 429, 5xx, connection errors, timeouts: retried by the client within its deadline."""

    transient = True


class RateLimited(Transient):
    """429 from Fly, or our own token bucket could not give a token within the deadline."""


class WaitTimeout(Transient):
    """``wait`` did not see the requested state before its overall deadline."""


class AmbiguousCreate(FlyError):
    """A create may or may not have happened; find the machine by metadata before retrying.

    ``metadata`` holds the ``config.metadata`` of the request so the caller can search for it.
    """

    transient = True

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.metadata = dict(metadata or {})


class Permanent(FlyError):
    """400, 401, 422 and other 4xx: the request is wrong; retrying cannot help."""


def parse_error_body(text: str) -> tuple[str, str | None]:
    """The error text and the ``status`` field of a Fly error body.

    Fly answers ``{"error": "...", "status": "insufficient_capacity"}``; fly-go also reads
    ``message``; lease endpoints may wrap errors as ``{"status": "error", "message": ..., "code": ...}``.
    Anything else (HTML from a proxy, empty bodies) falls back to the raw text, truncated.
    """
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        message = data.get("error") or data.get("message")
        inner = data.get("data")
        if not message and isinstance(inner, dict):
            message = inner.get("error") or inner.get("message")
        status = data.get("status")
        error_status = status if isinstance(status, str) and status not in ("error", "success") else None
        if message:
            return str(message)[:_MAX_BODY_CHARS], error_status
        if error_status:
            return error_status, error_status
    return (text.strip()[:_MAX_BODY_CHARS] or "(empty body)"), None


def error_for_status(
    status: int,
    message: str,
    *,
    error_status: str | None = None,
    fly_request_id: str | None = None,
    action: str | None = None,
    machine_id: str | None = None,
    retry_after: float | None = None,
) -> FlyError:
    """Map an HTTP error response to the error type the caller must react to."""
    kwargs: dict[str, Any] = {
        "status": status,
        "error_status": error_status,
        "fly_request_id": fly_request_id,
        "action": action,
        "machine_id": machine_id,
        "retry_after": retry_after,
    }
    lowered = message.lower()
    cls: type[FlyError]
    if error_status in ("insufficient_capacity", "volume_placement_capacity"):
        cls = Capacity
    elif status == 403 and "quota" in lowered:
        cls = Capacity
    elif status == 409 and ("insufficient memory" in lowered or "could not reserve resource" in lowered):
        cls = Capacity
    elif status == 412 and "insufficient resources" in lowered:
        # "insufficient resources to create new machine with existing volume": the host is full.
        cls = Capacity
    elif status == 409 and "lease currently held" in lowered:
        cls = LeaseHeld
    elif status == 409:
        cls = Conflict
    elif status == 404:
        cls = NotFound
    elif status == 412:
        cls = PreconditionFailed
    elif status == 429:
        cls = RateLimited
    elif status == 408 or status >= 500:
        cls = Transient
    else:
        cls = Permanent
    return cls(message, **kwargs)
