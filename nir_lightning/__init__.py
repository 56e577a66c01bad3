"""nir_lightning: medical image registration via neural fields (NIR) with PyTorch Lightning.

The coordinate convention used everywhere is documented in :mod:`nir_lightning.coords`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
