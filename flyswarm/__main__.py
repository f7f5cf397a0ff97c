"""``python -m flyswarm``: the ``flyswarm`` command."""

from flyswarm._server import main

main()
