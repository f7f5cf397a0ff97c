"""``python -m cli``: the ``flyswarm`` command without the console script (what ``flyswarm up`` runs)."""

from __future__ import annotations

from cli.main import main

main()
