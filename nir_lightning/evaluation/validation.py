"""The cheap metrics of a fit in progress: local NCC, folding and Dice on one coarse lattice.

:meth:`RegistrationModule.validation_step <nir_lightning.training.module.RegistrationModule.validation_step>`
logs them as ``val/<key>``. They are taken on a stride-``stride`` lattice of the fixed grid (a
fraction of a dense pass), so they trace the fit; the scores of a result are
:func:`~nir_lightning.evaluation.evaluate.evaluate`'s, on every voxel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from nir_lightning.coords import normalized_to_voxel
from nir_lightning.core.jacobian import determinant, jacobian_forward
from nir_lightning.core.resample import sample_image
from nir_lightning.data.foreground import foreground
from nir_lightning.evaluation.metrics import dice_per_label, folding, mean_dice
from nir_lightning.losses import local_ncc
from nir_lightning.sampling import DownsizeSampler

__all__ = ["validation_metrics"]


def validation_metrics(
    transform: Callable[[Tensor], Tensor],
    fixed: Tensor,
    moving: Tensor,
    *,
    stride: int,
    window: int,
    generator: torch.Generator,
    labels: tuple[Tensor, Tensor, Sequence[int]] | None = None,
) -> dict[str, Tensor | float]:
    """Local NCC, folding percentage and mean Dice of ``transform`` on a stride-``stride`` lattice.

    Args:
        transform: ``phi`` on normalized points ``(B, d0, d1, d2, 3)``.
        fixed, moving: images ``(1, 1, D0, D1, D2)`` on the fixed grid.
        stride: lattice stride in voxels (at most the image's smallest side is used).
        window: the local NCC window, in lattice samples.
        generator: draws the lattice's offset.
        labels: ``(fixed_labels, moving_labels, labels)``: label maps ``(1, 1, D0, D1, D2)`` on the
            fixed grid and the label values to average Dice over; ``None``: no ``"dice"``.

    Returns:
        ``{"lncc", "folding_percent"[, "dice"]}`` scalars: local NCC of the warped moving image
        (``-1`` is a perfect match), the percentage of the fixed foreground's lattice cells whose
        forward-difference det J is ``<= 0``, and the mean Dice of nearest-neighbour label warping.

    >>> img = torch.rand(1, 1, 8, 8, 8)
    >>> out = validation_metrics(lambda x: x, img, img, stride=2, window=3, generator=torch.Generator().manual_seed(0))
    >>> round(float(out["lncc"]), 4), float(out["folding_percent"]), sorted(out)
    (-1.0, 0.0, ['folding_percent', 'lncc'])
    """
    shape = (int(fixed.shape[-3]), int(fixed.shape[-2]), int(fixed.shape[-1]))
    sample = DownsizeSampler(stride=min(stride, min(shape))).sample(shape, generator=generator)
    phi = transform(sample.points)
    assert sample.spacing is not None
    det = determinant(jacobian_forward(normalized_to_voxel(phi, shape), sample.spacing))
    fixed_s = sample_image(fixed, sample.points)
    out: dict[str, Tensor | float] = {"lncc": local_ncc(fixed_s, sample_image(moving, phi), window=window)}
    out["folding_percent"] = folding(det, foreground(fixed_s[:, 0, :-1, :-1, :-1]))[1]
    if labels is not None:
        fixed_labels, moving_labels, values = labels
        ml = sample_image(moving_labels.float().to(fixed.device), phi, mode="nearest")
        fl = sample_image(fixed_labels.float().to(fixed.device), sample.points, mode="nearest")
        out["dice"] = mean_dice(dice_per_label(ml.round().cpu(), fl.round().cpu(), values))
    return out
