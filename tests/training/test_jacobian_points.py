"""The det J points of a step follow the image's voxel size: a fold is a few voxels wide at any resolution."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nir_lightning.data.pair import ImagePair
from nir_lightning.data.phantom import make_phantom
from nir_lightning.errors import InputError
from nir_lightning.fields import GridDisplacementField
from nir_lightning.sampling import PyramidSampler
from nir_lightning.training.module import RegistrationModule


@pytest.mark.parametrize(("spacing", "points"), [(2.0, 100), (1.0, 400), (1.5, 178), (0.5, 400), (4.0, 25), (8.0, 25)])
def test_det_j_points_scale_with_the_square_of_the_resolution(spacing: float, points: int) -> None:
    p = make_phantom((12, 14, 10), spacing=spacing, seed=0)
    fixed, moving = torch.as_tensor(p.fixed)[None, None], torch.as_tensor(p.moving)[None, None]
    module = RegistrationModule(field=GridDisplacementField(levels=2), jacobian_points=100)
    module.attach_pair(ImagePair(fixed=fixed, moving=moving, moving_raw=moving, fixed_affine=p.affine))
    assert module.folding.jacobian_points == points  # what each step draws
    assert module.jacobian_points == 100  # what was configured (per step at 2 mm)


@pytest.mark.parametrize(("ratio", "expected"), [(0.25, [6, 25, 400, 400]), (1.0, [100, 100, 400, 400])])
def test_only_the_steps_with_every_grid_level_get_the_extra_points(ratio: float, expected: list[int]) -> None:
    """At 1 mm the finest stage draws 4x the 2 mm count; a stage that leaves grid levels out
    starts from the 2 mm count and draws ``coarse_jacobian_ratio`` of it per level left out
    (the default, a quarter: 100 / 16 and 100 / 4; 1: the 2 mm count, as the diffeomorphic config)."""
    p = make_phantom((12, 14, 10), spacing=1.0, seed=0)
    fixed, moving = torch.as_tensor(p.fixed)[None, None], torch.as_tensor(p.moving)[None, None]
    whole_box = PyramidSampler(box_fractions=None)  # the whole lattice box in every stage: the count is the draw's
    module = RegistrationModule(field=GridDisplacementField(levels=3), jacobian_points=100, coarse_jacobian_ratio=ratio, sampler=whole_box)
    module.attach_pair(ImagePair(fixed=fixed, moving=moving, moving_raw=moving, fixed_affine=p.affine))
    drawn: list[int] = []
    original = module.folding.extra.__func__  # type: ignore[attr-defined]

    def spy(self, transform, shape, mask, generator, transform_with_jacobian=None, focus=None):  # type: ignore[no-untyped-def]
        assert focus is None
        drawn.append(self.jacobian_points)
        return original(self, transform, shape, mask, generator, transform_with_jacobian, focus=focus)

    from nir_lightning.losses.folding import FoldingPenalty

    mp = pytest.MonkeyPatch()
    mp.setattr(FoldingPenalty, "extra", spy)
    try:
        for levels in (1, 2, 3, None):
            sample = module.sampler.sample(p.fixed.shape, generator=torch.Generator().manual_seed(0), mask=module.mask)
            module.model_step(dataclasses.replace(sample, levels=levels), torch.Generator().manual_seed(1))
    finally:
        mp.undo()
    assert drawn == expected


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_coarse_ratio_outside_0_1_is_refused_with_the_option_named(ratio: float) -> None:
    with pytest.raises(InputError, match=r"model\.coarse_jacobian_ratio must be in \(0, 1\]"):
        RegistrationModule(coarse_jacobian_ratio=ratio)


@pytest.mark.parametrize(
    ("spacing", "margin", "expected"),
    [
        (2.0, None, 0.35), (1.0, None, 0.5), (1.5, None, 0.425), (4.0, None, 0.35), (1.0, 0.3, 0.3), (2.0, 0.3, 0.3),
        (2.0, [0.3, 0.45], 0.3), (1.0, [0.3, 0.45], 0.45), (1.5, [0.3, 0.45], 0.375), (0.8, [0.3, 0.45], 0.45), (3.0, [0.3, 0.45], 0.3),
    ],
)
def test_det_j_floor_follows_the_resolution_unless_given(spacing: float, margin: float | None, expected: float) -> None:
    """``model.margin: null`` (the default, ``[0.35, 0.5]``) and a pair ``[at 2 mm, at 1 mm]`` take the
    barrier's floor from the voxel size: 1 mm voxels see det J vary inside the grids' ~2 mm cells, so
    the floor is higher there; a single value given in the config is kept at every resolution."""
    p = make_phantom((12, 14, 10), spacing=spacing, seed=0)
    fixed, moving = torch.as_tensor(p.fixed)[None, None], torch.as_tensor(p.moving)[None, None]
    module = RegistrationModule(field=GridDisplacementField(levels=2), margin=margin)
    module.attach_pair(ImagePair(fixed=fixed, moving=moving, moving_raw=moving, fixed_affine=p.affine))
    assert module.margin == pytest.approx(expected)
    assert module._folding_for(1).margin == pytest.approx(expected)  # the coarse stages' penalty too


@pytest.mark.parametrize("margin", [[0.3], [0.3, 0.4, 0.5], [0.3, 1.0], [-0.1, 0.3], [0.3, float("nan")], 1.0, -0.2])
def test_a_bad_margin_is_refused_with_the_option_and_the_value_named(margin) -> None:
    with pytest.raises(InputError, match=r"model\.margin must be a det J floor in \[0, 1\)"):
        RegistrationModule(field=GridDisplacementField(levels=2), margin=margin)


@pytest.mark.parametrize(
    ("configs", "at_2mm", "at_1mm"),
    [
        (["model/diffeomorphic.yaml"], 0.3, 0.45),
        (["model/displacement.yaml", "model/diffeomorphic.yaml"], 0.3, 0.45),
        (["model/diffeomorphic.yaml", "sampler/pyramid.yaml"], 0.3, 0.45),
        (["model/displacement.yaml"], 0.35, 0.5),
    ],
)
def test_configs_floor_the_barrier_by_voxel_size(configs, at_2mm, at_1mm, configs_dir, tmp_path, monkeypatch) -> None:
    """The diffeomorphic config's floor is 0.3 at 2 mm (its 0.2.17 fits, unchanged) and 0.45 at 1 mm,
    in any ``-c`` order; the displacement default keeps 0.35 / 0.5."""
    import sys

    from nir_lightning.training.lightning_cli import NIRCLI

    args = [a for c in configs for a in ("-c", str(configs_dir / c))]
    args += ["-c", str(configs_dir / "logger" / "none.yaml"), "--data.demo=true", f"--trainer.default_root_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    for spacing, expected in ((2.0, at_2mm), (1.0, at_1mm)):
        module = NIRCLI(args, run=False).model
        p = make_phantom((12, 14, 10), spacing=spacing, seed=0)
        fixed, moving = torch.as_tensor(p.fixed)[None, None], torch.as_tensor(p.moving)[None, None]
        module.attach_pair(ImagePair(fixed=fixed, moving=moving, moving_raw=moving, fixed_affine=p.affine))
        assert module.margin == pytest.approx(expected)
