"""Typed errors: one class per thing a caller does something different about.

::

    FlyswarmError
     ├── ServerUnreachable   connection refused, unknown host, connection lost: "is `make up` running?"
     ├── Timeout             no answer within the client's timeout (or ``wait`` ran out of time)
     └── ApiError            the API answered with an error status and its error body (api/errors.py)
          ├── Unauthorized   401: missing or wrong token
          ├── Forbidden      403: a valid token that may not do this
          ├── NotFound       404
          ├── Conflict       409: same id with another spec, message to a finished session, ...
          ├── Invalid        400/413/422, with every offending field (``fields``)
          ├── RateLimited    429 (``retry_after``)
          └── ServerError    5xx
               └── Unavailable  503: Redis unreachable or a limit of the API process (``retry_after``)

The token never appears in a message or a repr. ``request_id`` is the API's ``X-Request-ID``: the
server's log line for the request carries it.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

TOKEN_ENV = "FLYSWARM_TOKEN"


@dataclass(frozen=True)
class FieldError:
    """One offending input named by the API: a dotted path (``spec.maxTurns``) and a reason."""

    field: str
    reason: str


class FlyswarmError(Exception):
    """Anything that kept a call from getting an answer it could use."""


class ServerUnreachable(FlyswarmError):
    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the flyswarm API at {url}: {reason} — is `make up` running?")


class Timeout(FlyswarmError):
    """The API did not answer in time, or a :meth:`~flyswarm.Client.wait` ran out of time."""


class ApiError(FlyswarmError):
    """The API answered with an error status and (usually) its error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: tuple[FieldError, ...] = (),
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(self.describe())

    def describe(self) -> str:
        text = f"{self.message} ({self.status} {self.code})"
        for problem in self.fields:
            text += f"\n  {problem.field}: {problem.reason}"
        return text


class Unauthorized(ApiError):
    def describe(self) -> str:
        return (
            f"the flyswarm API rejected the request ({self.status} {self.code}): {self.message}\n"
            f"  set {TOKEN_ENV} to one of the server's API_TOKENS"
        )


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class Invalid(ApiError):
    pass


class RateLimited(ApiError):
    pass


class ServerError(ApiError):
    pass


class Unavailable(ServerError):
    pass


_BY_STATUS: Mapping[int, type[ApiError]] = {
    400: Invalid,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: Invalid,
    422: Invalid,
    429: RateLimited,
    503: Unavailable,
}


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed error of an error answer, from the body ``{"error": {code, message, fields, requestId}}``."""
    status = response.status_code
    code, message, request_id = "error", response.reason_phrase or "error", None
    fields: tuple[FieldError, ...] = ()
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        code = str(detail.get("code") or code)
        message = str(detail.get("message") or message)
        fields = tuple(
            FieldError(field=str(f.get("field", "")), reason=str(f.get("reason", "")))
            for f in detail.get("fields") or []
            if isinstance(f, dict)
        )
        request_id = detail.get("requestId")
    elif isinstance(detail, str):
        message = detail
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    request_id = request_id or response.headers.get("x-request-id")
    return cls(status, code, message, fields, request_id, retry_after(response))


def describe_transport_error(exc: httpx.TransportError) -> str:
    """A short reason for a failed connection (never the request, so never the token)."""
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text or "errno 111" in text or "errno 61" in text or _refused(exc):
            return "connection refused"
        if "name or service not known" in text or "nodename nor servname" in text:
            return "unknown host"
        return f"cannot connect ({exc})" if str(exc) else "cannot connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _refused(exc: BaseException) -> bool:
    """Whether a connection refusal lies under ``exc`` (asyncio reports "All connection attempts failed")."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None:
            return False
        if isinstance(cause, ConnectionRefusedError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
