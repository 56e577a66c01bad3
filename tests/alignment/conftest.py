"""Fixtures shared by the affine-stage tests."""

from __future__ import annotations

import numpy as np
import pytest

from nir_lightning.data.phantom import make_phantom

SHAPE = (48, 56, 44)
"""The phantom grid of the affine-stage tests (2 mm voxels)."""


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled fixed image, its affine and the world position of the grid centre."""
    p = make_phantom(SHAPE, spacing=2.0, seed=0)
    image = p.fixed / p.fixed.max()
    centre = p.affine[:3, :3] @ ((np.asarray(SHAPE) - 1) / 2.0) + p.affine[:3, 3]
    return image, p.affine, centre
