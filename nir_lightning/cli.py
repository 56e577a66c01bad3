"""``python -m nir_lightning.cli`` and the ``nir`` console script: see :mod:`nir_lightning.app.cli`."""

from __future__ import annotations

import sys

from nir_lightning.app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
