"""The ``flyswarm`` command (placeholder group; verbs are added by their packages)."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """flyswarm: run Claude Agent SDK sessions on Fly Machines."""
