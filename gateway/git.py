"""The git proxy: an agent fetches (and pushes) its session's declared repositories through here.

A machine holds no git credential. For an ``http(s)`` source ``spec.workspace.git[i]`` the agent's
remote is ``$FLYSWARM_CONTROL_URL/git/<i>``; its git sends the session token as
``Authorization: Bearer`` (or as the password of Basic auth). This proxy:

1. authenticates the token as the model proxy does (401 unknown/revoked, 403 finished/deleted);
2. resolves ``<i>`` in *that token's* session's spec: only declared sources are reachable, so the
   token cannot fetch anything else, and it dies with the session;
3. serves the smart-HTTP protocol only: ``GET info/refs?service=git-upload-pack`` and
   ``POST git-upload-pack`` (fetch); ``git-receive-pack`` (push) only for the source named by
   ``spec.output.push``. Anything else (the dumb protocol, other paths) is 404;
4. forwards to the source's URL with the credential of the source's ``secret`` from
   ``FLYSWARM_GATEWAY_GIT_SECRETS`` (``name -> "user:password"``, or a bare token sent as
   ``x-access-token:<token>``, GitHub's form) as Basic auth, no redirects followed (a credential
   never leaves for another host). The response streams back; an upstream 401 becomes 403 without
   its challenge, so git fails at once instead of asking for a password.

A secret named by the spec but not configured here is 403 with a message naming it; an
unreachable upstream is 502. Request bodies are read whole (bounded by
``FLYSWARM_GATEWAY_MAX_BODY_BYTES``): git's requests are negotiations and pushes of one commit.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from api.logs import get_logger
from api.models import Session
from api.session_token import Refusal, check, parse
from api.store_base import StoreUnavailable
from api.store_gateway import GatewayStore
from api.workspace_models import GitSource
from gateway.settings import GatewaySettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = get_logger("gateway.git")

PREFIX = "/git/"
SERVICES = ("git-upload-pack", "git-receive-pack")
_FORWARD_REQUEST = frozenset(
    {b"content-type", b"content-encoding", b"accept", b"git-protocol", b"user-agent"}
)
_FORWARD_RESPONSE = frozenset({"content-type", "content-encoding", "cache-control", "expires", "pragma"})


class GitRefusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name != b"authorization":
            continue
        scheme, _, rest = value.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer":
            return rest.strip()
        if scheme.lower() == "basic":
            try:
                return base64.b64decode(rest.strip()).decode().partition(":")[2] or None
            except ValueError:
                return None
    return None


def credential_header(value: str) -> bytes:
    """Basic auth for ``user:password``, or for GitHub's ``x-access-token:<token>`` form."""
    pair = value if ":" in value else f"x-access-token:{value}"
    return b"Basic " + base64.b64encode(pair.encode())


class GitProxy:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.secrets = {name: v.get_secret_value() for name, v in settings.git_secrets.items()}
        self.client: httpx.AsyncClient | None = None

    async def startup(self) -> None:
        timeout = httpx.Timeout(
            self.settings.idle_timeout_seconds, connect=self.settings.connect_timeout_seconds
        )
        self.client = httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False)

    async def shutdown(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, store: GatewayStore) -> None:
        try:
            await self._serve(scope, receive, send, store)
        except GitRefusal as exc:
            log.info("git_proxy_refused", path=scope["path"], status=exc.status, error=exc.message)
            body = (exc.message + "\n").encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": exc.status,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
                }
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _session(self, scope: Scope, store: GatewayStore) -> Session:
        value = _token(scope["headers"])
        token = parse(value) if value else None
        if token is None:
            raise GitRefusal(401, "a session token is required (Authorization: Bearer)")
        try:
            view = await store.view(token.session_id)
        except StoreUnavailable:
            raise GitRefusal(503, "the control plane's store is unavailable; retry") from None
        verdict = check(token.value, view.token_digest, view.session)
        if isinstance(verdict, Refusal):
            raise GitRefusal(verdict.status, verdict.message)
        assert view.session is not None
        return view.session

    def _route(self, scope: Scope, session: Session) -> tuple[int, GitSource, str]:
        index_text, _, rest = scope["path"][len(PREFIX) :].partition("/")
        sources = session.spec.workspace.git if session.spec.workspace else []
        index = int(index_text) if index_text.isdigit() else len(sources)
        if index >= len(sources) or not sources[index].proxied:
            raise GitRefusal(404, f"session {session.id} declares no http(s) source {index_text!r}")
        method = scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        if rest == "info/refs" and method == "GET":
            service = dict(p.partition("=")[::2] for p in query.split("&")).get("service", "")
        elif rest in SERVICES and method == "POST":
            service = rest
        else:
            raise GitRefusal(404, f"{method} /{rest}: only git's smart-HTTP protocol is proxied")
        if service not in SERVICES:
            raise GitRefusal(404, "only git's smart-HTTP protocol is proxied")
        push = session.spec.output.push if session.spec.output else None
        if service == "git-receive-pack" and (push is None or push.source != index):
            raise GitRefusal(403, f"source {index} may not be pushed to: spec.output.push does not name it")
        return index, sources[index], rest + (f"?{query}" if query else "")

    async def _serve(self, scope: Scope, receive: Receive, send: Send, store: GatewayStore) -> None:
        session = await self._session(scope, store)
        index, source, rest = self._route(scope, session)
        headers = [(n.decode(), v.decode("latin-1")) for n, v in scope["headers"] if n in _FORWARD_REQUEST]
        if source.secret is not None:
            secret = self.secrets.get(source.secret)
            if secret is None:
                raise GitRefusal(403, f"secret {source.secret!r} is not configured on the control plane")
            headers.append(("authorization", credential_header(secret).decode()))
        body = await _read_body(receive, self.settings.max_body_bytes)
        assert self.client is not None
        url = f"{source.url.rstrip('/')}/{rest}"
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            error = type(exc).__name__
            log.warning("git_proxy_upstream_unreachable", session_id=session.id, index=index, error=error)
            raise GitRefusal(502, f"{source.url} is unreachable ({type(exc).__name__})") from None
        try:
            status = response.status_code
            if status in (401, 407):
                raise GitRefusal(403, f"{source.url} refused the credential (HTTP {status})")
            if 300 <= status < 400:
                raise GitRefusal(502, f"{source.url} redirects (HTTP {status}); give its final URL")
            path = rest.partition("?")[0]
            log.info("git_proxied", session_id=session.id, index=index, path=path, status=status)
            out = [
                (n.encode(), v.encode("latin-1"))
                for n, v in response.headers.items()
                if n in _FORWARD_RESPONSE
            ]
            await send({"type": "http.response.start", "status": status, "headers": out})
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:  # headers are sent: git sees a cut stream and says so
                log.warning("git_proxy_upstream_cut", session_id=session.id, error=type(exc).__name__)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise GitRefusal(400, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GitRefusal(413, f"request body larger than {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)
