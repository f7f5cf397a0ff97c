"""Errors the gateway answers itself, shaped as the Messages API shapes them.

``{"type": "error", "error": {"type": "authentication_error", "message": "..."}}``: the CLI shows
the message and, by the status, retries (429, 5xx) or gives up (401, 402, 403, 404, 413).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class GatewayError(Exception):
    """A refusal: HTTP status, the metric's reason label and the message for the agent."""

    status: int
    reason: str
    message: str

    def body(self) -> bytes:
        error = {"type": ERROR_TYPES.get(self.status, "api_error"), "message": self.message}
        return json.dumps({"type": "error", "error": error}).encode()
