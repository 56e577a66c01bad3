"""Losses: image similarity, the folding penalty, the smoothness prior, and the training objective that combines them."""

from nir_lightning.losses.folding import (
    FoldingPenalty,
    central_stencil_det,
    forward_stencil_det,
    forward_stencil_jacobian,
    jacobian_penalty,
)
from nir_lightning.losses.objective import registration_objective
from nir_lightning.losses.similarity import Similarity, global_ncc, local_ncc, mse
from nir_lightning.losses.smoothness import (
    SmoothnessPenalty,
    bending_energy_lattice,
    diffusion_energy,
    log_det_energy,
)

__all__ = [
    "FoldingPenalty",
    "Similarity",
    "SmoothnessPenalty",
    "bending_energy_lattice",
    "central_stencil_det",
    "diffusion_energy",
    "forward_stencil_det",
    "forward_stencil_jacobian",
    "global_ncc",
    "jacobian_penalty",
    "local_ncc",
    "log_det_energy",
    "mse",
    "registration_objective",
]
