"""An app backend that opens a chat for each user and relays it over its own WebSocket.

The browser (or phone app) talks only to this backend; the backend holds the flyswarm token. A user
connecting to ``/chat/{user}`` gets one long-running chat session (``chat-<user>``, created on first
use: a create that names its id is idempotent, so reconnecting finds the same conversation). Every
text the user sends becomes a chat message; every event of the session is relayed back as
``{"id", "type", "message"}`` JSON, and a reconnecting client passes the last id it saw
(``/chat/{user}?after=<id>``) to resume without a gap or a repeat.

    FLYSWARM_URL=http://127.0.0.1:8080 python examples/chat_relay.py --port 8000
    # then connect a WebSocket client to ws://127.0.0.1:8000/chat/alice and send text frames

Needs only the flyswarm package (and uvicorn, which the API already depends on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import flyswarm

_USER = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")


async def chat(socket: WebSocket) -> None:
    user = socket.path_params["user"]
    if not _USER.match(user):
        await socket.close(code=1008, reason="user names are [a-z0-9-]")
        return
    await socket.accept()
    session_id = f"chat-{user}"
    async with flyswarm.AsyncClient() as client:
        await client.create(
            {"session_id": session_id, "mode": "chat", "labels": {"app": "chat-relay", "user": user}}
        )
        relay = asyncio.create_task(_relay(client, socket, session_id, socket.query_params.get("after")))
        try:
            while True:
                text = await socket.receive_text()
                await client.send(session_id, text)  # never retried by the SDK: no double message
        except WebSocketDisconnect:
            pass
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay


async def _relay(client: flyswarm.AsyncClient, socket: WebSocket, session_id: str, after: str | None) -> None:
    # events() resumes by itself across dropped connections to the API (Last-Event-ID).
    async for event in client.events(session_id, after=after):
        await socket.send_json({"id": event.id, "type": event.type, "message": event.data.get("message")})


app = Starlette(routes=[WebSocketRoute("/chat/{user}", chat)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
