"""The Server-Sent Events response of a followed session (``GET /sessions/{id}/events``).

A plain ASGI response rather than Starlette's ``StreamingResponse``, because the hub must be able to
cut a follower at any point, including while its write is blocked on a client that stopped reading:
the whole send loop runs inside one ``asyncio.timeout`` that the hub's ``on_cut`` (buffer overflow)
and the disconnect listener reschedule to "now". Frames:

* ``retry: 2000`` first, then ``id:``/``event:``/``data:`` per event and ``: keep-alive`` comments;
* ``event: end`` with ``{"reason": "deleted" | "finished"}`` when the session ends;
* ``event: error`` with the API's error body before the server closes the stream: ``slow_client``
  (the client fell more than ``FLYSWARM_STREAM_FOLLOWER_BUFFER`` events behind), ``unavailable``
  (Redis down while replaying history, or the process at ``FLYSWARM_STREAM_MAX_FOLLOWERS``).
  EventSource then reconnects with ``Last-Event-ID`` and resumes without a gap or a duplicate.

A client that stalled completely cannot even take the error frame: after a short wait the response
is abandoned and uvicorn closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import error_payload
from api.fanout import HubFull
from api.follower import Delivery, FeedItem, FollowerCut, cuttable
from api.metrics import ApiMetrics
from api.store_base import StoreUnavailable
from api.streaming import SSE_KEEPALIVE, End, sse_end_frame

Feed = Callable[[Callable[[], None]], AsyncGenerator[FeedItem, None]]
_FINAL_SEND_SECONDS = 1.0
UNAVAILABLE = "the session store (Redis) is unreachable"


def sse_error_frame(code: str, message: str) -> bytes:
    return f"event: error\ndata: {json.dumps(error_payload(code, message))}\n\n".encode()


def slow_client_message(last_id: str | None) -> str:
    resume = f"Last-Event-ID: {last_id}" if last_id else "Last-Event-ID"
    return f"this client fell too far behind the session's events; reconnect with {resume} to resume"


class SseFollow(StreamingResponse):
    """Stream ``feed`` as SSE; ``feed(on_cut)`` is the hub's follower generator."""

    def __init__(self, feed: Feed, metrics: ApiMetrics, headers: dict[str, str]) -> None:
        super().__init__((), media_type="text/event-stream", headers=headers)
        self.feed = feed
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.streams.inc()
        try:
            await self._serve(receive, send)
        finally:
            self.metrics.streams.dec()

    async def _serve(self, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
        gone = asyncio.Event()
        final: bytes | None = None
        last_id: str | None = None
        try:
            async with cuttable() as interrupt:
                listener = asyncio.create_task(_listen_for_disconnect(receive, gone, interrupt))
                try:
                    async with contextlib.aclosing(self.feed(interrupt)) as feed:
                        async for item in feed:
                            if isinstance(item, End):
                                final = sse_end_frame(item.reason)
                                break
                            if isinstance(item, Delivery):
                                await send(
                                    {"type": "http.response.body", "body": item.sse(), "more_body": True}
                                )
                                last_id = item.id
                            else:
                                await send(
                                    {"type": "http.response.body", "body": SSE_KEEPALIVE, "more_body": True}
                                )
                finally:
                    listener.cancel()
        except TimeoutError:
            if gone.is_set():
                return  # the client left: nobody to tell
            final = sse_error_frame("slow_client", slow_client_message(last_id))
        except FollowerCut as cut:
            final = sse_error_frame("slow_client", slow_client_message(cut.last_id))
        except HubFull as full:
            final = sse_error_frame("unavailable", f"{full}; retry shortly")
        except StoreUnavailable:
            # The headers are gone: say why in-band and end; EventSource reconnects with Last-Event-ID.
            final = sse_error_frame("unavailable", UNAVAILABLE)
        try:
            async with asyncio.timeout(_FINAL_SEND_SECONDS):
                if final is not None:
                    await send({"type": "http.response.body", "body": final, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            return  # a stalled client cannot take even that: uvicorn closes the connection


async def _listen_for_disconnect(
    receive: Receive, gone: asyncio.Event, interrupt: Callable[[], None]
) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            interrupt()
            return
