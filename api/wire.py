"""What travels over the wire: request bodies, their parsing, and the session view the API returns.

Request bodies
    ``POST /sessions`` and ``PUT /sessions/{id}`` take either the full resource (a body with any of
    ``apiVersion``, ``kind``, ``metadata``, ``spec``) or the seed orchestrator's short form
    ``{"prompt": "...", "session_id": "optional"}``, which may also carry ``labels`` and any spec
    field by its manifest name (``mode``, ``maxTurns``, ``model``, ...). In a manifest the server-set
    parts (``status``, ``agent``, ``usage``, ``metadata.uid|generation|createdAt|deletionTimestamp`` and the
    convenience fields ``machine_id``, ``created_at``, ``state``) are accepted and ignored, so the
    output of ``GET`` can be applied back; ``session_id`` is a synonym of ``metadata.name``.
    Anything else unknown is a 422 naming the field.

    Bodies are read by hand, not by FastAPI: the size limit is enforced while reading, any content
    type is parsed as JSON (``curl -d`` sends form-urlencoded by default), and errors name the field
    as the client spelled it (``spec.prompt`` in a manifest, ``prompt`` in the short form).

Responses
    A session is the resource (``status.phase`` is the *effective* phase: a task whose agent reported
    its end is never shown running) plus the seed's convenience fields ``session_id``, ``machine_id``
    (``status.machineId``, null until placed), ``created_at`` and ``state`` (the seed's status
    vocabulary: null while not finished, ``"done"`` or ``"error"``; the seed called it ``status``,
    which here is the resource's status object).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request

from api.errors import ApiError, ErrorBody, FieldProblem, bad_request, field_problems, invalid
from api.models import (
    API_VERSION,
    KIND,
    Phase,
    Session,
    SessionSpec,
    SessionView,
    validate_labels,
    validate_session_id,
)
from api.store_base import canonical_labels, canonical_spec

APPLY_RESULT_HEADER = "Flyswarm-Apply-Result"
_MANIFEST_KEYS = frozenset({"apiVersion", "kind", "metadata", "spec"})

# -- request bodies -------------------------------------------------------------------------------


class ManifestMetadata(BaseModel):
    """``metadata`` as a client may send it: name and labels; server-set fields are ignored."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    uid: Any = Field(default=None, description="Server-set; ignored on input.")
    generation: Any = Field(default=None, description="Server-set; ignored on input.")
    createdAt: Any = Field(default=None, description="Server-set; ignored on input.")
    deletionTimestamp: Any = Field(default=None, description="Server-set; ignored on input.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else validate_session_id(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_labels(value)


class SessionManifest(BaseModel):
    """The full resource as a client sends it (``kubectl apply`` style)."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["flyswarm.dev/v1"] = API_VERSION
    kind: Literal["Session"] = KIND
    metadata: ManifestMetadata = Field(default_factory=ManifestMetadata)
    spec: SessionSpec
    status: Any = Field(default=None, description="Controller-owned; ignored on input.")
    agent: Any = Field(default=None, description="Agent-owned; ignored on input.")
    usage: Any = Field(default=None, description="Gateway-owned (metered model usage); ignored on input.")
    session_id: str | None = Field(default=None, description="Same as metadata.name (seed spelling).")
    machine_id: Any = Field(default=None, description="Output only; ignored on input.")
    created_at: Any = Field(default=None, description="Output only; ignored on input.")
    state: Any = Field(default=None, description="Output only; ignored on input.")


class ShortForm(BaseModel):
    """The seed orchestrator's body, for the OpenAPI document (parsed by hand, see module docs)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(description="The task (required for task sessions).")
    session_id: str | None = Field(default=None, description="The id; generated when omitted.")
    labels: dict[str, str] = Field(default_factory=dict)


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="The user's next chat turn.")


class SessionList(BaseModel):
    items: list[SessionView]
    cursor: str | None


@dataclass(frozen=True)
class ParsedSession:
    name: str | None
    spec: SessionSpec
    labels: dict[str, str]
    form: Literal["manifest", "short"]


# -- helpers --------------------------------------------------------------------------------------


def _seed_state(phase: Phase) -> Literal["done", "error"] | None:
    if phase is Phase.SUCCEEDED:
        return "done"
    if phase is Phase.FAILED:
        return "error"
    return None


def session_view(session: Session) -> dict[str, Any]:
    data = session.model_dump(mode="json")
    phase = session.effective_phase()
    data["status"]["phase"] = phase.value
    data["session_id"] = session.id
    data["machine_id"] = session.status.machineId
    data["created_at"] = data["metadata"]["createdAt"]
    data["state"] = _seed_state(phase)
    return data


def check_id(value: str) -> str:
    try:
        return validate_session_id(value)
    except ValueError as exc:
        raise bad_request("id", str(exc)) from None


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, refusing (413) as soon as more than ``limit`` bytes arrived."""
    too_large = ApiError(
        "payload_too_large",
        f"the request body is larger than {limit} bytes",
        fields=[FieldProblem("body", f"larger than {limit} bytes")],
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(
            "malformed_json",
            "the request body is empty; send a JSON object",
            fields=[FieldProblem("body", "empty")],
        )
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(
            "malformed_json", "the body is not UTF-8", fields=[FieldProblem("body", "not UTF-8")]
        ) from None
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ApiError(
            "malformed_json", "the body is not valid JSON", fields=[FieldProblem("body", reason)]
        ) from None
    if not isinstance(data, dict):
        raise ApiError(
            "malformed_json",
            "the body must be a JSON object",
            fields=[FieldProblem("body", f"a JSON {type(data).__name__}, not an object")],
        )
    return data


def parse_session_body(data: dict[str, Any], prompt_max_chars: int) -> ParsedSession:
    """Either form of a session body, validated; every problem is named by its path in ``data``."""
    if data.keys() & _MANIFEST_KEYS:
        try:
            manifest = SessionManifest.model_validate(data)
        except ValidationError as exc:
            raise invalid(field_problems(exc)) from None
        name = manifest.metadata.name
        if manifest.session_id is not None:
            try:
                validate_session_id(manifest.session_id)
            except ValueError as exc:
                raise invalid([FieldProblem("session_id", str(exc))]) from None
            if name is not None and name != manifest.session_id:
                raise invalid([FieldProblem("session_id", "differs from metadata.name")])
            name = manifest.session_id
        spec, labels = manifest.spec, manifest.metadata.labels
        form: Literal["manifest", "short"] = "manifest"
        prompt_field = "spec.prompt"
    else:
        rest = dict(data)
        raw_id = rest.pop("session_id", None)
        raw_labels = rest.pop("labels", None)
        problems: list[FieldProblem] = []
        name = None
        if raw_id is not None:
            if not isinstance(raw_id, str):
                problems.append(FieldProblem("session_id", "must be a string"))
            else:
                try:
                    name = validate_session_id(raw_id)
                except ValueError as exc:
                    problems.append(FieldProblem("session_id", str(exc)))
        labels = {}
        if raw_labels is not None:
            if not isinstance(raw_labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in raw_labels.items()
            ):
                problems.append(FieldProblem("labels", "must be an object of string values"))
            else:
                try:
                    labels = validate_labels(raw_labels)
                except ValueError as exc:
                    problems.append(FieldProblem("labels", str(exc)))
        try:
            spec = SessionSpec.model_validate(rest)
        except ValidationError as exc:
            raise invalid([*problems, *field_problems(exc)]) from None
        if problems:
            raise invalid(problems)
        form, prompt_field = "short", "prompt"
    if spec.prompt is not None and len(spec.prompt) > prompt_max_chars:
        raise invalid([FieldProblem(prompt_field, f"longer than {prompt_max_chars} characters")])
    return ParsedSession(name=name, spec=spec, labels=labels, form=form)


def differences(existing: Session, spec: SessionSpec, labels: dict[str, str]) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    if canonical_spec(existing.spec) != canonical_spec(spec):
        problems.append(FieldProblem("spec", "differs from the existing session's spec"))
    if canonical_labels(existing.metadata.labels) != canonical_labels(labels):
        problems.append(FieldProblem("metadata.labels", "differ from the existing session's labels"))
    return problems


def openapi_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (SessionManifest, ShortForm, MessageIn):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def body_doc(*refs: str) -> dict[str, Any]:
    one_of = [{"$ref": f"#/components/schemas/{ref}"} for ref in refs]
    schema = one_of[0] if len(one_of) == 1 else {"oneOf": one_of}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 503)
}
