"""The HTTP routes of the Pool resource (warm pools: :mod:`api.pool_models`), beside the sessions'.

Routes
    ``POST /pools`` create (201); the same name with the same spec and labels answers 200 with the
    stored pool, with another spec or labels 409 (``PUT`` changes it). ``PUT /pools/{name}``
    declarative apply: create (201) or update spec and labels (200), ``Flyswarm-Apply-Result:
    created|configured|unchanged``; ``generation`` moves only on a real spec change.
    ``GET /pools/{name}``, ``GET /pools`` (``labelSelector``/``selector``, ``limit``, ``cursor``),
    ``DELETE /pools/{name}`` (202: marks ``deletionTimestamp``; the controller drains the pool's
    machines and removes the record). A pool being deleted takes no change (409).

Same edge as the sessions' routes (:mod:`api.app`): bearer auth, the one error body, 503 when Redis is
away. Only the user's parts are written; ``status`` is the controller's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, cast

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from api.cursor import InvalidCursor
from api.errors import ApiError, bad_request
from api.models import validate_session_id
from api.pool_models import Pool
from api.pool_wire import (
    PoolList,
    parse_pool_body,
    pool_differences,
    pool_view,
    require_name,
)
from api.selector import SelectorError, parse_selector
from api.wire import APPLY_RESULT_HEADER, ERRORS_DOC, body_doc, read_json_object

if TYPE_CHECKING:
    from api.app import ApiContext

pool_router = APIRouter(tags=["pools"])


def _ctx(request: Request) -> ApiContext:
    return cast("ApiContext", request.app.state.ctx)


def _checked_name(value: str) -> str:
    """The ``{name}`` of the path, a DNS label like every resource name (400 naming ``name``)."""
    try:
        return validate_session_id(value)
    except ValueError as exc:
        raise bad_request("name", str(exc)) from None


@pool_router.post(
    "/pools",
    summary="Create a pool of warm agent machines; idempotent by name",
    status_code=201,
    responses={201: {"model": Pool}, 200: {"model": Pool}, **ERRORS_DOC},
    openapi_extra=body_doc("PoolManifest"),
)
async def create_pool(request: Request) -> Response:
    ctx = _ctx(request)
    parsed = parse_pool_body(await read_json_object(request, ctx.settings.max_body_bytes))
    name = require_name(parsed)
    outcome = await ctx.store.create_pool(ctx.store.new_pool(name, parsed.spec, parsed.labels))
    location = {"Location": f"/pools/{name}"}
    if outcome.result == "created":
        ctx.log.info("pool_created", pool=name, size=parsed.spec.size, mode=parsed.spec.mode)
        return JSONResponse(pool_view(outcome.pool), 201, location)
    if outcome.pool.deleted:
        raise ApiError("conflict", f"pool {name} exists and is being deleted")
    changed = pool_differences(outcome.pool, parsed.spec, parsed.labels)
    if changed:
        message = f"pool {name} already exists with another spec; PUT /pools/{name} changes it"
        raise ApiError("conflict", message, fields=changed)
    return JSONResponse(pool_view(outcome.pool), 200, location)


@pool_router.put(
    "/pools/{name}",
    summary="Apply a pool: create it or update its spec and labels (declarative)",
    responses={201: {"model": Pool}, 200: {"model": Pool}, **ERRORS_DOC},
    openapi_extra=body_doc("PoolManifest"),
)
async def apply_pool(request: Request, name: str) -> Response:
    ctx = _ctx(request)
    pool_name = _checked_name(name)
    parsed = parse_pool_body(await read_json_object(request, ctx.settings.max_body_bytes))
    require_name(parsed, pool_name)
    outcome = await ctx.store.apply_pool(ctx.store.new_pool(pool_name, parsed.spec, parsed.labels))
    if outcome.result == "deleting":
        raise ApiError("conflict", f"pool {pool_name} is being deleted")
    if outcome.result != "unchanged":
        ctx.log.info("pool_applied", pool=pool_name, result=outcome.result)
    status = 201 if outcome.result == "created" else 200
    return JSONResponse(pool_view(outcome.pool), status, {APPLY_RESULT_HEADER: outcome.result})


@pool_router.get(
    "/pools/{name}",
    summary="Get a pool (its status: ready, booting and claimed machines)",
    responses={200: {"model": Pool}, **ERRORS_DOC},
)
async def get_pool(request: Request, name: str) -> Response:
    pool = await _ctx(request).store.get_pool(_checked_name(name))
    if pool is None:
        raise ApiError("not_found", f"no pool {name}")
    return JSONResponse(pool_view(pool))


@pool_router.get(
    "/pools",
    summary="List pools by label selector, in name order, a page at a time",
    responses={200: {"model": PoolList}, **ERRORS_DOC},
)
async def list_pools(
    request: Request,
    labelSelector: Annotated[str | None, Query(description="e.g. team=ci,env in (a,b)")] = None,
    selector: Annotated[str | None, Query(description="Alias of labelSelector.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="The cursor of the previous page.")] = None,
) -> Response:
    if labelSelector is not None and selector is not None and labelSelector != selector:
        raise bad_request("selector", "give labelSelector or selector, not both")
    field = "labelSelector" if labelSelector is not None else "selector"
    try:
        parsed = parse_selector(labelSelector if labelSelector is not None else selector)
    except SelectorError as exc:
        raise bad_request(field, str(exc)) from None
    try:
        page = await _ctx(request).store.list_pools(selector=parsed, limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise bad_request("cursor", str(exc)) from None
    return JSONResponse({"items": [pool_view(p) for p in page.pools], "cursor": page.cursor})


@pool_router.delete(
    "/pools/{name}",
    summary="Delete a pool (the controller destroys its unclaimed machines, then removes the record)",
    status_code=202,
    responses={202: {"model": Pool}, **ERRORS_DOC},
)
async def delete_pool(request: Request, name: str) -> Response:
    ctx = _ctx(request)
    pool = await ctx.store.mark_pool_deleted(_checked_name(name))
    if pool is None:
        raise ApiError("not_found", f"no pool {name}")
    ctx.log.info("pool_deleted", pool=name)
    return JSONResponse(pool_view(pool), 202)
