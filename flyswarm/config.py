"""Where the client talks and as whom: arguments first, then ``FLYSWARM_URL``, ``FLYSWARM_TOKEN`` and
``FLYSWARM_TIMEOUT``, then the local stack's defaults (``http://127.0.0.1:8080``, no token, 30 s)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import httpx

from flyswarm.errors import TOKEN_ENV

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 30.0
#: Connecting should never take long: a refused or unroutable port is found out in this time.
CONNECT_TIMEOUT = 5.0
URL_ENV = "FLYSWARM_URL"
TIMEOUT_ENV = "FLYSWARM_TIMEOUT"
USER_AGENT = "flyswarm-python"


@dataclass(frozen=True)
class Config:
    url: str
    token: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def resolve(cls, url: str | None, token: str | None, timeout: float | None) -> Config:
        url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)
        return cls(url, token or None, timeout)

    def headers(self, user_agent: str = USER_AGENT) -> dict[str, str]:
        headers = {"user-agent": user_agent, "accept": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        return headers

    def http_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT))
