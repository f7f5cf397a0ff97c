"""Every API call as a value: method, path, query, body, whether it may be retried, how to read the answer.

:class:`~flyswarm.Client` and :class:`~flyswarm.AsyncClient` differ only in how they send a
:class:`Call` (blocking or awaited), so each API operation is written once, here, and both clients
are thin. Resource paths are built by one function, :func:`path`: the place where a namespace
segment goes once the API has namespaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from flyswarm.errors import FlyswarmError
from flyswarm.models import DeliveryView, MessageAccepted, Pool, SessionView, Webhook

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
R = TypeVar("R", SessionView, Pool, Webhook)
Resource = Mapping[str, Any] | BaseModel
ApplyAction = Literal["created", "configured", "unchanged"]
APPLY_RESULT_HEADER = "Flyswarm-Apply-Result"
SESSION_KIND, POOL_KIND, WEBHOOK_KIND = "Session", "Pool", "Webhook"
HEALTH_PATH, READY_PATH = "/health", "/readyz"


@dataclass(frozen=True)
class Call(Generic[T_co]):
    method: str
    path: str
    decode: Callable[[httpx.Response], T_co]
    params: Mapping[str, str | int] = field(default_factory=dict)
    body: Any = None
    idempotent: bool = True
    ok: tuple[int, ...] = (200, 201, 202, 204)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list and the cursor of the next (None on the last page)."""

    items: list[T]
    cursor: str | None


@dataclass(frozen=True)
class Applied(Generic[R]):
    """What a create-or-update did (``created``, ``configured`` or ``unchanged``) and the stored resource."""

    action: ApplyAction
    resource: R


@dataclass(frozen=True)
class ArtifactList:
    """A session's artifacts (``name``, ``size``, ``sha256``, ...), the files it skipped and why."""

    items: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    total_bytes: int


def path(collection: Literal["sessions", "pools", "webhooks"], name: str | None = None, *sub: str) -> str:
    """Every resource path: ``/sessions``, ``/sessions/{id}/events``, ``/pools/{name}``, ``/webhooks``..."""
    parts = [collection] + ([quote(name, safe="")] if name is not None else []) + list(sub)
    return "/" + "/".join(parts)


# -- reading answers --------------------------------------------------------------------------------


def json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise FlyswarmError(f"the API answered {response.status_code} with a body that is not JSON") from None
    if not isinstance(body, dict):
        raise FlyswarmError(f"the API answered {response.status_code} with an unexpected body")
    return body


def _model(cls: type[T], data: Any) -> T:
    try:
        return cls.model_validate(data)  # type: ignore[attr-defined,no-any-return]
    except ValidationError as exc:
        raise FlyswarmError(f"the API answered with a {cls.__name__} this SDK cannot read: {exc}") from None


def _session(response: httpx.Response) -> SessionView:
    return _model(SessionView, json_object(response))


def _pool(response: httpx.Response) -> Pool:
    return _model(Pool, json_object(response))


def _page(cls: type[T]) -> Callable[[httpx.Response], Page[T]]:
    def decode(response: httpx.Response) -> Page[T]:
        body = json_object(response)
        items = [_model(cls, item) for item in body.get("items") or []]
        return Page(items, body.get("cursor") or None)

    return decode


def _applied(cls: type[R]) -> Callable[[httpx.Response], Applied[R]]:
    def decode(response: httpx.Response) -> Applied[R]:
        action = response.headers.get(APPLY_RESULT_HEADER, "").strip().lower()
        if action not in ("created", "configured", "unchanged"):
            action = "created" if response.status_code == 201 else "configured"
        return Applied(action, _model(cls, json_object(response)))

    return decode


def _created(response: httpx.Response) -> Applied[SessionView]:
    return Applied("created" if response.status_code == 201 else "unchanged", _session(response))


# -- the calls --------------------------------------------------------------------------------------


def as_body(resource: Resource) -> dict[str, Any]:
    """A resource as JSON: a mapping as given, a model without its unset (None) fields."""
    if isinstance(resource, BaseModel):
        return resource.model_dump(mode="json", exclude_none=True)
    return dict(resource)


def name_of(body: Mapping[str, Any]) -> str | None:
    metadata = body.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return str(name or body.get("session_id") or "") or None


def health() -> Call[dict[str, Any]]:
    return Call("GET", HEALTH_PATH, json_object)


def ready() -> Call[bool]:
    return Call("GET", READY_PATH, lambda response: True)


def get_session(session_id: str) -> Call[SessionView]:
    return Call("GET", path("sessions", session_id), _session)


def list_sessions(
    selector: str | None, phase: str | None, limit: int | None, cursor: str | None
) -> Call[Page[SessionView]]:
    query = {"labelSelector": selector, "phase": phase, "limit": limit, "cursor": cursor}
    params = {k: v for k, v in query.items() if v is not None}
    return Call("GET", path("sessions"), _page(SessionView), params=params)


def create_session(resource: Resource) -> Call[Applied[SessionView]]:
    """``POST /sessions``: 201 created, 200 for the same id with the same spec (retryable with an id)."""
    body = as_body(resource)
    return Call("POST", path("sessions"), _created, body=body, idempotent=name_of(body) is not None)


def put_session(resource: Resource) -> Call[Applied[SessionView]]:
    body = as_body(resource)
    name = name_of(body)
    if name is None:
        raise ValueError("a PUT needs metadata.name")
    return Call("PUT", path("sessions", name), _applied(SessionView), body=body)


def delete_session(session_id: str) -> Call[SessionView | None]:
    def decode(response: httpx.Response) -> SessionView | None:
        return _session(response) if response.content else None

    return Call("DELETE", path("sessions", session_id), decode)


def send_message(session_id: str, text: str) -> Call[MessageAccepted]:
    def decode(response: httpx.Response) -> MessageAccepted:
        return _model(MessageAccepted, json_object(response))

    body = {"text": text}
    return Call("POST", path("sessions", session_id, "messages"), decode, body=body, idempotent=False)


def get_pool(name: str) -> Call[Pool]:
    return Call("GET", path("pools", name), _pool)


def list_pools(selector: str | None, limit: int | None, cursor: str | None) -> Call[Page[Pool]]:
    query = {"labelSelector": selector, "limit": limit, "cursor": cursor}
    params = {k: v for k, v in query.items() if v is not None}
    return Call("GET", path("pools"), _page(Pool), params=params)


def put_pool(resource: Resource) -> Call[Applied[Pool]]:
    body = as_body(resource)
    name = name_of(body)
    if name is None:
        raise ValueError("a Pool needs metadata.name")
    return Call("PUT", path("pools", name), _applied(Pool), body=body)


def delete_pool(name: str) -> Call[Pool]:
    return Call("DELETE", path("pools", name), _pool)


def get_webhook(name: str) -> Call[Webhook]:
    return Call("GET", path("webhooks", name), lambda response: _model(Webhook, json_object(response)))


def list_webhooks(limit: int | None, cursor: str | None) -> Call[Page[Webhook]]:
    query = {"limit": limit, "cursor": cursor}
    params = {k: v for k, v in query.items() if v is not None}
    return Call("GET", path("webhooks"), _page(Webhook), params=params)


def put_webhook(resource: Resource) -> Call[Applied[Webhook]]:
    """``PUT /webhooks/{name}``; a webhook created without a secret comes back with the generated one
    in ``status.secret`` (that answer only: secrets are write-only)."""
    body = as_body(resource)
    name = name_of(body)
    if name is None:
        raise ValueError("a Webhook needs metadata.name")
    return Call("PUT", path("webhooks", name), _applied(Webhook), body=body)


def delete_webhook(name: str) -> Call[Webhook]:
    return Call("DELETE", path("webhooks", name), lambda response: _model(Webhook, json_object(response)))


def _deliveries(response: httpx.Response) -> list[DeliveryView]:
    return [_model(DeliveryView, item) for item in json_object(response).get("items") or []]


def webhook_deliveries(name: str, limit: int) -> Call[list[DeliveryView]]:
    """The newest deliveries of a Webhook: event, session, state, attempts, last status and error."""
    return Call("GET", path("webhooks", name, "deliveries"), _deliveries, params={"limit": limit})


def session_deliveries(session_id: str, limit: int) -> Call[list[DeliveryView]]:
    """The newest deliveries to a session's ``spec.notify`` targets."""
    return Call("GET", path("sessions", session_id, "deliveries"), _deliveries, params={"limit": limit})


def list_artifacts(session_id: str) -> Call[ArtifactList]:
    def decode(response: httpx.Response) -> ArtifactList:
        body = json_object(response)
        items = [i for i in body.get("items") or [] if isinstance(i, dict)]
        skipped = [s for s in body.get("skipped") or [] if isinstance(s, dict)]
        return ArtifactList(items, skipped, int(body.get("totalBytes") or 0))

    return Call("GET", path("sessions", session_id, "artifacts"), decode)


def get_artifact(session_id: str, name: str) -> Call[bytes]:
    """One artifact's bytes, checked against the sha256 the server sends."""

    def decode(response: httpx.Response) -> bytes:
        expected = response.headers.get("x-flyswarm-sha256")
        if expected and hashlib.sha256(response.content).hexdigest() != expected:
            raise FlyswarmError(f"artifact {name} arrived damaged (sha256 mismatch); try again")
        return response.content

    return Call("GET", path("sessions", session_id, "artifacts", quote(name, safe="/")), decode)


def get_live_file(session_id: str, file_path: str) -> Call[bytes | dict[str, Any]]:
    """A running session's file (bytes) or directory listing (the JSON body)."""

    def decode(response: httpx.Response) -> bytes | dict[str, Any]:
        if response.headers.get("x-flyswarm-file-type") == "directory":
            return json_object(response)
        return response.content

    return Call("GET", path("sessions", session_id, "files"), decode, params={"path": file_path})


def apply(resource: Resource) -> Call[Applied[SessionView] | Applied[Pool] | Applied[Webhook]]:
    """Create or update, as ``kubectl apply``: dispatch on ``kind``; a session without a name is POSTed."""
    body = as_body(resource)
    kind = body.get("kind") or SESSION_KIND
    if kind == POOL_KIND:
        return put_pool(body)
    if kind == WEBHOOK_KIND:
        return put_webhook(body)
    if kind != SESSION_KIND:
        raise ValueError(
            f"unknown kind {kind!r} (flyswarm knows: {SESSION_KIND}, {POOL_KIND}, {WEBHOOK_KIND})"
        )
    if name_of(body) is None:
        return create_session(body)
    return put_session(body)
