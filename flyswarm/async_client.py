"""The asyncio client: :class:`AsyncClient`, the awaitable twin of :class:`~flyswarm.Client`.

Same calls (built once in :mod:`flyswarm.calls`), same retry policy, same resume rules for event
streams; lists and events are async iterators (``async for``).
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx

from flyswarm import calls
from flyswarm.calls import Applied, ArtifactList, Call, Page, Resource
from flyswarm.client import DEFAULT_PAGE_SIZE, transport_error
from flyswarm.config import Config
from flyswarm.errors import (
    FlyswarmError,
    ServerError,
    ServerUnreachable,
    describe_transport_error,
    error_from_response,
)
from flyswarm.events import HISTORY_TIMEOUT, STALL_TIMEOUT, Event, Resume, SseParser, resumable
from flyswarm.models import DeliveryView, MessageAccepted, Pool, SessionView, Webhook
from flyswarm.retry import Retry
from flyswarm.waiting import DEFAULT_INTERVAL, DEFAULT_TIMEOUT, Until, condition, settled, timed_out

T = TypeVar("T")


class _Idle(Exception):
    pass


class AsyncClient:
    """One connection pool to the API, for asyncio. ``async with AsyncClient() as client: ...``

    Arguments as :class:`~flyswarm.Client`.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = None,
        retry: Retry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str | None = None,
    ) -> None:
        self.config = Config.resolve(url, token, timeout)
        self.url = self.config.url
        self.retry = retry or Retry()
        headers = self.config.headers(user_agent) if user_agent else self.config.headers()
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=self.config.http_timeout(), transport=transport
        )

    def __repr__(self) -> str:
        return f"AsyncClient(url={self.url!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, call: Call[T]) -> T:
        """Send one call, retrying as :attr:`retry` allows; the decoded answer or a typed error."""
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, params=call.params, json=call.body
                )
            except httpx.TransportError as exc:
                error = transport_error(self.url, exc)
            else:
                if response.status_code in call.ok:
                    return call.decode(response)
                error = error_from_response(response)
            delay = self.retry.delay(attempt, error, idempotent=call.idempotent)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    # -- health -----------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return await self.call(calls.health())

    async def ready(self) -> bool:
        try:
            return await self.call(calls.ready())
        except ServerError:
            return False

    # -- sessions ---------------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionView:
        return await self.call(calls.get_session(session_id))

    async def list_page(
        self,
        *,
        selector: str | None = None,
        phase: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[SessionView]:
        return await self.call(calls.list_sessions(selector, phase, limit, cursor))

    async def list(
        self, *, selector: str | None = None, phase: str | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[SessionView]:
        cursor: str | None = None
        while True:
            page = await self.list_page(selector=selector, phase=phase, limit=page_size, cursor=cursor)
            for item in page.items:
                yield item
            if not page.cursor:
                return
            cursor = page.cursor

    async def create(self, resource: Resource) -> SessionView:
        return (await self.call(calls.create_session(resource))).resource

    async def apply(self, resource: Resource) -> Applied[SessionView] | Applied[Pool] | Applied[Webhook]:
        return await self.call(calls.apply(resource))

    async def delete(self, session_id: str) -> SessionView | None:
        return await self.call(calls.delete_session(session_id))

    async def send(self, session_id: str, text: str) -> MessageAccepted:
        """Queue a chat message. Never retried: it could be delivered twice."""
        return await self.call(calls.send_message(session_id, text))

    async def wait(
        self,
        session_id: str,
        *,
        until: Until = None,
        timeout: float = DEFAULT_TIMEOUT,
        interval: float = DEFAULT_INTERVAL,
    ) -> SessionView:
        test, described = condition(until)
        deadline = time.monotonic() + timeout
        while True:
            session = await self.get(session_id)
            if settled(session, test):
                return session
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out(session, described, timeout)
            await asyncio.sleep(min(interval, remaining))

    # -- pools ------------------------------------------------------------------------------------

    async def get_pool(self, name: str) -> Pool:
        return await self.call(calls.get_pool(name))

    async def list_pools(
        self, *, selector: str | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[Pool]:
        cursor: str | None = None
        while True:
            page = await self.call(calls.list_pools(selector, page_size, cursor))
            for item in page.items:
                yield item
            if not page.cursor:
                return
            cursor = page.cursor

    async def apply_pool(self, resource: Resource) -> Applied[Pool]:
        return await self.call(calls.put_pool(resource))

    async def delete_pool(self, name: str) -> Pool:
        return await self.call(calls.delete_pool(name))

    # -- webhooks (README "Webhooks") --------------------------------------------------------------

    async def get_webhook(self, name: str) -> Webhook:
        return await self.call(calls.get_webhook(name))

    async def list_webhooks(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[Webhook]:
        cursor: str | None = None
        while True:
            page = await self.call(calls.list_webhooks(page_size, cursor))
            for item in page.items:
                yield item
            if not page.cursor:
                return
            cursor = page.cursor

    async def apply_webhook(self, resource: Resource) -> Applied[Webhook]:
        return await self.call(calls.put_webhook(resource))

    async def delete_webhook(self, name: str) -> Webhook:
        return await self.call(calls.delete_webhook(name))

    async def webhook_deliveries(self, name: str, *, limit: int = 50) -> builtins.list[DeliveryView]:
        return await self.call(calls.webhook_deliveries(name, limit))

    async def session_deliveries(self, session_id: str, *, limit: int = 50) -> builtins.list[DeliveryView]:
        return await self.call(calls.session_deliveries(session_id, limit))

    # -- files ------------------------------------------------------------------------------------

    async def artifacts(self, session_id: str) -> ArtifactList:
        return await self.call(calls.list_artifacts(session_id))

    async def artifact(self, session_id: str, name: str) -> bytes:
        return await self.call(calls.get_artifact(session_id, name))

    async def live_file(self, session_id: str, path: str) -> bytes | dict[str, Any]:
        return await self.call(calls.get_live_file(session_id, path))

    # -- events -----------------------------------------------------------------------------------

    async def events(
        self,
        session_id: str,
        *,
        after: str | None = None,
        follow: bool = True,
        idle_timeout: float | None = None,
        max_reconnects: int | None = None,
        on_reconnect: Callable[[int, str], None] | None = None,
    ) -> AsyncIterator[Event]:
        """As :meth:`flyswarm.Client.events`: in order, each exactly once, resumed across reconnects."""
        limit = 2 if max_reconnects is None and not follow else max_reconnects
        resume = Resume(after, limit)
        while True:
            try:
                async for event in self._stream_once(session_id, resume, follow, idle_timeout):
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
            await asyncio.sleep(self.retry.reconnect_delay(resume.failures))

    async def _stream_once(
        self, session_id: str, resume: Resume, follow: bool, idle_timeout: float | None
    ) -> AsyncIterator[Event]:
        params = {} if follow else {"follow": "false"}
        read = idle_timeout if idle_timeout is not None else STALL_TIMEOUT if follow else HISTORY_TIMEOUT
        timeout = httpx.Timeout(self.config.http_timeout().connect, read=read)
        path = calls.path("sessions", session_id, "events")
        parser = SseParser()
        try:
            async with self._http.stream(
                "GET", path, headers=resume.headers(), params=params, timeout=timeout
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise error_from_response(r)
                async for line in r.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
                last = parser.close()
                if last is not None:
                    yield last
        except httpx.ReadTimeout:
            if idle_timeout is not None:
                raise _Idle() from None
            raise ServerUnreachable(self.url, f"no data for {read:g} s") from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.url, describe_transport_error(exc)) from None
