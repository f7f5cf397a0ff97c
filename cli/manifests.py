"""Manifests: reading ``-f FILE|DIR|-`` and validating every document (Session, Pool, Webhook) first.

A manifest is YAML (one or many documents separated by ``---``) or JSON (one object, a list of
objects, or a ``kind: List`` with ``items``). A directory means every ``*.yaml``, ``*.yml`` and
``*.json`` file directly in it, in name order (like ``kubectl apply -f DIR``, not recursive).

One file may mix kinds; each document is checked by its ``kind`` against the API's own model
(:class:`api.models.Session`, :class:`api.pool_models.Pool`), so a manifest the CLI accepts is one
the server accepts too (a Pool must be named; a Session's name may be generated), and every
problem is reported at once with its place: ``FILE: document N: FIELD: REASON``. Server-owned
parts (``status``, ``agent``, and the server-set metadata ``uid``, ``generation``, ``createdAt``,
``deletionTimestamp``) are dropped, as ``kubectl apply`` ignores them, so the output of
``flyswarm get session X -o yaml`` (or ``get pool X``) can be applied again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import ValidationError

from api.models import API_VERSION, KIND, Session, field_path
from api.pool_models import POOL_KIND, Pool
from api.webhook_models import WEBHOOK_KIND, Webhook

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
SERVER_METADATA = ("uid", "generation", "createdAt", "deletionTimestamp")
SERVER_PARTS = ("status", "agent", "usage")
#: The kinds a manifest may declare, and the model each is validated with.
MODELS: dict[str, type[Session] | type[Pool] | type[Webhook]] = {
    KIND: Session,
    POOL_KIND: Pool,
    WEBHOOK_KIND: Webhook,
}
# Fields the API adds to its answers for the orchestrator-compatible short form.
CONVENIENCE_FIELDS = ("session_id", "machine_id", "created_at", "state")
# Stands in for a missing metadata.name while validating (the server generates the real id).
_PLACEHOLDER_NAME = "generated-name"


@dataclass(frozen=True)
class Problem:
    """One reason a manifest cannot be applied, with where it is."""

    source: str
    index: int  # 1-based document number within the source; 0 = the source as a whole
    field: str
    reason: str

    def __str__(self) -> str:
        where = self.source if self.index == 0 else f"{self.source}: document {self.index}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class ManifestError(Exception):
    """One or more manifests are invalid; ``problems`` names each."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Document:
    """One validated document, ready to send (server-owned parts removed)."""

    source: str
    index: int
    resource: dict[str, Any]

    @property
    def kind(self) -> str:
        """``Session`` or ``Pool``."""
        return str(self.resource.get("kind", KIND))

    @property
    def label(self) -> str:
        """``session/NAME`` or ``pool/NAME`` (``<generated>`` for an unnamed session), as apply prints it."""
        return f"{self.kind.lower()}/{self.name or '<generated>'}"

    @property
    def name(self) -> str | None:
        name = self.resource.get("metadata", {}).get("name")
        return str(name) if name else None


def _paths(target: str) -> list[Path]:
    path = Path(target)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES)
    return [path]


def _parse(text: str, source: str) -> list[Any]:
    """Documents of one source: JSON when it parses as JSON, else (multi-document) YAML."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except ValueError:
            pass  # YAML flow style also starts with { or [; let YAML have a go
        else:
            if isinstance(data, list):
                return data
            if isinstance(data, dict) and data.get("kind") == "List" and isinstance(data.get("items"), list):
                return list(data["items"])
            return [data]
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError([Problem(source, 0, "", f"not valid YAML or JSON: {where}{problem}")]) from None
    expanded: list[Any] = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            expanded.extend(doc["items"])
        else:
            expanded.append(doc)
    return expanded


def _reason(error: dict[str, Any]) -> tuple[str, str]:
    """``(extra field path, reason)`` of one pydantic error, in the API's wording."""
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "", "unknown field"
    if kind == "missing":
        return "", "required"
    message = str(error.get("msg", "invalid"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    # Model-level validators name their field: "prompt: a task session needs a non-empty prompt".
    head, sep, rest = message.partition(": ")
    if sep and kind == "value_error" and head.replace(".", "").replace("_", "").isalnum() and " " not in head:
        return head, rest
    return "", message


def clean(document: dict[str, Any]) -> dict[str, Any]:
    """The user-owned part of a resource: drops status, agent and server-set metadata."""
    resource = {k: v for k, v in document.items() if k not in SERVER_PARTS and k not in CONVENIENCE_FIELDS}
    metadata = resource.get("metadata")
    if isinstance(metadata, dict):
        resource["metadata"] = {k: v for k, v in metadata.items() if k not in SERVER_METADATA}
    return resource


def validate(document: Any, source: str, index: int) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Check one document against the model of its kind; returns the cleaned resource or problems."""
    if not isinstance(document, dict):
        kind = type(document).__name__
        reason = f"a document must be a mapping (a Session, a Pool or a Webhook), not a {kind}"
        return None, [Problem(source, index, "", reason)]
    problems: list[Problem] = []
    model = MODELS.get(str(document.get("kind")))
    if model is None:
        found = document.get("kind")
        known = "Session, Pool or Webhook"
        reason = f"required ({known})" if found is None else f"must be {known}, not {found!r}"
        problems.append(Problem(source, index, "kind", reason))
    if document.get("apiVersion") != API_VERSION:
        found = document.get("apiVersion")
        reason = (
            f"required (must be {API_VERSION})" if found is None else f"must be {API_VERSION}, not {found!r}"
        )
        problems.append(Problem(source, index, "apiVersion", reason))
    if problems:
        return None, problems
    resource = clean(document)
    metadata = resource.get("metadata")
    if metadata is None:
        metadata = resource["metadata"] = {}
    if not isinstance(metadata, dict):
        return None, [Problem(source, index, "metadata", "must be a mapping")]
    candidate = dict(resource)
    if not metadata.get("name"):
        metadata.pop("name", None)
        if model is not Session and model is not None:
            reason = f"required (a {model.__name__} is named)"
            return None, [Problem(source, index, "metadata.name", reason)]
        candidate["metadata"] = {**metadata, "name": _PLACEHOLDER_NAME}
    assert model is not None
    try:
        model.model_validate(candidate)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            loc = [p for p in error.get("loc", ()) if isinstance(p, (int, str))]
            extra, reason = _reason(dict(error))
            if extra:
                loc = [*loc, *extra.split(".")]
            problems.append(Problem(source, index, field_path(loc) or "document", reason))
        return None, problems
    return resource, []


def load(targets: Sequence[str], stdin: IO[str] | None = None) -> list[Document]:
    """Read and validate every document of every target; raise :class:`ManifestError` listing all problems."""
    documents: list[Document] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for target in targets:
        if target == "-":
            sources: list[tuple[str, str | None]] = [("<stdin>", (stdin or sys.stdin).read())]
        else:
            paths = _paths(target)
            if not paths:
                problems.append(Problem(target, 0, "", "no *.yaml, *.yml or *.json files in this directory"))
                continue
            sources = []
            for path in paths:
                try:
                    sources.append((str(path), path.read_text(encoding="utf-8")))
                except FileNotFoundError:
                    problems.append(Problem(str(path), 0, "", "no such file or directory"))
                except (OSError, UnicodeDecodeError) as exc:
                    problems.append(Problem(str(path), 0, "", f"cannot read: {exc}"))
        for source, text in sources:
            if text is None:
                continue
            try:
                parsed = _parse(text, source)
            except ManifestError as exc:
                problems.extend(exc.problems)
                continue
            if not parsed:
                problems.append(Problem(source, 0, "", "contains no documents"))
            for index, raw in enumerate(parsed, start=1):
                resource, found = validate(raw, source, index)
                problems.extend(found)
                if resource is None:
                    continue
                doc = Document(source, index, resource)
                if doc.name is not None:
                    # A session and a pool may share a name; two of one kind may not.
                    if doc.label in seen:
                        problems.append(
                            Problem(
                                source,
                                index,
                                "metadata.name",
                                f"{doc.name!r} is also declared in {seen[doc.label]}",
                            )
                        )
                        continue
                    seen[doc.label] = f"{source} document {index}"
                documents.append(doc)
    if problems:
        raise ManifestError(problems)
    return documents
