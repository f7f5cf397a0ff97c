"""The HTTP client of the flyswarm API, as the CLI (and scripts) use it.

Synchronous (``httpx.Client``): the CLI does one thing at a time, and a blocking client keeps its
code and its tracebacks plain. Where to talk and as whom comes from ``FLYSWARM_URL`` (default
``http://127.0.0.1:8080``, what ``make up`` serves) and ``FLYSWARM_TOKEN`` (a bearer token, one of
the server's ``API_TOKENS``; none for the local stack).

Errors are typed so the CLI can say what to do about each::

    ClientError
     ├── ServerUnreachable   connection refused, DNS failure, timeout: "is `make up` running?"
     └── ApiError            the server answered with an error body (see api/errors.py)
          ├── Unauthorized   401: missing or wrong token
          ├── NotFound       404
          ├── Conflict       409
          ├── Invalid        400/413/422, with the offending fields
          └── ServerError    5xx (503: Redis unreachable; retry later)

The token is sent only in the ``Authorization`` header and never appears in a message or a repr.

Event streams (:meth:`FlyswarmClient.events`) are Server-Sent Events. A dropped connection is
resumed with ``Last-Event-ID`` set to the last id received, so a reader sees every event exactly
once, in order, across reconnects.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from api.models import AGENT_FINISHED_STATES, TERMINAL_PHASES, Phase

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "FLYSWARM_URL"
TOKEN_ENV = "FLYSWARM_TOKEN"
TIMEOUT_ENV = "FLYSWARM_TIMEOUT"
APPLY_RESULT_HEADER = "Flyswarm-Apply-Result"
# A followed stream carries a keep-alive comment at least every 15 s (FLYSWARM_SSE_KEEPALIVE_SECONDS);
# this long without a byte means the connection is dead even if TCP has not noticed.
STALL_TIMEOUT = 60.0
# Without follow, the server sends the history and closes; this only bounds a stuck read.
HISTORY_TIMEOUT = 30.0
_TERMINAL = frozenset(p.value for p in TERMINAL_PHASES)
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class FieldError:
    """One offending input named by the API: a dotted path and a reason."""

    field: str
    reason: str


class ClientError(Exception):
    """Anything that kept a call from getting an answer it could use."""


class ServerUnreachable(ClientError):
    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the flyswarm API at {url}: {reason} — is `make up` running?")


class ApiError(ClientError):
    """The API answered with an error status and (usually) its error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: tuple[FieldError, ...] = (),
        request_id: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.request_id = request_id
        super().__init__(self.describe())

    def describe(self) -> str:
        text = f"{self.message} ({self.status} {self.code})"
        for problem in self.fields:
            text += f"\n  {problem.field}: {problem.reason}"
        return text


class Unauthorized(ApiError):
    def describe(self) -> str:
        return (
            f"the flyswarm API rejected the request ({self.status} {self.code}): {self.message}\n"
            f"  set {TOKEN_ENV} to one of the server's API_TOKENS"
        )


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class Invalid(ApiError):
    pass


class ServerError(ApiError):
    pass


_ERROR_TYPES: Mapping[int, type[ApiError]] = {
    400: Invalid,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: Invalid,
    422: Invalid,
}


def _error_from_response(response: httpx.Response) -> ApiError:
    """Build the typed error from the API's body ``{"error": {code, message, fields, requestId}}``."""
    status = response.status_code
    code, message, request_id = "error", response.reason_phrase or "error", None
    fields: tuple[FieldError, ...] = ()
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        code = str(detail.get("code") or code)
        message = str(detail.get("message") or message)
        raw_fields = detail.get("fields") or []
        fields = tuple(
            FieldError(field=str(f.get("field", "")), reason=str(f.get("reason", "")))
            for f in raw_fields
            if isinstance(f, dict)
        )
        request_id = detail.get("requestId")
    elif isinstance(detail, str):
        message = detail
    if status >= 500:
        cls: type[ApiError] = ServerError
    else:
        cls = _ERROR_TYPES.get(status, ApiError)
    return cls(status, code, message, fields, request_id or response.headers.get("x-request-id"))


@dataclass(frozen=True)
class ApplyResult:
    """What a create-or-update did: ``created``, ``configured`` or ``unchanged``, and the stored session."""

    action: str
    session: dict[str, Any]

    @property
    def resource(self) -> dict[str, Any]:
        """The stored resource, whatever its kind (``session`` is its older name)."""
        return self.session


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a session's stream: its id (a Redis stream id) and the decoded data."""

    id: str | None
    type: str
    data: dict[str, Any] = field(default_factory=dict)


def _describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text or "errno 111" in text or "errno 61" in text:
            return "connection refused"
        if "name or service not known" in text or "nodename nor servname" in text:
            return "unknown host"
        return f"cannot connect ({exc})" if str(exc) else "cannot connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _sid(session_id: str) -> str:
    return quote(session_id, safe="")


def effective_phase(resource: Mapping[str, Any]) -> str:
    """The phase to show for a served resource; a finished task is never shown as running.

    The rule of :meth:`api.models.Session.effective_phase`, over the plain JSON the API serves
    (which may lag the agent's report by one controller pass), plus ``Terminating`` once deleted.
    """
    status = resource.get("status") or {}
    phase = str(status.get("phase") or Phase.PENDING.value)
    if phase in _TERMINAL or phase == Phase.TERMINATING.value:
        return phase
    agent = resource.get("agent") or {}
    spec = resource.get("spec") or {}
    if spec.get("mode", "task") == "task" and agent.get("state") in AGENT_FINISHED_STATES:
        return Phase.SUCCEEDED.value if agent.get("state") == "done" else Phase.FAILED.value
    if (resource.get("metadata") or {}).get("deletionTimestamp"):
        return Phase.TERMINATING.value
    return phase


class FlyswarmClient:
    """One connection pool to the API. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)
        headers = {"user-agent": "flyswarm-cli", "accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"FlyswarmClient(url={self.url!r})"

    def __enter__(self) -> FlyswarmClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
    ) -> httpx.Response:
        try:
            response = self._http.request(
                method,
                path,
                json=json_body,
                params={k: v for k, v in (params or {}).items() if v is not None},
            )
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.url, _describe_transport_error(exc)) from None
        if response.status_code not in ok:
            raise _error_from_response(response)
        return response

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise ClientError(
                f"the API answered {response.status_code} with a body that is not JSON"
            ) from None
        if not isinstance(body, dict):
            raise ClientError(f"the API answered {response.status_code} with an unexpected body")
        return body

    # -- health -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json(self._request("GET", "/health"))

    def ready(self) -> bool:
        try:
            self._request("GET", "/readyz")
        except ServerError:
            return False
        return True

    # -- sessions ---------------------------------------------------------------------------------

    def get(self, session_id: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/sessions/{_sid(session_id)}"))

    def list_page(
        self,
        *,
        selector: str | None = None,
        phase: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        params = {"labelSelector": selector, "phase": phase, "limit": limit, "cursor": cursor}
        body = self._json(self._request("GET", "/sessions", params=params))
        items = body.get("items") or []
        next_cursor = body.get("cursor") or None
        return [item for item in items if isinstance(item, dict)], next_cursor

    def list(
        self, *, selector: str | None = None, phase: str | None = None, page_size: int = 500
    ) -> list[dict[str, Any]]:
        """Every session matching the filters (follows the cursor to the end)."""
        sessions: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            items, cursor = self.list_page(selector=selector, phase=phase, limit=page_size, cursor=cursor)
            sessions.extend(items)
            if not cursor:
                return sessions

    def create(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """POST: create (201) or get the existing identical session (200)."""
        return self._json(self._request("POST", "/sessions", json_body=dict(resource)))

    def apply(self, resource: Mapping[str, Any]) -> ApplyResult:
        """Create or update one resource, as ``kubectl apply`` does (a ``kind: Pool`` goes to ``/pools``).

        For a session: with ``metadata.name`` it is a ``PUT`` (declarative: create, or update labels
        and spec); without, a ``POST`` that lets the server generate the id. The result says what happened:
        ``created``, ``configured`` (labels or spec changed) or ``unchanged``, as the server reports
        it in the ``Flyswarm-Apply-Result`` header.
        """
        name = (resource.get("metadata") or {}).get("name")
        if resource.get("kind") == "Pool":
            return self.apply_pool(resource)
        if resource.get("kind") == "Webhook":
            return self.apply_webhook(resource)
        if not name:
            return ApplyResult("created", self.create(resource))
        return self._put(f"/sessions/{_sid(name)}", resource)

    def _put(self, path: str, resource: Mapping[str, Any]) -> ApplyResult:
        response = self._request("PUT", path, json_body=dict(resource))
        action = response.headers.get(APPLY_RESULT_HEADER, "").strip().lower()
        if action not in ("created", "configured", "unchanged"):
            action = "created" if response.status_code == 201 else "configured"
        return ApplyResult(action, self._json(response))

    def delete(self, session_id: str) -> dict[str, Any] | None:
        response = self._request("DELETE", f"/sessions/{_sid(session_id)}")
        if not response.content:
            return None
        return self._json(response)

    # -- pools ------------------------------------------------------------------------------------

    def get_pool(self, name: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/pools/{_sid(name)}"))

    def list_pools(
        self, *, selector: str | None = None, page_size: int = 500
    ) -> builtins.list[dict[str, Any]]:
        """Every pool matching the selector (follows the cursor to the end)."""
        pools: builtins.list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params = {"labelSelector": selector, "limit": page_size, "cursor": cursor}
            body = self._json(self._request("GET", "/pools", params=params))
            pools.extend(item for item in body.get("items") or [] if isinstance(item, dict))
            cursor = body.get("cursor") or None
            if not cursor:
                return pools

    def apply_pool(self, resource: Mapping[str, Any]) -> ApplyResult:
        """Create or update one pool (``PUT /pools/{metadata.name}``; a pool is always named)."""
        name = (resource.get("metadata") or {}).get("name")
        if not name:
            raise ClientError("a Pool needs metadata.name")
        return self._put(f"/pools/{_sid(name)}", resource)

    def delete_pool(self, name: str) -> dict[str, Any]:
        return self._json(self._request("DELETE", f"/pools/{_sid(name)}"))

    # -- webhooks (README "Webhooks"): one block, to move onto the flyswarm SDK when it lands -----

    def get_webhook(self, name: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/webhooks/{_sid(name)}"))

    def list_webhooks(self, *, page_size: int = 500) -> builtins.list[dict[str, Any]]:
        """Every webhook (follows the cursor to the end)."""
        hooks: builtins.list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params = {"limit": page_size, "cursor": cursor}
            body = self._json(self._request("GET", "/webhooks", params=params))
            hooks.extend(item for item in body.get("items") or [] if isinstance(item, dict))
            cursor = body.get("cursor") or None
            if not cursor:
                return hooks

    def apply_webhook(self, resource: Mapping[str, Any]) -> ApplyResult:
        """Create or update one webhook (``PUT /webhooks/{metadata.name}``); a created one without a
        secret comes back with the generated one in ``status.secret`` (shown this once)."""
        name = (resource.get("metadata") or {}).get("name")
        if not name:
            raise ClientError("a Webhook needs metadata.name")
        return self._put(f"/webhooks/{_sid(name)}", resource)

    def delete_webhook(self, name: str) -> dict[str, Any]:
        return self._json(self._request("DELETE", f"/webhooks/{_sid(name)}"))

    def webhook_deliveries(self, name: str, *, limit: int = 50) -> builtins.list[dict[str, Any]]:
        body = self._json(self._request("GET", f"/webhooks/{_sid(name)}/deliveries", params={"limit": limit}))
        return [item for item in body.get("items") or [] if isinstance(item, dict)]

    def session_deliveries(self, session_id: str, *, limit: int = 50) -> builtins.list[dict[str, Any]]:
        path = f"/sessions/{_sid(session_id)}/deliveries"
        body = self._json(self._request("GET", path, params={"limit": limit}))
        return [item for item in body.get("items") or [] if isinstance(item, dict)]

    # -- messages ---------------------------------------------------------------------------------

    def send(self, session_id: str, text: str) -> dict[str, Any]:
        return self._json(
            self._request("POST", f"/sessions/{_sid(session_id)}/messages", json_body={"text": text})
        )

    # -- files ------------------------------------------------------------------------------------

    def artifacts(self, session_id: str) -> dict[str, Any]:
        """``{"items": [...], "skipped": [...], "totalBytes": n}`` of a session's artifacts."""
        return self._json(self._request("GET", f"/sessions/{_sid(session_id)}/artifacts"))

    def artifact(self, session_id: str, name: str) -> bytes:
        """One artifact's bytes, checked against the sha256 the server sends."""
        path = f"/sessions/{_sid(session_id)}/artifacts/{quote(name, safe='/')}"
        response = self._request("GET", path)
        expected = response.headers.get("x-flyswarm-sha256")
        if expected and hashlib.sha256(response.content).hexdigest() != expected:
            raise ClientError(f"artifact {name} arrived damaged (sha256 mismatch); try again")
        return response.content

    def live_file(self, session_id: str, path: str) -> bytes | dict[str, Any]:
        """A running session's file (bytes) or directory listing (the JSON body)."""
        response = self._request("GET", f"/sessions/{_sid(session_id)}/files", params={"path": path})
        if response.headers.get("x-flyswarm-file-type") == "directory":
            return self._json(response)
        return response.content

    # -- events -----------------------------------------------------------------------------------

    def events(
        self,
        session_id: str,
        *,
        after: str | None = None,
        follow: bool = True,
        idle_timeout: float | None = None,
        max_reconnects: int | None = None,
        reconnect_delay: float = 0.5,
        on_reconnect: Callable[[int, str], None] | None = None,
    ) -> Iterator[Event]:
        """The session's events after ``after`` (``None`` = from the start), in order, each once.

        ``follow=False`` returns the history and stops. ``follow=True`` keeps reading until the
        server ends the stream with an ``end`` event (the session finished and went quiet, or was
        deleted), which is yielded last. A dropped connection, a stalled one or a server-side
        error is resumed with ``Last-Event-ID`` = the last id received, so nothing is missed or
        repeated; ``max_reconnects`` consecutive failures end it (``None`` = never give up).
        ``idle_timeout`` returns (without an ``end``) after that many seconds without any byte,
        keep-alives included, so a caller can look around and call again with ``after``.
        """
        last_id = after
        failures = 0
        if max_reconnects is None and not follow:
            max_reconnects = 2
        while True:
            try:
                for event in self._stream_once(session_id, last_id, follow=follow, idle_timeout=idle_timeout):
                    if event.id is None and event.type == "error":
                        # The server lost Redis mid-stream and said so in-band: resume later.
                        raise ServerError(503, "unavailable", str(event.data.get("error") or "stream error"))
                    failures = 0
                    if event.id is not None:
                        last_id = event.id
                    yield event
                    if event.type == "end" and event.id is None:
                        return
                if not follow:
                    return
                reason = "stream closed by the server"
            except _IdleTimeout:
                return
            except ServerUnreachable as exc:
                reason = exc.reason
            except httpx.TransportError as exc:
                reason = _describe_transport_error(exc)
            except ServerError as exc:
                reason = f"{exc.status} {exc.code}"
            failures += 1
            if max_reconnects is not None and failures > max_reconnects:
                raise ServerUnreachable(self.url, f"event stream lost ({reason})")
            if on_reconnect is not None:
                on_reconnect(failures, reason)
            time.sleep(min(reconnect_delay * (2 ** min(failures - 1, 4)), 5.0))

    def _stream_once(
        self, session_id: str, last_id: str | None, *, follow: bool, idle_timeout: float | None
    ) -> Iterator[Event]:
        headers = {"accept": "text/event-stream"}
        if last_id:
            headers["last-event-id"] = last_id
        params = {} if follow else {"follow": "false"}
        if idle_timeout is not None:
            read_timeout = idle_timeout
        else:
            read_timeout = STALL_TIMEOUT if follow else HISTORY_TIMEOUT
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout)
        try:
            with self._http.stream(
                "GET", f"/sessions/{_sid(session_id)}/events", headers=headers, params=params, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise _error_from_response(response)
                yield from _parse_sse(response.iter_lines())
        except httpx.ReadTimeout:
            if idle_timeout is not None:
                raise _IdleTimeout() from None
            raise
        except httpx.ConnectError as exc:
            raise ServerUnreachable(self.url, _describe_transport_error(exc)) from None


class _IdleTimeout(Exception):
    """No data (not even a keep-alive) within the read timeout: the caller's stop signal."""


def _parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Decode ``text/event-stream`` lines into events (comments and keep-alives are skipped).

    An event's ``id`` is the one its own ``id:`` line gave, else None (the spec's "last event id"
    carries over between events; the client tracks that itself): frames without an id, such as
    the server's closing ``end``, are recognisable as such.
    """
    event_id: str | None = None
    event_type = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield _event(event_id, event_type, "\n".join(data))
            event_id, event_type, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = value or None
        elif name == "event":
            event_type = value or "message"
        elif name == "data":
            data.append(value)
    if data:
        yield _event(event_id, event_type, "\n".join(data))


def _event(event_id: str | None, event_type: str, raw: str) -> Event:
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = {"message": raw}
    if not isinstance(decoded, dict):
        decoded = {"value": decoded}
    kind = str(decoded.get("type") or event_type)
    return Event(id=event_id, type=kind, data=decoded)
