"""What travels over the wire for pools: the manifest a client sends, its parsing, the list body.

A pool body is always the full resource (there is no short form)::

    {"apiVersion": "flyswarm.dev/v1", "kind": "Pool", "metadata": {"name": "ci-fra", "labels": {}},
     "spec": {"template": {...}, "selector": {"matchLabels": {...}}, "size": 20, "mode": "suspended"}}

``metadata.name`` is required on ``POST /pools`` (pools are named things: sessions name the pool
they fit by its spec, people by its name) and must equal the path on ``PUT /pools/{name}`` when
given. As for sessions, the server-set parts (``status``, ``metadata.uid|generation|createdAt|
deletionTimestamp``) are accepted and ignored, so the output of ``GET`` can be applied back; anything
else unknown is a 422 naming the field by its path (``spec.template.guest.memoryMb``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import FieldProblem, field_problems, invalid
from api.models import API_VERSION
from api.pool_models import POOL_KIND, Pool, PoolSpec
from api.wire import ManifestMetadata


class PoolManifest(BaseModel):
    """The full Pool resource as a client sends it (``kubectl apply`` style)."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["flyswarm.dev/v1"] = API_VERSION
    kind: Literal["Pool"] = POOL_KIND
    metadata: ManifestMetadata = Field(default_factory=ManifestMetadata)
    spec: PoolSpec
    status: Any = Field(default=None, description="Controller-owned; ignored on input.")


class PoolList(BaseModel):
    items: list[Pool]
    cursor: str | None


@dataclass(frozen=True)
class ParsedPool:
    name: str | None
    spec: PoolSpec
    labels: dict[str, str]


def parse_pool_body(data: dict[str, Any]) -> ParsedPool:
    """A pool manifest, validated; every problem is named by its path in ``data``."""
    try:
        manifest = PoolManifest.model_validate(data)
    except ValidationError as exc:
        raise invalid(field_problems(exc)) from None
    return ParsedPool(name=manifest.metadata.name, spec=manifest.spec, labels=manifest.metadata.labels)


def require_name(parsed: ParsedPool, path_name: str | None = None) -> str:
    """The pool's name: the body's (POST, where it is required) or the path's (PUT, which it must equal)."""
    if path_name is None:
        if parsed.name is None:
            raise invalid([FieldProblem("metadata.name", "required (a pool is named)")])
        return parsed.name
    if parsed.name is not None and parsed.name != path_name:
        reason = f"must equal the name in the path ({path_name}) or be omitted"
        raise invalid([FieldProblem("metadata.name", reason)])
    return path_name


def pool_view(pool: Pool) -> dict[str, Any]:
    return pool.model_dump(mode="json")


def pool_differences(existing: Pool, spec: PoolSpec, labels: dict[str, str]) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    if existing.spec != spec:
        problems.append(FieldProblem("spec", "differs from the existing pool's spec"))
    if existing.metadata.labels != labels:
        problems.append(FieldProblem("metadata.labels", "differ from the existing pool's labels"))
    return problems


def pool_openapi_schemas() -> dict[str, Any]:
    """Schemas of the hand-parsed pool body (and what it refers to), for the OpenAPI document."""
    schema = PoolManifest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(schema.pop("$defs", {}))
    schemas["PoolManifest"] = schema
    return schemas
