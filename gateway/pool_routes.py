"""The pool routes of the agent channel: a parked pool agent's only two requests, by its slot token.

=========================================  =====================================================
``POST /agent/v1/pool/booted``              the slot's agent is booted and waiting (204)
``GET  /agent/v1/pool/assignment?waitMs=``  its assignment: 200 ``{sessionId, sessionToken, env}``
                                            once, else 204 after at most ``waitMs`` (ask again)
=========================================  =====================================================

Authenticated by the slot token alone (``fpt_...``, :mod:`api.pool_token`), compared with the
stored digest in constant time. It opens these two routes of its own slot and nothing else: no
session route parses it (401), and these routes parse no session token (401). Revoked, replaced or
already used (the take revokes it): 401.

**An assignment is handed out only at the start of a request**, never to a request that was
already waiting when it was written. The controller claims *parked* machines: the agent holding
that long-poll is suspended, and on Fly a resumed machine's connections may not survive, so a
response written into one could be lost, and with it the session token (the take is once). So the
wait ends with 204 as soon as the slot is announced (:class:`gateway.pool_hub.AssignmentHub`); the
resumed agent reads that, or finds its connection cut, and asks again at once - a fresh request,
from a live agent, which takes the assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from api.pool_token import PoolToken, digest_matches, parse
from api.store_channel import ChannelStore
from api.store_pool_slots import SlotRevoked
from gateway.pool_hub import AssignmentHub

PREFIX = "/agent/v1/pool"
MAX_WAIT_MS = 30_000
#: How long a waiter waits for the hub's subscription before looking anyway (it then relies on the
#: subscription's catch-up wake, or on its own timeout).
_READY_SECONDS = 2.0


class PoolChannel(Protocol):
    """What the pool routes need of :class:`gateway.channel.AgentChannel`."""

    pool_hub: AssignmentHub | None

    def _store(self) -> ChannelStore: ...


class PoolRefusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def add_pool_routes(app: FastAPI, channel: PoolChannel, presented: Callable[[Request], str | None]) -> None:
    """Add the pool routes to the channel's app; ``presented`` reads the request's token."""
    app.state.pool_channel = channel
    app.state.pool_presented = presented

    @app.exception_handler(PoolRefusal)
    async def _refused(request: Request, exc: PoolRefusal) -> JSONResponse:
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)

    @app.post(PREFIX + "/booted", status_code=204)
    async def booted(slot: Slot) -> None:
        if not await channel._store().mark_pool_booted(slot.pool, slot.slot):
            raise _revoked()

    @app.get(PREFIX + "/assignment")
    async def assignment(
        request: Request, slot: Slot, waitMs: Annotated[int, Query(ge=0, le=MAX_WAIT_MS)] = 0
    ) -> Response:
        store, hub = channel._store(), channel.pool_hub
        if waitMs == 0 or hub is None:
            return await _take(store, slot) or Response(status_code=204)
        async with hub.watch(slot.pool, slot.slot, ready_timeout=min(_READY_SECONDS, waitMs / 1000)) as woken:
            taken = await _take(store, slot)
            if taken is not None:
                return taken
            await _until_woken(request, woken, waitMs / 1000)
        return Response(status_code=204)


async def _slot_of(request: Request) -> PoolToken:
    """The slot the request's token opens, or a 401 :class:`PoolRefusal`."""
    channel: PoolChannel = request.app.state.pool_channel
    value = request.app.state.pool_presented(request)
    if not value:
        raise PoolRefusal(401, "unauthorized", "x-api-key: a pool slot token is required")
    token = parse(value)
    if token is None:
        raise PoolRefusal(401, "unauthorized", "x-api-key: not a flyswarm pool slot token")
    stored = await channel._store().pool_slot_digest(token.pool, token.slot)
    if not digest_matches(token.value, stored):
        raise _revoked()
    return token


# The slot a request's token opens: the pool routes' one way to a slot.
Slot = Annotated[PoolToken, Depends(_slot_of)]


async def _take(store: ChannelStore, slot: PoolToken) -> Response | None:
    try:
        got = await store.take_pool_assignment(slot.pool, slot.slot, slot.digest)
    except SlotRevoked:
        raise _revoked() from None
    if got is None:
        return None
    body: dict[str, Any] = {"sessionId": got.session_id, "sessionToken": got.session_token, "env": got.env}
    return JSONResponse(body, headers={"cache-control": "no-store"})


def _revoked() -> PoolRefusal:
    return PoolRefusal(401, "unauthorized", "x-api-key: unknown, revoked or used pool slot token")


async def _until_woken(request: Request, woken: asyncio.Future[None], timeout: float) -> None:
    """Until the slot is announced, the wait runs out, or the agent hangs up (its machine destroyed:
    nobody would read the answer, and the gateway would not stop before the wait ended)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({woken, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
