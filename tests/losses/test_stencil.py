"""The extra det J points of the training step (``jacobian_points`` / ``jacobian_stencil``)."""

from __future__ import annotations

import pytest
import torch

from nir_lightning.coords import normalized_to_voxel, normalized_to_voxel_displacement, voxel_to_normalized
from nir_lightning.core.jacobian import jacobian_determinant
from nir_lightning.core.resample import dense_field
from nir_lightning.data.pair import load_pair
from nir_lightning.errors import InputError
from nir_lightning.fields.displacement import DisplacementField
from nir_lightning.losses.folding import central_stencil_det, jacobian_penalty
from nir_lightning.sampling import DownsizeSampler, MinipatchSampler, RandomSampler
from nir_lightning.training.module import RegistrationModule

GAIN = 400.0


def _module(tiny_pair, **kwargs) -> RegistrationModule:
    torch.manual_seed(0)
    field = DisplacementField(num_frequencies=8, width=32, depth=2, omega0=30.0)
    with torch.no_grad():  # a field that folds: the default init is near the identity
        field.mlp.output.weight.mul_(GAIN)
    module = RegistrationModule(field=field, **kwargs)
    module.attach_pair(load_pair(tiny_pair["fixed"], tiny_pair["moving"]))
    return module


def test_central_stencil_det_is_the_det_of_the_folding_metric(tiny_pair) -> None:
    """At voxel centres the training-time central det equals the dense det that
    ``folding_percent`` counts (numpy.gradient-style central differences)."""
    module = _module(tiny_pair, jacobian_stencil="central")
    shape = module.shape
    with torch.no_grad():
        disp = normalized_to_voxel_displacement(dense_field(module.field, shape), shape)
        dense = jacobian_determinant(disp)[1:-1, 1:-1, 1:-1]
        vox = torch.stack(torch.meshgrid(*[torch.arange(1, n - 1) for n in shape], indexing="ij"), dim=-1).float()
        pts = voxel_to_normalized(vox.reshape(1, -1, 1, 1, 3), shape)
        det = central_stencil_det(module.transform, pts, shape).reshape(dense.shape)
    assert float(dense.std()) > 0.05, "the test field must not be close to a linear map"
    torch.testing.assert_close(det, dense, atol=2e-3, rtol=1e-3)  # float32 field vs float64 metric


def _extra_evaluations(module: RegistrationModule, sampler) -> int:
    """Points the step sends through the field beyond those of the sample's own stencil."""
    sizes: list[int] = []
    inner = module.transform

    def counting(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.numel() // 3)
        return inner(x)

    module.transform = counting  # type: ignore[method-assign]
    gen = module._generator(0)
    sample = sampler.sample(module.shape, generator=gen, mask=module.mask)
    module.model_step(sample, gen)
    own = sample.points.numel() // 3 * (1 if sample.is_grid else 4)
    return sum(sizes) - own


@pytest.mark.parametrize(
    ("sampler", "stencil", "extra"),
    [
        (DownsizeSampler(stride=3), "forward", 4 * 64),  # coarse lattice: extra points
        (DownsizeSampler(stride=3), "central", 6 * 64),
        (DownsizeSampler(stride=1), "forward", 0),  # one-voxel lattice already sees forward folds
        (DownsizeSampler(stride=1), "central", 6 * 64),
        (MinipatchSampler(num_patches=2, patch_size=6), "forward", 0),
        (MinipatchSampler(num_patches=2, patch_size=6), "central", 6 * 64),
        (RandomSampler(num_points=500), "forward", 0),
        (RandomSampler(num_points=500), "central", 6 * 64),
    ],
)
def test_extra_points_are_added_where_the_sample_cannot_see_the_folds(tiny_pair, sampler, stencil: str, extra: int) -> None:
    module = _module(tiny_pair, sampler=sampler, window=3, jacobian_points=64, jacobian_stencil=stencil)
    assert _extra_evaluations(module, sampler) == extra


@pytest.mark.parametrize("sampler", [MinipatchSampler(num_patches=2, patch_size=6), DownsizeSampler(stride=1)])
def test_one_voxel_lattices_add_the_central_det_of_the_folding_metric(tiny_pair, sampler) -> None:
    """With ``jacobian_stencil="central"`` a one-voxel lattice's penalty gains the mean
    ReLU(margin - det) of its interior points, with det J exactly the dense det that
    ``folding_percent`` counts at those voxels."""
    forward = _module(tiny_pair, sampler=sampler, window=3, jacobian_points=0, jacobian_stencil="forward")
    central = _module(tiny_pair, sampler=sampler, window=3, jacobian_points=0, jacobian_stencil="central")
    shape = central.shape
    gen = central._generator(0)
    sample = sampler.sample(shape, generator=gen, mask=central.mask)
    with torch.no_grad():
        added = float(central.model_step(sample)["jedt"] - forward.model_step(sample)["jedt"])
        dense = jacobian_determinant(normalized_to_voxel_displacement(dense_field(central.field, shape), shape))
    vox = normalized_to_voxel(sample.points, shape).round().long()[:, 1:-1, 1:-1, 1:-1].reshape(-1, 3)
    assert vox.numel() > 0, "the sample must have interior points"
    det = dense[vox[:, 0], vox[:, 1], vox[:, 2]]
    expected = float(jacobian_penalty(det, margin=central.margin))
    print(f"\nadded central penalty {added:.4f}, metric-det penalty {expected:.4f}, {int((det <= 0).sum())} folded interior voxels")
    assert expected > 0.01, "the test field must fold inside the lattice"
    assert added == pytest.approx(expected, rel=2e-3, abs=1e-4)


def test_central_penalty_sees_a_fold_and_its_gradient_undoes_it(tiny_pair) -> None:
    """On a folding field the central-stencil term is > 0 and descending it alone removes folds."""
    module = _module(tiny_pair, sampler=RandomSampler(num_points=64), jacobian_points=2048, jacobian_stencil="central", lam=1.0)
    shape = module.shape

    def folded() -> int:
        with torch.no_grad():
            det = jacobian_determinant(normalized_to_voxel_displacement(dense_field(module.field, shape), shape))
        return int(((det <= 0) & module.mask).sum())

    before = folded()
    opt = torch.optim.Adam(module.field.parameters(), lr=1e-3)
    first = None
    for step in range(60):
        pen = module.folding.extra(module.transform, shape, module.mask, module._generator(step))
        first = float(pen.detach()) if first is None else first
        opt.zero_grad()
        pen.backward()
        opt.step()
    after = folded()
    print(f"\nfolded voxels {before} -> {after}, penalty at step 0 {first:.4f}")
    assert first is not None and first > 0
    assert before > 20, f"the test field should fold (got {before} folded voxels)"
    assert after < before / 4, f"folded voxels {before} -> {after}"


def test_unknown_stencil_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="jacobian_stencil must be 'forward', 'central' or 'analytic', got 'backward'"):
        RegistrationModule(jacobian_stencil="backward")  # type: ignore[arg-type]
