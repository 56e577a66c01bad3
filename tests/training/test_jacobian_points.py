"""The det J points of a step follow the image's voxel size: a fold is a few voxels wide at any resolution."""

from __future__ import annotations

import pytest
import torch

from nir_lightning.data.pair import ImagePair
from nir_lightning.data.phantom import make_phantom
from nir_lightning.fields import GridDisplacementField
from nir_lightning.training.module import RegistrationModule


@pytest.mark.parametrize(("spacing", "points"), [(2.0, 100), (1.0, 400), (1.5, 178), (0.5, 400), (4.0, 25), (8.0, 25)])
def test_det_j_points_scale_with_the_square_of_the_resolution(spacing: float, points: int) -> None:
    p = make_phantom((12, 14, 10), spacing=spacing, seed=0)
    fixed, moving = torch.as_tensor(p.fixed)[None, None], torch.as_tensor(p.moving)[None, None]
    module = RegistrationModule(field=GridDisplacementField(levels=2), jacobian_points=100)
    module.attach_pair(ImagePair(fixed=fixed, moving=moving, moving_raw=moving, fixed_affine=p.affine))
    assert module.folding.jacobian_points == points  # what each step draws
    assert module.jacobian_points == 100  # what was configured (per step at 2 mm)
