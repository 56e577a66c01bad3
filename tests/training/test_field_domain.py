"""The module spreads the fields' grids over the fixed anatomy, whatever the field of view; each
module made with the defaults has fields and samplers of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nir_lightning.coords import normalized_to_voxel
from nir_lightning.data.pair import ImagePair
from nir_lightning.data.phantom import make_phantom
from nir_lightning.errors import InputError
from nir_lightning.fields import FeatureGrid
from nir_lightning.training.module import RegistrationModule
from nir_lightning.training.schedule import HybridSchedule

SHAPE = (20, 22, 18)


def _pair(pad: int) -> ImagePair:
    p = make_phantom(SHAPE, seed=1)  # 2 mm voxels
    fixed, moving = (torch.as_tensor(np.pad(a, pad))[None, None] for a in (p.fixed, p.moving))
    return ImagePair(fixed=fixed, moving=moving, moving_raw=moving, fixed_affine=p.affine)


def _domain_mm(module: RegistrationModule, pair: ImagePair, pad: int) -> torch.Tensor:
    """The grids' box in millimetres from the phantom's first voxel."""
    grids = [m for m in module.modules() if isinstance(m, FeatureGrid)]
    assert grids and all(torch.equal(g.domain, grids[0].domain) for g in grids)
    return (normalized_to_voxel(grids[0].domain.double(), pair.shape) - pad) * 2.0


def test_the_grids_span_the_anatomy_in_millimetres_whatever_the_padding():
    """A raw scan's head fills part of its field of view: padding the phantom by 12 voxels leaves
    the grids' box where it was, in millimetres, so their cells stay as fine."""
    boxes = []
    for pad in (0, 12):
        pair = _pair(pad)
        module = RegistrationModule(domain_margin=4.0)
        module.attach_pair(pair)
        boxes.append(_domain_mm(module, pair, pad))
        fg = torch.nonzero(pair.foreground_mask()).double()
        lo_mm, hi_mm = (fg.min(0).values - pad) * 2.0, (fg.max(0).values - pad) * 2.0
        inner = (lo_mm - 4.0).clamp(min=0), torch.minimum(hi_mm + 4.0, torch.tensor(SHAPE, dtype=torch.float64) * 2 - 2)
        if pad:  # the whole margin fits in the padded image
            assert torch.allclose(boxes[-1], torch.stack([lo_mm - 4.0, hi_mm + 4.0]), atol=1e-4)
        else:  # clipped to the image
            assert torch.allclose(boxes[-1], torch.stack(inner), atol=1e-4)
    assert float((boxes[1] - boxes[0]).abs().max()) <= 4.0 + 1e-4  # only the clipped margin differs
    whole = RegistrationModule(domain_margin=None)
    whole.attach_pair(_pair(12))
    assert torch.equal(whole.field.encoding.domain, torch.tensor([[-1.0] * 3, [1.0] * 3]))  # type: ignore[union-attr]


def test_the_hybrid_fields_share_the_domain():
    from nir_lightning.fields import GridDisplacementField

    pair = _pair(6)
    module = RegistrationModule(
        field=GridDisplacementField(), field2=GridDisplacementField(), schedule=HybridSchedule(), domain_margin=4.0
    )
    module.attach_pair(pair)
    assert _domain_mm(module, pair, 6).shape == (2, 3)
    assert float(module.field2.encoding.domain[0, 0]) > -1  # type: ignore[union-attr]


@pytest.mark.parametrize("margin", [-1.0, float("inf"), float("nan")])
def test_a_bad_domain_margin_names_the_option(margin):
    with pytest.raises(InputError, match="model.domain_margin"):
        RegistrationModule(domain_margin=margin)


def test_modules_made_with_the_defaults_do_not_share_a_field_or_a_sampler():
    torch.manual_seed(0)
    a = RegistrationModule()
    torch.manual_seed(0)
    b = RegistrationModule()
    assert a.field is not b.field and a.sampler is not b.sampler
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with torch.no_grad():
        a.field.encoding.grids[0].add_(1.0)  # type: ignore[union-attr]
    assert float(b.field.encoding.grids[0].abs().max()) < 1e-3  # type: ignore[union-attr]
    assert HybridSchedule().phase2_sampler is not HybridSchedule().phase2_sampler
