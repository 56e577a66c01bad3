"""Pure-torch building blocks with no state: slab-wise dense passes, resampling, Jacobians."""

from nir_lightning.core.chunked import DEFAULT_MAX_POINTS, evaluate_on_grid, grid_chunks, map_points, map_slabs, slabs
from nir_lightning.core.jacobian import (
    chunked_jacobian_determinant,
    determinant,
    jacobian_central,
    jacobian_determinant,
    jacobian_forward,
)
from nir_lightning.core.resample import dense_field, sample_image, warp_image

__all__ = [
    "DEFAULT_MAX_POINTS",
    "chunked_jacobian_determinant",
    "dense_field",
    "determinant",
    "evaluate_on_grid",
    "grid_chunks",
    "jacobian_central",
    "jacobian_determinant",
    "jacobian_forward",
    "map_points",
    "map_slabs",
    "sample_image",
    "slabs",
    "warp_image",
]
