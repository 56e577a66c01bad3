"""Rigid and affine alignment before the deformable registration.

The result is a *world matrix* ``W`` (4x4 float64) mapping a fixed-image world point (RAS mm)
to the matching moving-image world point, ``moving(W p) ~ fixed(p)``; the identity means
"aligned by the headers". See :mod:`nir_lightning.coords` for how it enters the chain.
"""

from nir_lightning.alignment.moments import center_of_mass, initial_world_matrix, principal_axes
from nir_lightning.alignment.parameters import AffineParameters, RigidParameters
from nir_lightning.alignment.stage import AffineResult, AffineStage, LevelHistory

__all__ = [
    "AffineParameters",
    "AffineResult",
    "AffineStage",
    "LevelHistory",
    "RigidParameters",
    "center_of_mass",
    "initial_world_matrix",
    "principal_axes",
]
