"""One webhook delivery attempt over HTTP: resolve, check every address, connect to a checked one.

The controller's second outbound HTTP client beside the Fly client (``tests/test_layering.py``
names both). The SSRF guard (:mod:`api.webhook_targets`) runs on every attempt: the host is resolved
now, every address it has must be allowed, and the request goes to the first of those addresses
(``Host`` and, for https, the TLS server name stay the URL's host), so a DNS answer cannot change
between the check and the connection. Redirects are not followed (a 3xx is a failed attempt): a
redirect could point anywhere.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from api.webhook_signing import headers as signed_headers
from api.webhook_targets import TargetRefused, resolve

USER_AGENT = "flyswarm-webhooks/1"


@dataclass(frozen=True)
class Attempt:
    """What one attempt got: an HTTP status, or an error (no status) such as a refused target."""

    status: int | None
    error: str
    seconds: float

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookSender:
    """Sends signed deliveries. One per worker; :meth:`aclose` when done."""

    def __init__(self, *, timeout_seconds: float, allow_private: bool, max_connections: int = 32) -> None:
        self.timeout_seconds = timeout_seconds
        self.allow_private = allow_private
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=0)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_seconds), follow_redirects=False, limits=limits, trust_env=False
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, *, url: str, secret: str, msg_id: str, body: str, timestamp: int) -> Attempt:
        started = time.monotonic()
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = await resolve(host, port, allow_private=self.allow_private)
        except TargetRefused as exc:
            return Attempt(None, f"refused: {exc}", time.monotonic() - started)
        except (OSError, TimeoutError) as exc:
            return Attempt(None, f"cannot resolve {host}: {type(exc).__name__}", time.monotonic() - started)
        address = addresses[0]
        shown = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
        pinned = urlunsplit((parts.scheme, f"{shown}:{port}", parts.path or "/", parts.query, ""))
        data = body.encode()
        request_headers = {
            **signed_headers(secret, msg_id, timestamp, data),
            "host": parts.netloc.rpartition("@")[2],
            "user-agent": USER_AGENT,
        }
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            response = await self._client.post(
                pinned, content=data, headers=request_headers, extensions=extensions
            )
        except httpx.TimeoutException:
            return Attempt(None, "timed out", time.monotonic() - started)
        except httpx.HTTPError as exc:
            return Attempt(None, f"{type(exc).__name__}", time.monotonic() - started)
        return Attempt(response.status_code, "", time.monotonic() - started)
