"""Where the server's packages live in an installation, and the switch that makes them importable.

The distribution installs one top-level package, ``flyswarm``. The server's packages (``api``,
``controller``, ``agent``, ``gateway``, ``local``, ``cli``) travel inside it under ``flyswarm/_server/``
(setuptools ``package-dir`` maps the repository's top-level folders there when the wheel is built),
so installing flyswarm adds no generic top-level names such as ``api`` to a user's environment. In a
checkout (and an editable install) they stay the repository's top-level folders.

The server's code imports its packages by their own names (``from api.models import Session``), so
they become importable as such only when :func:`activate` runs: the ``flyswarm`` command calls it
(:func:`main`), an SDK user never does. activate() puts the folder holding them first on
``sys.path``.

The SDK needs six of those modules (the resource models: ``api/models.py``, ``api/pool_models.py``
and ``api/webhook_models.py``, and the three they import), which use relative imports so that they
load under either name. It must see
the same module objects as the server code running in the same process (the CLI), or a ``Session``
from the client would not be an ``api.models.Session``: :func:`api_module` loads ``api.<name>`` once the
top-level names are active (a checkout is always active), else ``flyswarm._server.api.<name>``; and
activate() registers modules already loaded under the long name under the short one as well, so no
module is ever loaded twice.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
#: A wheel carries the server's packages here; a checkout has them at the repository's root.
BUNDLED = (HERE / "api" / "__init__.py").is_file()
ROOT = HERE if BUNDLED else HERE.parent.parent
SERVER_PACKAGES = ("api", "controller", "agent", "gateway", "local", "cli")
_state = {"active": not BUNDLED}


def activate() -> None:
    """Make ``api``, ``cli``, ... importable by their own names (the server and CLI entry points)."""
    root = str(ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    if BUNDLED:
        prefix = f"{__name__}."
        for name, module in list(sys.modules.items()):
            if name.startswith(prefix):
                sys.modules.setdefault(name.removeprefix(prefix), module)
    _state["active"] = True


def api_module(name: str) -> ModuleType:
    """``api.<name>`` as the one module object this process uses (see the module docstring)."""
    if not BUNDLED:
        activate()
    if _state["active"]:
        return importlib.import_module(f"api.{name}")
    return importlib.import_module(f"{__name__}.api.{name}")


def main() -> None:
    """The ``flyswarm`` console script: the CLI, with the server's packages importable."""
    activate()
    from cli.main import main as cli_main

    cli_main()
