"""``python -m controller``: run one controller replica until SIGTERM (see controller/main.py)."""

from __future__ import annotations

from controller.main import main

if __name__ == "__main__":
    main()
