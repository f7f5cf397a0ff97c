"""The file verbs: ``flyswarm artifacts ID`` and ``flyswarm cp ID:PATH DEST``.

``cp`` takes an artifact of that name first (what the session declared in
``spec.output.artifacts``, kept after it ends); when there is none, it reads the file live from the
session's running agent (``GET /sessions/{id}/files``; a directory is refused, list it with
``flyswarm cp ID:dir/ -`` instead, which prints the listing). ``DEST`` is a file, a directory (the
file keeps its base name there) or ``-`` for standard output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024 or unit == "MiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


@click.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def artifacts(name: str, output: str) -> None:
    """List a session's artifacts (and the files it skipped, with the reason)."""
    from cli.main import _client, session_id

    with _client() as client:
        listing = client.artifacts(session_id(name))
    items, skipped = listing.items, listing.skipped
    if output == "json":
        body = {"items": items, "skipped": skipped, "totalBytes": listing.total_bytes}
        click.echo(json.dumps(body, indent=2))
        return
    if not items and not skipped:
        click.echo("No artifacts.")
        return
    click.echo(f"{'NAME':40} {'SIZE':>10}  {'SHA256':16}  UPLOADED")
    for item in items:
        line = (
            f"{item['name']:40} {_human(int(item['size'])):>10}  {item['sha256'][:16]}  {item['uploadedAt']}"
        )
        click.echo(line)
    for skip in skipped:
        click.echo(f"{skip['name']:40} {'skipped':>10}  {skip['reason']}")


@click.command(context_settings=CONTEXT)
@click.argument("source", metavar="ID:PATH")
@click.argument("dest", metavar="DEST")
def cp(source: str, dest: str) -> None:
    """Copy a session's artifact (or, failing that, a live file of its running agent) to DEST."""
    from cli.main import _client, fail, session_id
    from flyswarm import NotFound

    sid, sep, path = source.partition(":")
    if not sep or not sid or not path:
        raise click.BadParameter("expected ID:PATH, e.g. s-abc:out/report.md", param_hint="ID:PATH")
    sid = session_id(sid)
    with _client() as client:
        try:
            data: bytes | dict[str, object] = client.artifact(sid, path)
        except NotFound:
            data = client.live_file(sid, path)
    if isinstance(data, dict):
        if dest == "-":
            click.echo(json.dumps(data, indent=2))
            return
        fail(f"{path} is a directory of the running session; `flyswarm cp {sid}:{path} -` lists it")
    if dest == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    target = Path(dest)
    if target.is_dir():
        target = target / Path(path).name
    target.write_bytes(data)
    click.echo(f"{sid}:{path} -> {target} ({len(data)} bytes)", err=True)
