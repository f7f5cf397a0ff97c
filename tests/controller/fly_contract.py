"""Checks real HTTP requests (and responses) against the official Fly Machines OpenAPI document.

Used by the client tests: a :class:`RecordingTransport` wraps the emulator's transport and keeps
every request the client actually sent; :class:`OpenAPIContract` says what about each one the
spec does not allow (unknown path or method, undeclared query parameter, a value of the wrong
type, a missing required header, a body that does not validate against the requestBody schema).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openapi_schema_validator import OAS30Validator

# Forms the spec omits but Fly's own clients send; our client sends none of them, so they stay
# violations here (kept as documentation of what we deliberately do not send).
KNOWN_SPEC_OMISSIONS = {
    ("DELETE", "/v1/apps/{app_name}/machines/{machine_id}", "kill"),
    ("POST", "/v1/apps/{app_name}/machines/{machine_id}/lease", "ttl"),
    ("POST", "/v1/apps/{app_name}/machines/{machine_id}/restart", "force_stop"),
}
# Query parameters the spec's description says may repeat ("supports repeated or comma-separated").
REPEATABLE = {("GET", "/v1/apps/{app_name}/machines/{machine_id}/wait", "state")}


@dataclass
class Exchange:
    request: httpx.Request
    body: bytes
    response_status: int | None = None
    response_body: bytes = b""
    response_headers: dict[str, str] = field(default_factory=dict)


class RecordingTransport(httpx.AsyncBaseTransport):
    """Passes requests to ``inner`` and records each one with its response."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        exchange = Exchange(request=request, body=body)
        self.exchanges.append(exchange)
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        exchange.response_status = response.status_code
        exchange.response_body = content
        exchange.response_headers = dict(response.headers)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            content=content,
            request=request,
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(frozen=True)
class _Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    operation: dict[str, Any]


class OpenAPIContract:
    def __init__(self, path: Path) -> None:
        self.doc: dict[str, Any] = json.loads(path.read_text())
        self.routes: list[_Route] = []
        for template, item in self.doc["paths"].items():
            regex = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            for method, operation in item.items():
                if method in ("get", "post", "put", "patch", "delete"):
                    self.routes.append(_Route(method.upper(), template, re.compile(regex), operation))

    def route(self, method: str, path: str) -> _Route | None:
        # Literal segments beat templated ones (e.g. .../metadata vs .../{machine_id}).
        matches = [r for r in self.routes if r.method == method and r.pattern.match(path)]
        matches.sort(key=lambda r: r.template.count("{"))
        return matches[0] if matches else None

    def _validator(self, schema: dict[str, Any]) -> OAS30Validator:
        # Carry the components along so "#/components/..." refs resolve from any schema.
        return OAS30Validator({**schema, "components": self.doc["components"]})

    def schema_errors(self, schema: dict[str, Any], instance: Any) -> list[str]:
        return [
            f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in self._validator(schema).iter_errors(instance)
        ]

    def request_problems(self, request: httpx.Request, body: bytes) -> list[str]:
        method, path = request.method, request.url.path
        route = self.route(method, path)
        if route is None:
            return [f"{method} {path}: no such operation in the spec"]
        where = f"{method} {route.template}"
        problems: list[str] = []
        params = route.operation.get("parameters", [])
        query_params = {p["name"]: p for p in params if p.get("in") == "query"}
        seen: dict[str, int] = {}
        for name, value in request.url.params.multi_items():
            declared = query_params.get(name)
            if declared is None and name.startswith("metadata."):
                declared = query_params.get("metadata.{key}")
            if declared is None:
                problems.append(f"{where}: undeclared query parameter {name!r}")
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1 and (method, route.template, name) not in REPEATABLE:
                problems.append(f"{where}: query parameter {name!r} repeated")
            problems += [f"{where}: ?{name}={value}: {e}" for e in self._param_errors(declared, value)]
        for param in params:
            if param.get("in") == "header" and param.get("required") and param["name"] not in request.headers:
                problems.append(f"{where}: missing required header {param['name']}")
            if (
                param.get("in") == "query"
                and param.get("required")
                and param["name"] not in request.url.params
            ):
                problems.append(f"{where}: missing required query parameter {param['name']}")
        request_body = route.operation.get("requestBody")
        if body:
            if request_body is None:
                problems.append(f"{where}: sends a body the operation does not take")
            else:
                if "json" not in request.headers.get("content-type", ""):
                    problems.append(f"{where}: body is not JSON")
                schema = request_body["content"]["application/json"]["schema"]
                problems += [f"{where} body: {e}" for e in self.schema_errors(schema, json.loads(body))]
        elif request_body is not None and request_body.get("required"):
            problems.append(f"{where}: required body missing")
        return problems

    def _param_errors(self, param: dict[str, Any], raw: str) -> list[str]:
        schema = param.get("schema", {})
        value: Any = raw
        if schema.get("type") == "boolean":
            if raw not in ("true", "false"):
                return [f"not a boolean: {raw!r}"]
            value = raw == "true"
        elif schema.get("type") == "integer":
            if not re.fullmatch(r"-?\d+", raw):
                return [f"not an integer: {raw!r}"]
            value = int(raw)
        return self.schema_errors(schema, value)

    def response_problems(self, exchange: Exchange) -> list[str]:
        """Problems with a 2xx response's JSON body against the declared response schema."""
        request = exchange.request
        route = self.route(request.method, request.url.path)
        status = exchange.response_status
        if route is None or status is None or not 200 <= status < 300:
            return []
        declared = route.operation.get("responses", {}).get(str(status))
        where = f"{request.method} {route.template} -> {status}"
        if declared is None:
            return [f"{where}: status not declared"]
        schema = declared.get("content", {}).get("application/json", {}).get("schema")
        if schema is None or not exchange.response_body:
            return []
        return [f"{where}: {e}" for e in self.schema_errors(schema, json.loads(exchange.response_body))]
