"""How the CLI shows webhooks and deliveries: ``get webhooks``, ``describe webhook``, ``deliveries``.

Pure functions from the API's resources (plain dicts) to text, in the look of :mod:`cli.pools`,
and the ``flyswarm deliveries webhook NAME | session ID`` command (registered by :mod:`cli.main`).
A webhook's secret never reaches the CLI but once: ``apply`` prints the one the server generated
for a webhook created without one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import click

#: The words ``get``, ``describe`` and ``delete`` take for webhooks.
WEBHOOK_RESOURCES = ("webhook", "webhooks", "wh")


def _webhook_columns() -> tuple[Any, ...]:
    # cli.render loads the HTTP client and the models: imported when a view is drawn, not at start-up.
    from cli.render import Column

    return (
        Column("NAME", shrinkable=True, min_width=12, comfort_width=24),
        Column("URL", shrinkable=True, min_width=16, comfort_width=48),
        Column("SELECTOR", shrinkable=True, min_width=8, comfort_width=16),
        Column("EVENTS"),
        Column("SECRET"),
        Column("AGE"),
    )


def _delivery_columns() -> tuple[Any, ...]:
    from cli.render import Column

    return (
        Column("ID", shrinkable=True, min_width=12, comfort_width=44),
        Column("EVENT"),
        Column("SESSION", shrinkable=True, min_width=8, comfort_width=24),
        Column("STATE"),
        Column("ATTEMPTS"),
        Column("LAST"),
        Column("AGE"),
        Column("ERROR", shrinkable=True, min_width=8, comfort_width=32),
    )


def is_webhook_resource(word: str) -> bool:
    return word.lower() in WEBHOOK_RESOURCES


def webhook_name(arg: str) -> str:
    """Accept ``NAME``, ``webhook/NAME`` and ``webhooks/NAME``."""
    for prefix in ("webhook/", "webhooks/"):
        if arg.startswith(prefix):
            return arg[len(prefix) :]
    return arg


def _selector(spec: Mapping[str, Any]) -> str:
    from cli.render import labels_text

    labels = (spec.get("selector") or {}).get("matchLabels")
    return labels_text(labels) if labels else "<every session>"


def _events(spec: Mapping[str, Any]) -> str:
    events = [str(e).removeprefix("session.") for e in spec.get("events") or []]
    return ",".join(events) if len(events) < 4 else "all"


def webhooks_table(resources: Sequence[Mapping[str, Any]], width: int | None = None) -> str:
    from cli.render import age, name_of, table

    if not resources:
        return "No webhooks found."
    now = datetime.now(UTC)
    rows = [
        [
            name_of(r),
            str((r.get("spec") or {}).get("url", "")),
            _selector(r.get("spec") or {}),
            _events(r.get("spec") or {}),
            "set" if (r.get("status") or {}).get("secretSet") else "none",
            age((r.get("metadata") or {}).get("createdAt"), now),
        ]
        for r in resources
    ]
    return table(_webhook_columns(), rows, width)


def deliveries_table(items: Sequence[Mapping[str, Any]], width: int | None = None) -> str:
    from cli.render import age, table

    if not items:
        return "No deliveries yet."
    now = datetime.now(UTC)
    rows = [
        [
            str(d.get("id", "")),
            str(d.get("event", "")).removeprefix("session."),
            str(d.get("session", "")),
            str(d.get("state", "")),
            str(d.get("attempts", 0)),
            str(d.get("lastStatus") or "-"),
            age(d.get("createdAt"), now),
            str(d.get("lastError") or "-"),
        ]
        for d in items
    ]
    return table(_delivery_columns(), rows, width)


def describe_webhook(
    resource: Mapping[str, Any], deliveries: Sequence[Mapping[str, Any]], width: int | None = None
) -> str:
    """The ``describe webhook`` page: metadata, spec, whether a secret is set, recent deliveries."""
    from cli.render import _kv, metadata_block, terminal_width

    width = width or terminal_width()
    spec = resource.get("spec") or {}
    lines: list[str] = []
    metadata_block(lines, dict(resource.get("metadata") or {}))
    lines.append("Spec:")
    _kv(lines, "URL", spec.get("url"), 2)
    _kv(lines, "Sessions", _selector(spec), 2)
    _kv(lines, "Events", ", ".join(spec.get("events") or []), 2)
    secret_set = (resource.get("status") or {}).get("secretSet")
    _kv(lines, "Signing secret", "set (write-only)" if secret_set else "none", 2)
    lines.append("Deliveries:")
    lines.extend("  " + line for line in deliveries_table(deliveries, width - 2).splitlines())
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("resource", metavar="TYPE")
@click.argument("name")
@click.option("--limit", default=50, show_default=True, help="How many recent deliveries.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def deliveries(resource: str, name: str, limit: int, output: str) -> None:
    """Recent webhook deliveries: `deliveries webhook NAME` or `deliveries session ID` (its spec.notify).

    Each row is one event to one target: its state (pending, delivered, failed), attempts, the
    last HTTP status and error. The id is the `webhook-id` header the receiver saw.
    """
    import json

    from cli.main import _client, plain, session_id

    word = resource.lower()
    if not is_webhook_resource(word) and word not in ("session", "sessions", "s"):
        raise click.BadParameter(f"{resource!r}: give webhook NAME or session ID", param_hint="TYPE")
    with _client() as client:
        if is_webhook_resource(word):
            found = client.webhook_deliveries(webhook_name(name), limit=limit)
        else:
            found = client.session_deliveries(session_id(name), limit=limit)
    items = [plain(d) for d in found]
    if output == "json":
        click.echo(json.dumps({"items": items}, indent=2))
    else:
        click.echo(deliveries_table(items))
