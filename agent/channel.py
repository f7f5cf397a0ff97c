"""The agent's way to its own state: the control plane's agent channel, over HTTP with its session token.

An agent machine holds no Redis address and no Redis credential: everything it reads or writes about
its session goes to the gateway's ``/agent/v1`` routes (:mod:`gateway.channel`), authenticated by
the one per-session token the controller minted for this launch (the same token the CLI sends as
its Anthropic key). :class:`AgentChannel` offers the methods the agent used on the Redis store
(``get``, ``write_agent_report``, ``heartbeat``, ``append_event``, ``inbox_next``, ``inbox_ack``,
``transcripts``) and raises the same errors, so the reporter, heartbeat, publisher and chat loop
retry exactly as they did:

* connection errors, timeouts, 5xx (503 while the control plane's Redis is away):
  :class:`api.store_errors.StoreUnavailable`;
* 401/403 (a revoked token, a deleted or finished session): :class:`api.store_errors.StoreAuthFailed`.

One ``httpx.AsyncClient`` with keep-alive: a heartbeat or an event batch is one request on an open
connection. The session id arguments are kept for the store's signatures; the token decides the
session, and a call naming another session is a bug (ValueError), never a request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from agent.channel_transcripts import ChannelTranscripts
from api.models import AgentReport, InboxMessage, Session, SessionEvent, utcnow
from api.store_errors import StoreAuthFailed, StorePermissionDenied, StoreUnavailable
from api.transcript_types import SummaryFold

PREFIX = "/agent/v1"


class ChannelRefused(RuntimeError):
    """The control plane refused a request as malformed (a 4xx other than 401/403): a bug, not an outage."""


class AgentChannel:
    """The agent's session state, through the control plane. One instance per agent process."""

    def __init__(self, base_url: str, token: str, session_id: str, *, timeout: float = 10.0) -> None:
        self.session_id = session_id
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"x-api-key": token},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
            follow_redirects=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    def _check(self, session_id: str) -> None:
        if session_id != self.session_id:
            raise ValueError(f"this channel serves session {self.session_id}, not {session_id}")

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        accept: tuple[int, ...] = (),
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One call to the channel, its failures mapped to the store's errors."""
        try:
            response = await self._client.request(
                method,
                PREFIX + path,
                json=json,
                params=params,
                content=content,
                headers=headers,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
            )
        except httpx.HTTPError as exc:  # connect errors, timeouts, a cut connection
            raise StoreUnavailable(f"the control plane is unreachable ({type(exc).__name__})") from exc
        status = response.status_code
        if status < 300 or status in accept:
            return response
        code = _code(response)
        if status in (401, 403):
            raise StoreAuthFailed(f"the control plane refused the session token ({status} {code})")
        if status >= 500 or status == 429:
            raise StoreUnavailable(f"the control plane answered {status} ({code})")
        raise ChannelRefused(f"{method} {path}: {status} {code}: {response.text[:500]}")

    # -- the session ------------------------------------------------------------------------------

    async def get(self, session_id: str) -> Session | None:
        """The session; None when it was deleted. A stored spec that is invalid raises ValueError."""
        self._check(session_id)
        response = await self.request("GET", "/session", accept=(403, 422))
        if response.status_code == 403:
            if _code(response) == "deleted":
                return None
            raise StoreAuthFailed("the control plane refused the session token (403)")
        if response.status_code == 422:
            raise ValueError(_message(response))
        session = Session.model_validate_json(response.content)
        if session.id != session_id:
            # The token decides the session: this machine was handed another session's token.
            raise StorePermissionDenied(f"the session token is {session.id}'s, not {session_id}'s")
        return session

    async def write_agent_report(self, session_id: str, report: AgentReport) -> bool:
        """Write the agent-owned report (the controller is woken); False when the session is gone."""
        self._check(session_id)
        if report.updatedAt is None:
            report = report.model_copy(update={"updatedAt": utcnow()})
        response = await self.request("PUT", "/report", json=report.model_dump(mode="json"))
        return bool(response.json().get("written"))

    async def heartbeat(self, session_id: str, machine_id: str | None, ttl_seconds: int, state: str) -> None:
        self._check(session_id)
        await self.request(
            "PUT", "/heartbeat", json={"machineId": machine_id, "ttlSeconds": ttl_seconds, "state": state}
        )

    async def append_events(self, session_id: str, events: Sequence[SessionEvent]) -> list[str]:
        """Append a batch in order (one request); the stream entry ids."""
        self._check(session_id)
        if not events:
            return []
        body = {"events": [e.model_dump(mode="json") for e in events]}
        return [str(i) for i in (await self.request("POST", "/events", json=body)).json()["ids"]]

    async def append_event(self, session_id: str, event: SessionEvent) -> str:
        return (await self.append_events(session_id, [event]))[0]

    # -- the inbox --------------------------------------------------------------------------------

    async def inbox_next(self, session_id: str, *, block_ms: int | None = None) -> InboxMessage | None:
        """The oldest message whose turn is not acknowledged; with ``block_ms``, wait that long for one."""
        self._check(session_id)
        wait = block_ms or 0
        response = await self.request(
            "GET", "/inbox/next", params={"waitMs": wait}, timeout=self.timeout + wait / 1000
        )
        raw = response.json().get("message")
        return None if raw is None else InboxMessage.model_validate(raw)

    async def inbox_ack(self, session_id: str, message_id: str) -> None:
        self._check(session_id)
        await self.request("POST", "/inbox/ack", json={"id": message_id})

    # -- transcripts ------------------------------------------------------------------------------

    def transcripts(self, session_id: str, *, fold: SummaryFold | None = None) -> ChannelTranscripts:
        """The SDK ``SessionStore`` for this session's transcripts, over this channel."""
        self._check(session_id)
        return ChannelTranscripts(self, fold=fold)


def _code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "unknown"


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:1000]
