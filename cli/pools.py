"""How the CLI shows pools: the ``get pools`` table and the ``describe pool`` page.

Pure functions from the API's pool resources (plain dicts) to text, in the look of the session
views of :mod:`cli.render` (kubectl-style headers, tables that fit the terminal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from cli.render import (
    Column,
    _kv,
    age,
    conditions_block,
    labels_text,
    metadata_block,
    name_of,
    table,
    terminal_width,
)

#: The words ``get``, ``describe`` and ``delete`` take for pools.
POOL_RESOURCES = ("pool", "pools", "pl")

POOL_COLUMNS = (
    Column("NAME", shrinkable=True, min_width=12, comfort_width=24),
    Column("MODE"),
    Column("SIZE"),
    Column("READY"),
    Column("BOOTING"),
    Column("CLAIMED"),
    Column("AGE"),
)
WIDE_POOL_COLUMNS = (
    *POOL_COLUMNS,
    Column("MAX", drop_rank=2),
    Column("TEMPLATE", shrinkable=True, min_width=8, comfort_width=24),
    Column("SELECTOR", shrinkable=True, min_width=8, comfort_width=12, drop_rank=1),
)


def is_pool_resource(word: str) -> bool:
    return word.lower() in POOL_RESOURCES


def template_text(spec: Mapping[str, Any]) -> str:
    """``fra shared-cpu-1x 1024MB image`` : what a session's ``spec.machine`` must equal to fit."""
    template = spec.get("template") or {}
    guest = template.get("guest") or {}
    cpus = guest.get("cpus", 1)
    # Fly's preset names: shared-cpu-1x, performance-2x, ...
    size = f"performance-{cpus}x" if guest.get("cpuKind") == "performance" else f"shared-cpu-{cpus}x"
    text = f"{template.get('region', 'fra')} {size} {guest.get('memoryMb', 1024)}MB"
    return f"{text} {template['image']}" if template.get("image") else text


def selector_text(spec: Mapping[str, Any]) -> str:
    selector = spec.get("selector") or {}
    return labels_text(selector.get("matchLabels")) if selector else "<any session>"


def pool_row(resource: Mapping[str, Any], *, wide: bool = False, now: datetime | None = None) -> list[str]:
    metadata = resource.get("metadata") or {}
    spec = resource.get("spec") or {}
    status = resource.get("status") or {}
    mode = str(spec.get("mode", "suspended"))
    row = [
        name_of(resource),
        f"{mode} (deleting)" if metadata.get("deletionTimestamp") else mode,
        str(spec.get("size", 0)),
        str(status.get("ready", 0)),
        str(status.get("booting", 0)),
        str(status.get("claimed", 0)),
        age(metadata.get("createdAt"), now),
    ]
    if wide:
        max_size = spec.get("maxSize")
        row += [str(max_size if max_size is not None else spec.get("size", 0)), template_text(spec)]
        row.append(selector_text(spec))
    return row


def pools_table(
    resources: Sequence[Mapping[str, Any]], *, wide: bool = False, width: int | None = None
) -> str:
    if not resources:
        return "No pools found."
    now = datetime.now(UTC)
    columns = WIDE_POOL_COLUMNS if wide else POOL_COLUMNS
    return table(columns, [pool_row(r, wide=wide, now=now) for r in resources], width)


def describe_pool(resource: Mapping[str, Any], width: int | None = None) -> str:
    """The ``describe pool`` page: metadata, spec (template, selector, sizes), status, conditions."""
    width = width or terminal_width()
    metadata = resource.get("metadata") or {}
    spec = resource.get("spec") or {}
    status = resource.get("status") or {}
    lines: list[str] = []
    metadata_block(lines, metadata)

    lines.append("Spec:")
    _kv(lines, "Mode", spec.get("mode"), 2)
    _kv(lines, "Size", spec.get("size"), 2)
    max_size = spec.get("maxSize")
    _kv(lines, "Max size", max_size if max_size is not None else f"{spec.get('size')} (= size)", 2)
    _kv(lines, "Template", template_text(spec), 2)
    _kv(lines, "Serves sessions", selector_text(spec), 2)
    _kv(lines, "Apps", ", ".join(spec.get("apps") or []) or "the controller's agent apps", 2)

    lines.append("Status:")
    _kv(lines, "Ready", status.get("ready", 0), 2)
    _kv(lines, "Booting", status.get("booting", 0), 2)
    _kv(lines, "Claimed", status.get("claimed", 0), 2)
    _kv(lines, "Observed generation", status.get("observedGeneration", 0), 2)
    _kv(lines, "Last error", status.get("lastError"), 2)
    _kv(lines, "Updated", status.get("updatedAt"), 2)

    conditions_block(lines, status.get("conditions") or [], width)
    return "\n".join(lines)
