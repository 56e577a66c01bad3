"""Gaussian smoothing of images ``(1, C, D0, D1, D2)``, for the coarse-to-fine pyramid."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def gaussian_smooth(image: Tensor, sigma: float | Sequence[float]) -> Tensor:
    """``image`` ``(1, C, D0, D1, D2)`` smoothed by a Gaussian of ``sigma`` voxels (0: unchanged);
    a sequence gives one sigma per axis.

    MONAI's separable filter (kernel truncated at 4 sigma, zero padding, so values near the
    border lean towards 0 as for a background-padded scan).

    >>> import torch
    >>> img = torch.zeros(1, 1, 9, 9, 9); img[0, 0, 4, 4, 4] = 1
    >>> out = gaussian_smooth(img, 1.0)
    >>> round(float(out.sum()), 3), bool(out[0, 0, 4, 4, 4] < 1)
    (1.0, True)
    >>> gaussian_smooth(img, 0.0) is img
    True
    """
    sigmas = [float(sigma)] * 3 if isinstance(sigma, (int, float)) else [float(v) for v in sigma]
    if max(sigmas) <= 0:
        return image
    from monai.networks.layers import GaussianFilter  # MONAI (seconds to import) only when a pyramid stage smooths

    return GaussianFilter(spatial_dims=3, sigma=sigmas if len(set(sigmas)) > 1 else sigmas[0], truncated=4.0).to(image.device)(image)
