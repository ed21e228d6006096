"""``python -m hub``: the same command line as ``hub`` (for environments without the script)."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
