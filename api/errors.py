"""The one error body every 4xx and 5xx of the API carries.

::

    {"error": {"code": "invalid",
               "message": "the request has invalid fields",
               "fields": [{"field": "spec.prompt", "reason": "longer than 100000 characters"}],
               "requestId": "9f1c2e4a7b3d5e60"}}

``code`` is a fixed machine-readable word (the table below), ``message`` a human sentence, ``fields``
names every offending input by its path in what the client sent (``spec.maxTurns`` in a manifest,
``prompt`` in the short form, ``labelSelector`` or ``cursor`` for query parameters, ``id`` for the
path, ``Last-Event-ID`` for a header, ``body`` for the body as a whole) and ``requestId`` matches the
``X-Request-ID`` response header and the server's log line, so a report can be traced.

=====================  ======  ===========================================================
code                   status  when
=====================  ======  ===========================================================
malformed_json         400     the body is not JSON (or not a JSON object)
bad_request            400     a query parameter, path parameter or header is invalid
unauthorized           401     missing or wrong bearer token
not_found              404     no such session (or no such route)
method_not_allowed     405     the route exists, the method does not
conflict               409     same id with another spec, session finished/being deleted,
                               message to a task session
payload_too_large      413     the body is larger than FLYSWARM_MAX_BODY_BYTES
invalid                422     the body parsed but a field is wrong (unknown, out of bounds, ...)
internal               500     a bug; the details are in the server log under requestId
unavailable            503     Redis is unreachable, or a limit of this process was reached
                               (Redis connections, followers); retry after Retry-After
agent_timeout          504     the running agent did not answer a live-file request in time
slow_client            503     only in a stream (SSE ``event: error``, WebSocket frame before
                               close 1013): the client fell behind; resume from its last id
=====================  ======  ===========================================================

Never a stack trace or an exception text reaches a client: unexpected errors become ``internal``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from starlette.responses import JSONResponse

from api.models import field_path

CODE_STATUS: Mapping[str, int] = {
    "malformed_json": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "payload_too_large": 413,
    "invalid": 422,
    "internal": 500,
    "unavailable": 503,
    "slow_client": 503,
    "agent_timeout": 504,
}

# "prompt: a task session needs a non-empty prompt" raised by a model validator names its field.
_NAMED_REASON_RE = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_.]*): (?P<reason>.+)$", re.S)


@dataclass(frozen=True)
class FieldProblem:
    """One offending input: where it is (a dotted path) and what is wrong with it."""

    field: str
    reason: str


class ApiError(Exception):
    """An error the API answers with; raised anywhere in a request, rendered by one handler."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        fields: Sequence[FieldProblem] = (),
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = tuple(fields)
        self.status = status or CODE_STATUS[code]
        self.headers = dict(headers or {})


def bad_request(field: str, reason: str) -> ApiError:
    """400 naming one query parameter, path parameter or header."""
    return ApiError(
        "bad_request", f"invalid {field}: {reason}", fields=[FieldProblem(field=field, reason=reason)]
    )


def invalid(problems: Sequence[FieldProblem], message: str = "the request has invalid fields") -> ApiError:
    """422 naming every offending body field."""
    return ApiError("invalid", message, fields=problems)


# -- the documented wire shape (for the OpenAPI document) -----------------------------------------


class FieldProblemBody(BaseModel):
    field: str = Field(description="Dotted path of the input in the request, e.g. spec.prompt or cursor.")
    reason: str


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable: " + ", ".join(CODE_STATUS))
    message: str
    fields: list[FieldProblemBody] = Field(default_factory=list)
    requestId: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_payload(
    code: str, message: str, fields: Iterable[FieldProblem] = (), request_id: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "fields": [{"field": f.field, "reason": f.reason} for f in fields],
            "requestId": request_id,
        }
    }


def error_response(
    error: ApiError, request_id: str | None = None, extra_headers: Mapping[str, str] | None = None
) -> JSONResponse:
    headers = {**error.headers, **(extra_headers or {})}
    return JSONResponse(
        error_payload(error.code, error.message, error.fields, request_id),
        status_code=error.status,
        headers=headers,
    )


# -- pydantic errors -> field problems ------------------------------------------------------------


def _reason(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    message = str(error.get("msg", "invalid"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return message


def field_problems(exc: ValidationError, prefix: str = "") -> list[FieldProblem]:
    """Name each pydantic error by its dotted path (under ``prefix``), with a short reason."""
    problems: list[FieldProblem] = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [p for p in error.get("loc", ()) if isinstance(p, (int, str))]
        reason = _reason(error)
        # A model-level validator that names its field ("prompt: ...") is reported on that field.
        if (named := _NAMED_REASON_RE.match(reason)) and error.get("type") == "value_error":
            loc = [*loc, *named["field"].split(".")]
            reason = named["reason"]
        problems.append(FieldProblem(field=field_path(loc, prefix) or "body", reason=reason))
    return problems
