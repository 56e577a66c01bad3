"""nir_lightning: medical image registration via neural fields (NIR) with PyTorch Lightning.

The public API is :func:`register_pair` (what ``nir register`` runs). The coordinate convention
used everywhere is documented in :mod:`nir_lightning.coords`. Layers, bottom up: ``errors``,
``coords``, ``io`` -> ``core`` -> ``fields``, ``sampling`` -> ``losses`` -> ``data`` ->
``evaluation`` -> ``training`` (the only layer that imports Lightning) -> ``app`` (API and CLI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nir_lightning._version import __version__

if TYPE_CHECKING:
    from nir_lightning.app.register import PairRegistration, register_pair

__all__ = ["PairRegistration", "__version__", "register_pair"]


def __getattr__(name: str) -> Any:
    # Lazy: `import nir_lightning.coords` must not pull in Lightning.
    if name in ("register_pair", "PairRegistration"):
        from nir_lightning.app import register

        return getattr(register, name)
    raise AttributeError(f"module 'nir_lightning' has no attribute {name!r}")
