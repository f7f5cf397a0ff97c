"""``WS /sessions/{id}/ws``: a session's events out, chat messages in, over one WebSocket.

Frames are JSON text. Server to client::

    {"type": "event", "id": "<stream id>", "event": {...SessionEvent...}}
    {"type": "ack", "id": "<message id>", "session_id": "...", "createdAt": "...", "ref": ...}
    {"type": "error", "error": {code, message, fields, requestId}, "ref": ...}
    {"type": "end", "reason": "deleted" | "finished"}          (then a normal close)

Client to server: ``{"text": "...", "ref": <optional, echoed back>}``, validated exactly like
``POST /sessions/{id}/messages``. A bad frame (not JSON, unknown field, task session, ...) gets an
``error`` frame and the socket stays open. ``?after=<id>`` replays events after that id first.

Close codes: 4400 bad id or ``after``, 4404 unknown session, 1011 Redis unreachable at open, 1000
after ``end``, 1013 (try again later) when the process is at ``FLYSWARM_STREAM_MAX_FOLLOWERS`` or
when this client fell more than ``FLYSWARM_STREAM_FOLLOWER_BUFFER`` events behind (an ``error``
frame ``slow_client`` first, when the client still reads; reconnect with ``?after=<last id>``).
Events come from the process's fan-out hub (:mod:`api.fanout`), like SSE. While Redis is down
mid-stream the feed waits and resumes from the last event sent once Redis is back (an ``error``
frame says so only when history cannot be read). Protocol-level pings are uvicorn's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from api.errors import ApiError, FieldProblem, bad_request, error_payload
from api.fanout import Hub, HubFull
from api.follower import Delivery, FollowerCut, cuttable
from api.logs import get_logger
from api.sse import slow_client_message
from api.store import ApiStore
from api.store_base import StoreUnavailable
from api.streaming import End, parse_stream_id

MessageSink = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
_UNAVAILABLE = "the session store (Redis) is unreachable"
_PEER_GONE = (WebSocketDisconnect, RuntimeError)


class SessionSocket:
    """One accepted WebSocket bound to one session."""

    def __init__(
        self,
        websocket: WebSocket,
        store: ApiStore,
        hub: Hub,
        accept_message: MessageSink,
        *,
        request_id: str | None,
    ) -> None:
        self.websocket = websocket
        self.store = store
        self.hub = hub
        self.accept_message = accept_message
        self.request_id = request_id
        self._send_lock = asyncio.Lock()
        self._log = get_logger("api.ws")

    async def send(self, frame: dict[str, Any]) -> None:
        await self.send_text(json.dumps(frame))

    async def send_text(self, text: str) -> None:
        # The event pump and the message reader both send; frames must not interleave.
        async with self._send_lock:
            await self.websocket.send_text(text)

    async def send_error(self, error: ApiError, ref: Any = None) -> None:
        frame: dict[str, Any] = {
            "type": "error",
            **error_payload(error.code, error.message, error.fields, self.request_id),
        }
        if ref is not None:
            frame["ref"] = ref
        await self.send(frame)

    async def _refuse(self, error: ApiError, code: int) -> None:
        await self.send_error(error)
        await self.websocket.close(code)

    async def serve(self, session_id: str, after: str | None) -> None:
        """Validate, then pump events and read messages until either side ends."""
        await self.websocket.accept()
        try:
            start = parse_stream_id(after)
        except ValueError as exc:
            await self._refuse(bad_request("after", str(exc)), 4400)
            return
        try:
            exists = await self.store.get(session_id) is not None
        except StoreUnavailable:
            await self._refuse(ApiError("unavailable", _UNAVAILABLE), 1011)
            return
        if not exists:
            await self._refuse(ApiError("not_found", f"no session {session_id}"), 4404)
            return
        pump = asyncio.create_task(self._pump_events(session_id, start))
        reader = asyncio.create_task(self._read_messages(session_id))
        try:
            await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, reader):
                task.cancel()
            for result in await asyncio.gather(pump, reader, return_exceptions=True):
                # A peer that vanished mid-send surfaces as a disconnect or a closed-socket error.
                if isinstance(result, Exception) and not isinstance(result, _PEER_GONE):
                    self._log.error("websocket_failed", session_id=session_id, error=type(result).__name__)

    async def _pump_events(self, session_id: str, start: str | None) -> None:
        last = start
        while True:
            try:
                # The hub cuts a follower that fell behind even while its send is blocked.
                async with cuttable() as interrupt:
                    feed = self.hub.events(session_id, last, "ws", interrupt)
                    async with contextlib.aclosing(feed):
                        async for item in feed:
                            if isinstance(item, End):
                                await self.send({"type": "end", "reason": item.reason})
                                await self.websocket.close(1000)
                                return
                            if isinstance(item, Delivery):
                                await self.send_text(item.ws())
                                last = item.id
            except (TimeoutError, FollowerCut):
                await self._close_try_later(ApiError("slow_client", slow_client_message(last)), last)
                return
            except HubFull as full:
                await self._close_try_later(ApiError("unavailable", f"{full}; retry shortly"), None)
                return
            except StoreUnavailable:
                await self.send_error(ApiError("unavailable", _UNAVAILABLE))
                await asyncio.sleep(1.0)

    async def _close_try_later(self, error: ApiError, last: str | None) -> None:
        """Say why (if the client still reads) and close with 1013; a stalled client just loses us."""
        reason = f"resume with ?after={last}" if last else "retry shortly"
        with contextlib.suppress(TimeoutError, *_PEER_GONE):
            async with asyncio.timeout(1.0):
                await self.send_error(error)
                await self.websocket.close(1013, reason)

    async def _read_messages(self, session_id: str) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None and message.get("bytes") is not None:
                text = message["bytes"].decode("utf-8", errors="replace")
            await self._handle_frame(session_id, text or "")

    async def _handle_frame(self, session_id: str, text: str) -> None:
        ref: Any = None
        try:
            data = _parse_frame(text)
            ref = data.pop("ref", None)
            accepted = await self.accept_message(session_id, data)
            await self.send({"type": "ack", **accepted, **({"ref": ref} if ref is not None else {})})
        except ApiError as exc:
            await self.send_error(exc, ref)
        except StoreUnavailable:
            await self.send_error(ApiError("unavailable", _UNAVAILABLE), ref)


def _parse_frame(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ApiError(
            "malformed_json", "the frame is not valid JSON", fields=[FieldProblem("frame", reason)]
        ) from None
    if not isinstance(data, dict):
        raise ApiError(
            "malformed_json", "a frame must be a JSON object", fields=[FieldProblem("frame", "not an object")]
        )
    return data
