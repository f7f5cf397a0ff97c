"""How the CLI shows sessions and events: tables that fit the terminal, describe pages, event lines.

Pure functions from API resources (plain dicts, as the API serves them) to text, so they are easy
to test and never call the server. Tables follow kubectl's look (upper-case headers, columns
separated by three spaces) and shrink their widest free-text columns, ending cut values with
``…``, until they fit the terminal (80 columns when the output is not a terminal).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from api.models import TERMINAL_PHASES, parse_timestamp
from flyswarm.models import shown_phase

GAP = "   "
ELLIPSIS = "…"
DEFAULT_WIDTH = 80


def terminal_width() -> int:
    return max(40, shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns)


# -- small value formatting -------------------------------------------------------------------------


def age(value: Any, now: datetime | None = None) -> str:
    """kubectl-style age: ``45s``, ``12m``, ``3h``, ``2d``; ``<unknown>`` without a time."""
    then = parse_timestamp(value)
    if then is None:
        return "<unknown>"
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def phase_of(resource: Mapping[str, Any]) -> str:
    """The phase to show for a served session (:func:`flyswarm.shown_phase`: ``Terminating`` once deleted)."""
    return shown_phase(resource).value


def name_of(resource: Mapping[str, Any]) -> str:
    return str((resource.get("metadata") or {}).get("name") or resource.get("session_id") or "")


def labels_text(labels: Mapping[str, Any] | None) -> str:
    if not labels:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def cost_text(value: Any) -> str:
    if isinstance(value, (int, float)):
        return f"${value:.4f}"
    return "-"


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


# -- tables -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str
    shrinkable: bool = False
    min_width: int = 4
    # Columns with a drop rank are left out, lowest rank first, when even the shrunk table is too
    # wide (so `-o wide` shows everything on a wide terminal and what matters most on 80 columns).
    drop_rank: int | None = None
    # Shrinking stops here before any column is dropped; only then down to min_width.
    comfort_width: int = 0


def _cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    return text[: width - 1] + ELLIPSIS


def _fits(widths: Sequence[int], width: int) -> bool:
    return sum(widths) + len(GAP) * (len(widths) - 1) <= width


def _widths(
    columns: Sequence[Column], cells: Sequence[Sequence[str]], width: int, *, comfort: bool
) -> list[int]:
    widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def floor(c: Column) -> int:
        return max(c.min_width, len(c.header), c.comfort_width if comfort else 0)

    while not _fits(widths, width):
        candidates = [i for i, c in enumerate(columns) if c.shrinkable and widths[i] > floor(c)]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


def table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None = None) -> str:
    """Rows under upper-case headers that fit ``width``.

    Free-text columns shrink first (down to a comfortable width), then columns with a drop rank
    are left out, lowest rank first, and only then do the free-text columns shrink to their minimum.
    """
    width = width or terminal_width()
    cols = list(columns)
    cells = [[" ".join(str(v).split()) for v in row] for row in rows]
    while True:
        widths = _widths(cols, cells, width, comfort=True)
        droppable = [i for i, c in enumerate(cols) if c.drop_rank is not None]
        if _fits(widths, width) or not droppable:
            break
        drop = min(droppable, key=lambda i: cols[i].drop_rank or 0)
        del cols[drop]
        cells = [row[:drop] + row[drop + 1 :] for row in cells]
    if not _fits(widths, width):
        widths = _widths(cols, cells, width, comfort=False)
    lines = []
    for row in [[c.header for c in cols], *cells]:
        parts = [_cut(value, widths[i]).ljust(widths[i]) for i, value in enumerate(row)]
        lines.append(GAP.join(parts).rstrip())
    return "\n".join(lines)


SESSION_COLUMNS = (
    Column("NAME", shrinkable=True, min_width=12, comfort_width=24),
    Column("MODE"),
    Column("PHASE"),
    Column("REASON", shrinkable=True, min_width=6),
    Column("RESTARTS"),
    Column("AGE"),
)
WIDE_COLUMNS = (
    Column("NAME", shrinkable=True, min_width=12, comfort_width=24),
    Column("MODE", drop_rank=2),
    Column("PHASE"),
    Column("REASON", shrinkable=True, min_width=6),
    Column("RESTARTS", drop_rank=3),
    Column("AGE"),
    Column("MACHINE", shrinkable=True, min_width=7, comfort_width=14),
    Column("REGION", drop_rank=1),
    Column("TURNS", drop_rank=4),
    Column("COST"),
    Column("LABELS", shrinkable=True, min_width=6, comfort_width=12),
)


def session_row(resource: Mapping[str, Any], *, wide: bool = False, now: datetime | None = None) -> list[str]:
    metadata = resource.get("metadata") or {}
    spec = resource.get("spec") or {}
    status = resource.get("status") or {}
    agent = resource.get("agent") or {}
    row = [
        name_of(resource),
        str(spec.get("mode", "task")),
        phase_of(resource),
        _dash(status.get("reason")),
        str(status.get("restarts", 0)),
        age(metadata.get("createdAt"), now),
    ]
    if wide:
        row += [
            _dash(status.get("machineId")),
            _dash(status.get("region")),
            str(agent.get("turns", 0) if agent else "-"),
            cost_text(agent.get("costUsd") if agent else None),
            labels_text(metadata.get("labels")),
        ]
    return row


def sessions_table(
    resources: Sequence[Mapping[str, Any]], *, wide: bool = False, width: int | None = None
) -> str:
    if not resources:
        return "No sessions found."
    columns = WIDE_COLUMNS if wide else SESSION_COLUMNS
    now = datetime.now(UTC)
    return table(columns, [session_row(r, wide=wide, now=now) for r in resources], width)


# -- describe ---------------------------------------------------------------------------------------


def _kv(lines: list[str], key: str, value: Any, indent: int = 0, width: int = 24) -> None:
    pad = " " * indent
    text = _dash(value)
    lines.append(f"{pad}{(key + ':').ljust(width - indent)}{text}")


def _block(lines: list[str], key: str, text: str | None, indent: int = 2, wrap: int = 76) -> None:
    pad = " " * indent
    if not text:
        _kv(lines, key, None, indent)
        return
    lines.append(f"{pad}{key}:")
    for paragraph in text.splitlines() or [""]:
        wrapped = textwrap.wrap(paragraph, width=max(20, wrap - indent - 2)) or [""]
        lines.extend(f"{pad}  {part}" for part in wrapped)


def describe(
    resource: Mapping[str, Any], events: Sequence[Mapping[str, Any]] = (), width: int | None = None
) -> str:
    """The ``describe session`` page: metadata, spec, status, conditions, agent report, recent events."""
    width = width or terminal_width()
    metadata = resource.get("metadata") or {}
    spec = resource.get("spec") or {}
    status = resource.get("status") or {}
    agent = resource.get("agent") or {}
    machine = spec.get("machine") or {}
    guest = machine.get("guest") or {}
    restart = spec.get("restartPolicy") or {}
    lines: list[str] = []
    metadata_block(lines, metadata)

    lines.append("Spec:")
    _kv(lines, "Mode", spec.get("mode"), 2)
    _block(lines, "Prompt", spec.get("prompt"))
    if spec.get("systemPrompt"):
        _block(lines, "System prompt", spec.get("systemPrompt"))
    _kv(lines, "Model", spec.get("model") or "(SDK default)", 2)
    _kv(lines, "Max turns", spec.get("maxTurns"), 2)
    _kv(lines, "Timeout", f"{spec.get('timeoutSeconds')}s" if spec.get("timeoutSeconds") else None, 2)
    _kv(lines, "Max cost", cost_text(spec.get("maxCostUsd")) if spec.get("maxCostUsd") else "none", 2)
    if spec.get("mode") == "chat":
        idle = spec.get("idleTimeoutSeconds")
        _kv(lines, "Sleep", f"{spec.get('sleep')} after {idle}s idle" if idle else "never", 2)
    _kv(lines, "Restart policy", f"{restart.get('policy')} (max {restart.get('maxRetries')} retries)", 2)
    _kv(lines, "TTL after finish", f"{spec.get('ttlSecondsAfterFinished')}s", 2)
    _kv(lines, "Allowed tools", ", ".join(spec.get("allowedTools") or []) or "none", 2)
    guest_text = f"{guest.get('cpuKind')} {guest.get('cpus')} cpu, {guest.get('memoryMb')} MB"
    _kv(
        lines,
        "Machine",
        f"{machine.get('region')}, {guest_text}, image {machine.get('image') or 'default'}",
        2,
    )

    lines.append("Status:")
    _kv(lines, "Phase", phase_of(resource), 2)
    _kv(lines, "Reason", status.get("reason"), 2)
    if status.get("message"):
        _block(lines, "Message", status.get("message"))
    _kv(lines, "Machine", status.get("machineId"), 2)
    _kv(lines, "Region", status.get("region"), 2)
    _kv(lines, "Restarts", status.get("restarts", 0), 2)
    _kv(lines, "Observed generation", status.get("observedGeneration"), 2)
    _kv(lines, "Started", status.get("startedAt"), 2)
    _kv(lines, "Finished", status.get("finishedAt"), 2)
    _kv(lines, "Last heartbeat", status.get("lastHeartbeatAt"), 2)
    if status.get("nextRetryAt"):
        _kv(lines, "Next retry", status.get("nextRetryAt"), 2)

    conditions_block(lines, status.get("conditions") or [], width)

    lines.append("Agent:")
    if agent:
        _kv(lines, "State", agent.get("state"), 2)
        _kv(lines, "Turns", agent.get("turns"), 2)
        _kv(lines, "Cost", cost_text(agent.get("costUsd")), 2)
        usage = agent.get("usage") or {}
        if usage:
            tokens = ", ".join(f"{k}={v}" for k, v in sorted(usage.items()) if isinstance(v, (int, float)))
            _kv(lines, "Usage", tokens or json.dumps(usage, sort_keys=True), 2)
        _kv(lines, "Claude session", agent.get("claudeSessionId"), 2)
        for source in (agent.get("workspace") or {}).get("sources") or []:
            changed = len(source.get("changedFiles") or [])
            pushed = (source.get("push") or {}).get("commit")
            summary = f"{source.get('path')} from {str(source.get('commit'))[:12]}: {changed} changed file(s)"
            _kv(lines, "Workspace", summary + (f", pushed {pushed[:12]}" if pushed else ""), 2)
        if agent.get("reason"):
            _kv(lines, "Reason", agent.get("reason"), 2)
        if agent.get("message"):
            _block(lines, "Message", agent.get("message"))
        _block(lines, "Result", agent.get("resultText"))
        if agent.get("stderrTail") and agent.get("state") == "error":
            _block(lines, "Stderr (tail)", agent.get("stderrTail"))
    else:
        lines.append("  <no report yet>")

    lines.append("Events:")
    if events:
        rows = [
            [
                age(e.get("time")),
                str(e.get("source", "")),
                str(e.get("type", "")),
                _dash(e.get("reason")),
                event_message(e),
            ]
            for e in events
        ]
        cols = (
            Column("AGE"),
            Column("FROM"),
            Column("TYPE", True, 8),
            Column("REASON", True, 6),
            Column("MESSAGE", True, 10),
        )
        lines.extend("  " + line for line in table(cols, rows, width - 2).splitlines())
    else:
        lines.append("  <none>")
    return "\n".join(lines)


# -- events -----------------------------------------------------------------------------------------


def event_message(event: Mapping[str, Any]) -> str:
    """A one-line human text for an event (its message, else a summary of its data)."""
    message = event.get("message")
    if message:
        return " ".join(str(message).split())
    data = event.get("data") or {}
    if isinstance(data, Mapping) and data:
        for key in ("text", "result", "summary", "tool", "name", "phase", "state"):
            if data.get(key):
                return " ".join(str(data[key]).split())
        return json.dumps(data, sort_keys=True, default=str)
    return ""


def event_line(event: Mapping[str, Any], width: int | None = None) -> str:
    """``HH:MM:SS source type [reason] message`` for ``flyswarm logs``."""
    when = parse_timestamp(event.get("time"))
    stamp = when.astimezone().strftime("%H:%M:%S") if when else "--:--:--"
    kind = str(event.get("type", "event"))
    reason = event.get("reason")
    head = f"{stamp} {str(event.get('source', '')):<10} {kind}"
    if reason:
        head += f" [{reason}]"
    message = event_message(event)
    line = f"{head}: {message}" if message else head
    return _cut(line, width) if width else line


def is_finished(resource: Mapping[str, Any]) -> bool:
    return phase_of(resource) in {p.value for p in TERMINAL_PHASES}


def conditions_block(lines: list[str], conditions: list[dict[str, Any]], width: int) -> None:
    """The ``Conditions:`` table of a describe page (sessions and pools alike)."""
    lines.append("Conditions:")
    if not conditions:
        lines.append("  <none>")
        return
    rows = [
        [
            str(c.get("type", "")),
            str(c.get("status", "")),
            _dash(c.get("reason")),
            age(c.get("lastTransitionTime")),
            _dash(c.get("message")),
        ]
        for c in conditions
    ]
    cols = (
        Column("TYPE"),
        Column("STATUS"),
        Column("REASON", True),
        Column("AGE"),
        Column("MESSAGE", True),
    )
    lines.extend("  " + line for line in table(cols, rows, width - 2).splitlines())


def metadata_block(lines: list[str], metadata: dict[str, Any]) -> None:
    """The metadata lines that open a describe page (sessions and pools alike)."""
    _kv(lines, "Name", metadata.get("name"))
    _kv(lines, "Labels", labels_text(metadata.get("labels")))
    _kv(lines, "UID", metadata.get("uid"))
    _kv(lines, "Generation", metadata.get("generation"))
    created = metadata.get("createdAt")
    _kv(lines, "Created", f"{created} ({age(created)} ago)" if created else None)
    if metadata.get("deletionTimestamp"):
        _kv(lines, "Deleting since", metadata.get("deletionTimestamp"))
