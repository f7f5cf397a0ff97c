"""The synchronous client: :class:`Client` (httpx, blocking). :class:`~flyswarm.AsyncClient` is its twin.

Every operation is a :class:`~flyswarm.calls.Call` built in :mod:`flyswarm.calls`; this class only
sends it (with the retry policy of :mod:`flyswarm.retry`), pages through lists, follows event streams
(resuming with ``Last-Event-ID``, :mod:`flyswarm.events`) and polls for :meth:`wait`.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx

from flyswarm import calls
from flyswarm.calls import Applied, ArtifactList, Call, Page, Resource
from flyswarm.config import Config
from flyswarm.errors import (
    FlyswarmError,
    ServerError,
    ServerUnreachable,
    Timeout,
    describe_transport_error,
    error_from_response,
)
from flyswarm.events import HISTORY_TIMEOUT, STALL_TIMEOUT, Event, Resume, parse_lines, resumable
from flyswarm.models import DeliveryView, MessageAccepted, Pool, SessionView, Webhook
from flyswarm.retry import Retry
from flyswarm.waiting import DEFAULT_INTERVAL, DEFAULT_TIMEOUT, Until, condition, settled, timed_out

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100


class _Idle(Exception):
    """No byte (not even a keep-alive) within ``idle_timeout``: the caller's cue to look around."""


def transport_error(url: str, exc: httpx.TransportError) -> FlyswarmError:
    """A failed exchange as the SDK's error: no answer in time, or no connection (retryable)."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return Timeout(f"the flyswarm API at {url} did not answer in time ({type(exc).__name__})")
    return ServerUnreachable(url, describe_transport_error(exc))


class Client:
    """One connection pool to the API. Use it as a context manager, or call :meth:`close`.

    ``url``, ``token`` and ``timeout`` default to ``FLYSWARM_URL``, ``FLYSWARM_TOKEN`` and
    ``FLYSWARM_TIMEOUT`` (then ``http://127.0.0.1:8080``, no token, 30 s). ``retry`` is the policy for
    503s and lost connections on idempotent calls (:class:`~flyswarm.Retry`).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = None,
        retry: Retry | None = None,
        transport: httpx.BaseTransport | None = None,
        user_agent: str | None = None,
    ) -> None:
        self.config = Config.resolve(url, token, timeout)
        self.url = self.config.url
        self.retry = retry or Retry()
        headers = self.config.headers(user_agent) if user_agent else self.config.headers()
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=self.config.http_timeout(), transport=transport
        )

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(self, call: Call[T]) -> T:
        """Send one call, retrying as :attr:`retry` allows; the decoded answer or a typed error."""
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, params=call.params, json=call.body)
            except httpx.TransportError as exc:
                error = transport_error(self.url, exc)
            else:
                if response.status_code in call.ok:
                    return call.decode(response)
                error = error_from_response(response)
            delay = self.retry.delay(attempt, error, idempotent=call.idempotent)
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    # -- health -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /health``: the process is up (no auth, no Redis)."""
        return self.call(calls.health())

    def ready(self) -> bool:
        """``GET /readyz``: the API can serve (Redis reachable). False on a 5xx, raises when unreachable."""
        try:
            return self.call(calls.ready())
        except ServerError:
            return False

    # -- sessions ---------------------------------------------------------------------------------

    def get(self, session_id: str) -> SessionView:
        return self.call(calls.get_session(session_id))

    def list_page(
        self,
        *,
        selector: str | None = None,
        phase: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[SessionView]:
        """One page of sessions; pass ``page.cursor`` back for the next (None on the last page)."""
        return self.call(calls.list_sessions(selector, phase, limit, cursor))

    def list(
        self, *, selector: str | None = None, phase: str | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[SessionView]:
        """Every session matching the label selector and phase, fetched a page at a time as iterated."""
        cursor: str | None = None
        while True:
            page = self.list_page(selector=selector, phase=phase, limit=page_size, cursor=cursor)
            yield from page.items
            if not page.cursor:
                return
            cursor = page.cursor

    def create(self, resource: Resource) -> SessionView:
        """``POST /sessions``: the full resource or the short form ``{"prompt": ..., "session_id": ...}``.

        201 creates; the same id with the same spec answers the existing session (so a create that
        names its id is retried safely); another spec with that id is a :class:`~flyswarm.Conflict`.
        """
        return self.call(calls.create_session(resource)).resource

    def apply(self, resource: Resource) -> Applied[SessionView] | Applied[Pool] | Applied[Webhook]:
        """Create or update one resource, as ``kubectl apply`` does; ``kind: Pool`` goes to ``/pools``.

        A named session is PUT (created, or its labels and spec updated); an unnamed one is POSTed
        and gets a generated id. ``result.action`` is ``created``, ``configured`` or ``unchanged``.
        """
        return self.call(calls.apply(resource))

    def delete(self, session_id: str) -> SessionView | None:
        """Mark a session deleted: the controller destroys its machine, then the record goes."""
        return self.call(calls.delete_session(session_id))

    def send(self, session_id: str, text: str) -> MessageAccepted:
        """Queue a chat message (wakes a sleeping chat). Never retried: it could be delivered twice."""
        return self.call(calls.send_message(session_id, text))

    def wait(
        self,
        session_id: str,
        *,
        until: Until = None,
        timeout: float = DEFAULT_TIMEOUT,
        interval: float = DEFAULT_INTERVAL,
    ) -> SessionView:
        """The session once ``until`` holds (default: a terminal phase) or it finished; raises
        :class:`~flyswarm.Timeout` after ``timeout`` seconds, :class:`~flyswarm.NotFound` if it is gone."""
        test, described = condition(until)
        deadline = time.monotonic() + timeout
        while True:
            session = self.get(session_id)
            if settled(session, test):
                return session
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out(session, described, timeout)
            time.sleep(min(interval, remaining))

    # -- pools ------------------------------------------------------------------------------------

    def get_pool(self, name: str) -> Pool:
        return self.call(calls.get_pool(name))

    def list_pools(
        self, *, selector: str | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[Pool]:
        cursor: str | None = None
        while True:
            page = self.call(calls.list_pools(selector, page_size, cursor))
            yield from page.items
            if not page.cursor:
                return
            cursor = page.cursor

    def apply_pool(self, resource: Resource) -> Applied[Pool]:
        """Create or update one pool (``PUT /pools/{metadata.name}``; a pool is always named)."""
        return self.call(calls.put_pool(resource))

    def delete_pool(self, name: str) -> Pool:
        return self.call(calls.delete_pool(name))

    # -- webhooks (README "Webhooks") --------------------------------------------------------------

    def get_webhook(self, name: str) -> Webhook:
        """A Webhook (never its secret: ``status.secretSet`` says whether one is set)."""
        return self.call(calls.get_webhook(name))

    def list_webhooks(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[Webhook]:
        cursor: str | None = None
        while True:
            page = self.call(calls.list_webhooks(page_size, cursor))
            yield from page.items
            if not page.cursor:
                return
            cursor = page.cursor

    def apply_webhook(self, resource: Resource) -> Applied[Webhook]:
        """Create or update one webhook; created without a secret, ``resource.status.secret`` holds
        the generated one (shown this once)."""
        return self.call(calls.put_webhook(resource))

    def delete_webhook(self, name: str) -> Webhook:
        return self.call(calls.delete_webhook(name))

    def webhook_deliveries(self, name: str, *, limit: int = 50) -> builtins.list[DeliveryView]:
        return self.call(calls.webhook_deliveries(name, limit))

    def session_deliveries(self, session_id: str, *, limit: int = 50) -> builtins.list[DeliveryView]:
        return self.call(calls.session_deliveries(session_id, limit))

    # -- files ------------------------------------------------------------------------------------

    def artifacts(self, session_id: str) -> ArtifactList:
        return self.call(calls.list_artifacts(session_id))

    def artifact(self, session_id: str, name: str) -> bytes:
        """One artifact's bytes, checked against the sha256 the server sends."""
        return self.call(calls.get_artifact(session_id, name))

    def live_file(self, session_id: str, path: str) -> bytes | dict[str, Any]:
        """A running session's file (bytes) or directory listing (the JSON body)."""
        return self.call(calls.get_live_file(session_id, path))

    # -- events -----------------------------------------------------------------------------------

    def events(
        self,
        session_id: str,
        *,
        after: str | None = None,
        follow: bool = True,
        idle_timeout: float | None = None,
        max_reconnects: int | None = None,
        on_reconnect: Callable[[int, str], None] | None = None,
    ) -> Iterator[Event]:
        """The session's events after ``after`` (None: from the start), in order, each exactly once.

        ``follow=False`` returns the history and stops. ``follow=True`` keeps reading until the
        server ends the stream with an ``end`` event (the session finished and went quiet, or was
        deleted), which is yielded last. A dropped connection, a stalled one, a restarted server or
        a 5xx is resumed with ``Last-Event-ID``; ``max_reconnects`` consecutive failures end it
        (None: never give up). ``idle_timeout`` returns (without an ``end``) after that many seconds
        without a byte, keep-alives included, so a caller can look around and call again with ``after``.
        """
        limit = 2 if max_reconnects is None and not follow else max_reconnects
        resume = Resume(after, limit)
        while True:
            try:
                for event in self._stream_once(session_id, resume, follow=follow, idle_timeout=idle_timeout):
                    if resume.accept(event):
                        yield event
                        if event.is_end:
                            return
                if not follow:
                    return
                reason = "stream closed by the server"
            except _Idle:
                return
            except FlyswarmError as exc:
                why = resumable(exc)
                if why is None:
                    raise
                reason = why
            resume.failed(self.url, reason)
            if on_reconnect is not None:
                on_reconnect(resume.failures, reason)
            time.sleep(self.retry.reconnect_delay(resume.failures))

    def _stream_once(
        self, session_id: str, resume: Resume, *, follow: bool, idle_timeout: float | None
    ) -> Iterator[Event]:
        params = {} if follow else {"follow": "false"}
        read = idle_timeout if idle_timeout is not None else STALL_TIMEOUT if follow else HISTORY_TIMEOUT
        timeout = httpx.Timeout(self.config.http_timeout().connect, read=read)
        path = calls.path("sessions", session_id, "events")
        try:
            headers = resume.headers()
            with self._http.stream("GET", path, headers=headers, params=params, timeout=timeout) as r:
                if r.status_code != 200:
                    r.read()
                    raise error_from_response(r)
                yield from parse_lines(r.iter_lines())
        except httpx.ReadTimeout:
            if idle_timeout is not None:
                raise _Idle() from None
            raise ServerUnreachable(self.url, f"no data for {read:g} s") from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.url, describe_transport_error(exc)) from None
