"""Losses: image similarity, the folding penalty, and the training objective that combines them."""

from nir_lightning.losses.folding import (
    FoldingPenalty,
    central_stencil_det,
    forward_stencil_det,
    jacobian_penalty,
)
from nir_lightning.losses.objective import registration_objective
from nir_lightning.losses.similarity import Similarity, global_ncc, local_ncc, mse

__all__ = [
    "FoldingPenalty",
    "Similarity",
    "central_stencil_det",
    "forward_stencil_det",
    "global_ncc",
    "jacobian_penalty",
    "local_ncc",
    "mse",
    "registration_objective",
]
