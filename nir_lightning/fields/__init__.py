"""Neural fields: the interface, the coordinate encoding and MLP, displacement and velocity fields.

Configs name them by these short paths, e.g. ``nir_lightning.fields.DisplacementField``.
"""

from nir_lightning.fields.base import ComposedField, InverseField, NeuralField
from nir_lightning.fields.displacement import DisplacementField, coordinate_network
from nir_lightning.fields.encoding import FourierFeatures
from nir_lightning.fields.feature_grid import FeatureGrid
from nir_lightning.fields.grid_field import GridDisplacementField
from nir_lightning.fields.grid_velocity import GridVelocityField
from nir_lightning.fields.mlp import CoordinateMLP
from nir_lightning.fields.velocity import (
    StationaryVelocity,
    VelocityField,
    dense_velocity,
    flow_jacobian_determinant,
    flow_with_jacobian,
    has_flow_jacobian,
    scaling_and_squaring,
)

__all__ = [
    "ComposedField",
    "CoordinateMLP",
    "DisplacementField",
    "FeatureGrid",
    "FourierFeatures",
    "GridDisplacementField",
    "GridVelocityField",
    "InverseField",
    "NeuralField",
    "StationaryVelocity",
    "VelocityField",
    "coordinate_network",
    "dense_velocity",
    "flow_jacobian_determinant",
    "flow_with_jacobian",
    "has_flow_jacobian",
    "scaling_and_squaring",
]
