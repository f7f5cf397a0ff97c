"""The HTTP routes of the Webhook resource and of delivery records (README "Webhooks").

Routes
    ``POST /webhooks`` create (201); the same name with the same spec and labels answers 200, with
    another 409 (``PUT`` changes it). Without ``spec.secret`` the server generates one and shows it
    once, in ``status.secret`` of the 201 answer. ``PUT /webhooks/{name}``: create (201) or update
    (200), ``Flyswarm-Apply-Result``; a PUT without a secret keeps the stored one.
    ``GET /webhooks/{name}``, ``GET /webhooks`` (``limit``, ``cursor``), ``DELETE /webhooks/{name}``
    (200: removed at once; its pending deliveries are dropped).
    ``GET /webhooks/{name}/deliveries`` and ``GET /sessions/{id}/deliveries`` (the session's
    ``spec.notify`` targets): the newest delivery records, attempts and last status.

A secret is never in an answer (``status.secretSet`` says whether there is one) but that one 201.
Admission resolves each URL's host and refuses private, loopback and link-local targets (422 on the
field) unless ``FLYSWARM_WEBHOOK_ALLOW_PRIVATE`` is set (:mod:`api.webhook_targets`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, cast
from urllib.parse import urlsplit

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from api.cursor import InvalidCursor
from api.errors import ApiError, FieldProblem, bad_request, field_problems, invalid
from api.models import API_VERSION, SessionSpec, validate_session_id
from api.notify_models import MISSING_SECRET, notify_target, webhook_target
from api.webhook_models import (
    WEBHOOK_KIND,
    DeliveryView,
    Webhook,
    WebhookSpec,
    WebhookStatus,
    generate_secret,
)
from api.webhook_targets import TargetRefused, resolve
from api.wire import APPLY_RESULT_HEADER, ERRORS_DOC, ManifestMetadata, body_doc, read_json_object

if TYPE_CHECKING:
    from api.app import ApiContext

webhook_router = APIRouter(tags=["webhooks"])


class WebhookManifest(BaseModel):
    """The full Webhook resource as a client sends it."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["flyswarm.dev/v1"] = API_VERSION
    kind: Literal["Webhook"] = WEBHOOK_KIND
    metadata: ManifestMetadata = Field(default_factory=ManifestMetadata)
    spec: WebhookSpec
    status: Any = Field(default=None, description="Server-set; ignored on input.")


class WebhookList(BaseModel):
    items: list[Webhook]
    cursor: str | None


class DeliveryList(BaseModel):
    items: list[DeliveryView]


def _ctx(request: Request) -> ApiContext:
    return cast("ApiContext", request.app.state.ctx)


def _checked_name(value: str) -> str:
    try:
        return validate_session_id(value)
    except ValueError as exc:
        raise bad_request("name", str(exc)) from None


async def admit_targets(urls: list[tuple[str, str]], allow_private: bool) -> None:
    """Refuse (422 on the field) any ``(field, url)`` whose host is or resolves to a refused address.

    A name that does not resolve now is admitted: it is checked again at every delivery.
    """
    problems: list[FieldProblem] = []
    for field, url in urls:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            await resolve(parts.hostname or "", port, allow_private=allow_private)
        except TargetRefused as exc:
            problems.append(FieldProblem(field, f"{exc} (FLYSWARM_WEBHOOK_ALLOW_PRIVATE allows it)"))
        except (OSError, TimeoutError):
            continue
    if problems:
        raise invalid(problems)


async def admit_notify(spec: SessionSpec, allow_private: bool) -> None:
    """The admission check of a session's ``spec.notify`` URLs."""
    unsigned = [
        FieldProblem(f"spec.notify[{i}].secret", MISSING_SECRET)
        for i, target in enumerate(spec.notify)
        if not target.signable
    ]
    if unsigned:
        raise invalid(unsigned)
    urls = [(f"spec.notify[{i}].url", target.url) for i, target in enumerate(spec.notify)]
    await admit_targets(urls, allow_private)


async def _parse(request: Request, path_name: str | None) -> tuple[str, WebhookSpec, dict[str, str]]:
    ctx = _ctx(request)
    data = await read_json_object(request, ctx.settings.max_body_bytes)
    try:
        manifest = WebhookManifest.model_validate(data)
    except ValidationError as exc:
        raise invalid(field_problems(exc)) from None
    name = manifest.metadata.name
    if path_name is not None and name is not None and name != path_name:
        raise invalid([FieldProblem("metadata.name", f"must equal the name in the path ({path_name})")])
    name = name or path_name
    if name is None:
        raise invalid([FieldProblem("metadata.name", "a webhook needs a name")])
    await admit_targets([("spec.url", manifest.spec.url)], ctx.settings.webhook_allow_private)
    return name, manifest.spec, manifest.metadata.labels


def _view(hook: Webhook, shown_secret: str | None = None) -> dict[str, Any]:
    if shown_secret is not None:
        hook = hook.model_copy(update={"status": WebhookStatus(secretSet=True, secret=shown_secret)})
    return hook.model_dump(mode="json", exclude={"spec": {"secret"}}, exclude_none=False)


@webhook_router.post(
    "/webhooks",
    summary="Create a webhook (label selector, events, signing secret); idempotent by name",
    status_code=201,
    responses={201: {"model": Webhook}, 200: {"model": Webhook}, **ERRORS_DOC},
    openapi_extra=body_doc("WebhookManifest"),
)
async def create_webhook(request: Request) -> Response:
    ctx = _ctx(request)
    name, spec, labels = await _parse(request, None)
    generated = generate_secret()
    outcome = await ctx.store.put_webhook(name, spec, labels, mode="create", secret_if_new=generated)
    location = {"Location": f"/webhooks/{name}"}
    if outcome.result == "created":
        ctx.log.info("webhook_created", webhook=name, events=len(spec.events))
        shown = generated if spec.secret is None else None
        return JSONResponse(_view(outcome.webhook, shown), 201, location)
    stored = outcome.webhook
    changed = [
        FieldProblem(path, "differs from the stored webhook")
        for path, differs in (
            ("spec", stored.spec.model_dump(exclude={"secret"}) != spec.model_dump(exclude={"secret"})),
            ("metadata.labels", stored.metadata.labels != labels),
        )
        if differs
    ]
    if changed:
        message = f"webhook {name} already exists with another spec; PUT /webhooks/{name} changes it"
        raise ApiError("conflict", message, fields=changed)
    return JSONResponse(_view(stored), 200, location)


@webhook_router.put(
    "/webhooks/{name}",
    summary="Apply a webhook: create it or update it (a PUT without a secret keeps the stored one)",
    responses={201: {"model": Webhook}, 200: {"model": Webhook}, **ERRORS_DOC},
    openapi_extra=body_doc("WebhookManifest"),
)
async def apply_webhook(request: Request, name: str) -> Response:
    ctx = _ctx(request)
    hook_name, spec, labels = await _parse(request, _checked_name(name))
    generated = generate_secret()
    outcome = await ctx.store.put_webhook(hook_name, spec, labels, mode="apply", secret_if_new=generated)
    shown = generated if outcome.result == "created" and spec.secret is None else None
    if outcome.result != "unchanged":
        ctx.log.info("webhook_applied", webhook=hook_name, result=outcome.result)
    status = 201 if outcome.result == "created" else 200
    return JSONResponse(_view(outcome.webhook, shown), status, {APPLY_RESULT_HEADER: outcome.result})


@webhook_router.get(
    "/webhooks/{name}",
    summary="Get a webhook (never its secret)",
    responses={200: {"model": Webhook}, **ERRORS_DOC},
)
async def get_webhook(request: Request, name: str) -> Response:
    hook = await _ctx(request).store.get_webhook(_checked_name(name))
    if hook is None:
        raise ApiError("not_found", f"no webhook {name}")
    return JSONResponse(_view(hook))


@webhook_router.get(
    "/webhooks",
    summary="List webhooks in name order, a page at a time",
    responses={200: {"model": WebhookList}, **ERRORS_DOC},
)
async def list_webhooks(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="The cursor of the previous page.")] = None,
) -> Response:
    try:
        page = await _ctx(request).store.list_webhooks(limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise bad_request("cursor", str(exc)) from None
    return JSONResponse({"items": [_view(h) for h in page.webhooks], "cursor": page.cursor})


@webhook_router.delete(
    "/webhooks/{name}",
    summary="Delete a webhook (its pending deliveries are dropped)",
    responses={200: {"model": Webhook}, **ERRORS_DOC},
)
async def delete_webhook(request: Request, name: str) -> Response:
    ctx = _ctx(request)
    hook = await ctx.store.delete_webhook(_checked_name(name))
    if hook is None:
        raise ApiError("not_found", f"no webhook {name}")
    ctx.log.info("webhook_deleted", webhook=name)
    return JSONResponse(_view(hook))


@webhook_router.get(
    "/webhooks/{name}/deliveries",
    summary="The newest deliveries of a webhook: event, session, state, attempts, last status",
    responses={200: {"model": DeliveryList}, **ERRORS_DOC},
)
async def webhook_deliveries(
    request: Request, name: str, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> Response:
    store = _ctx(request).store
    hook_name = _checked_name(name)
    if await store.get_webhook(hook_name) is None:
        raise ApiError("not_found", f"no webhook {name}")
    found = await store.deliveries(webhook_target(hook_name), limit=limit)
    return JSONResponse({"items": [d.model_dump(mode="json") for d in found]})


@webhook_router.get(
    "/sessions/{id}/deliveries",
    tags=["sessions"],
    summary="The newest deliveries to a session's spec.notify targets",
    responses={200: {"model": DeliveryList}, **ERRORS_DOC},
)
async def session_deliveries(
    request: Request, id: str, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> Response:
    store = _ctx(request).store
    try:
        session_id = validate_session_id(id)
    except ValueError as exc:
        raise bad_request("id", str(exc)) from None
    session = await store.get(session_id)
    if session is None:
        raise ApiError("not_found", f"no session {id}")
    items: list[DeliveryView] = []
    for index in range(len(session.spec.notify)):
        items += await store.deliveries(notify_target(session_id, index), limit=limit)
    items.sort(key=lambda d: d.id, reverse=True)
    return JSONResponse({"items": [d.model_dump(mode="json") for d in items[:limit]]})
