"""The training objective is one pure function: the LightningModule's step is exactly that function."""

from __future__ import annotations

import pytest
import torch

from nir_lightning.coords import voxel_spacing
from nir_lightning.data.pair import ImagePair
from nir_lightning.data.phantom import make_phantom
from nir_lightning.fields import DisplacementField
from nir_lightning.losses import FoldingPenalty, Similarity, SmoothnessPenalty, registration_objective
from nir_lightning.sampling import DownsizeSampler, MinipatchSampler, RandomSampler
from nir_lightning.training.module import RegistrationModule

SHAPE = (20, 22, 18)


@pytest.mark.parametrize("sampler", [DownsizeSampler(stride=3), MinipatchSampler(num_patches=2, patch_size=6), RandomSampler(num_points=500)],
                         ids=["downsize", "minipatch", "random"])
@pytest.mark.parametrize("stencil", ["forward", "central"])
def test_module_step_is_the_pure_objective(sampler, stencil: str) -> None:
    p = make_phantom(SHAPE, seed=1)
    fixed, moving = torch.as_tensor(p.fixed)[None, None], torch.as_tensor(p.moving)[None, None]
    pair = ImagePair(fixed=fixed, moving=moving, moving_raw=moving, fixed_affine=p.affine)
    torch.manual_seed(0)
    module = RegistrationModule(field=DisplacementField(width=16, num_frequencies=4), sampler=sampler, window=3,
                                jacobian_points=64, jacobian_stencil=stencil)  # type: ignore[arg-type]
    module.attach_pair(pair)
    gen_a, gen_b = (torch.Generator().manual_seed(5) for _ in range(2))
    sample = sampler.sample(SHAPE, generator=gen_a, mask=module.mask)
    assert torch.equal(sample.points, sampler.sample(SHAPE, generator=gen_b, mask=module.mask).points)
    got = module.model_step(sample, gen_a)
    want = registration_objective(
        module.field, fixed, moving, sample, similarity=Similarity("lncc", window=3),
        folding=FoldingPenalty(margin=0.3, jacobian_points=64, stencil=stencil), lam=10.0,  # type: ignore[arg-type]
        smoothness=SmoothnessPenalty("bending"), alpha=1.0,  # the module's defaults
        mask=pair.foreground_mask(), generator=gen_b, voxel_size=voxel_spacing(p.affine),  # the prior is per mm
    )
    for key in ("loss", "sim", "jedt", "smooth"):
        assert torch.equal(got[key], want[key]), key
    assert float(want["jedt"].detach()) >= 0 and -1 <= float(want["sim"].detach()) <= 0


def test_the_folding_weight_defaults_by_similarity_and_an_explicit_one_wins():
    from nir_lightning.training.module import DEFAULT_LAM

    field = DisplacementField(width=16, num_frequencies=4)
    assert RegistrationModule(field=field).lam == DEFAULT_LAM["lncc"] == 5.0
    assert RegistrationModule(field=field, similarity="mi").lam == DEFAULT_LAM["mi"] == 1.0
    assert RegistrationModule(field=field, similarity="mi", lam=7.0).lam == 7.0
    assert set(DEFAULT_LAM) == {"lncc", "ncc", "mse", "mi"}
