"""``python -m convergence_core``: see :mod:`convergence_core.cli`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
