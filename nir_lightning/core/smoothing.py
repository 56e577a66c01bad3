"""Gaussian smoothing of images ``(1, C, D0, D1, D2)``, for the coarse-to-fine pyramid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_smooth(image: Tensor, sigma: float | Sequence[float]) -> Tensor:
    """``image`` ``(1, C, D0, D1, D2)`` smoothed by a Gaussian of ``sigma`` voxels (0: unchanged);
    a sequence gives one sigma per axis.

    MONAI's ``GaussianFilter`` (its "erf" kernel truncated at 4 sigma, zero padding, so values
    near the border lean towards 0 as for a background-padded scan), computed here op for op:
    ``tests/core/test_smoothing.py`` checks the bits against MONAI.

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
    return _separable(image, [_kernel_1d(s, image.device).to(image) for s in sigmas])


def _kernel_1d(sigma: float, device: torch.device, truncated: float = 4.0) -> Tensor:
    """MONAI's ``gaussian_1d(sigma, truncated, approx="erf")`` (float32, not normalised, on the
    image's device as there), op for op: the same bits without importing MONAI (0.4 s of
    ``nir register``'s start-up)."""
    s = torch.as_tensor(sigma, dtype=torch.float, device=device)
    tail = int(max(float(s) * truncated, 0.5) + 0.5)
    x = torch.arange(-tail, tail + 1, dtype=torch.float, device=device)
    t = 0.70710678 / torch.abs(s)
    return (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)


def _separable(image: Tensor, kernels: list[Tensor]) -> Tensor:
    """MONAI's ``separable_filtering`` (zero padding) in its order: every axis padded first, then
    one grouped convolution per axis, axis 0 first; a kernel ``[1]`` is skipped."""
    channels = image.shape[1]
    padded = image
    for d in (2, 1, 0):
        if kernels[d].numel() == 1 and kernels[d][0] == 1:
            continue
        pad = [0, 0] * 3
        pad[2 * (2 - d)] = pad[2 * (2 - d) + 1] = (kernels[d].shape[0] - 1) // 2
        padded = F.pad(padded, pad, mode="constant")
    out = padded
    for d in (0, 1, 2):
        if kernels[d].numel() == 1 and kernels[d][0] == 1:
            continue
        shape = [1, 1, 1, 1, 1]
        shape[d + 2] = -1
        weight = kernels[d].reshape(shape).repeat([channels, 1, 1, 1, 1])
        out = F.conv3d(out, weight, groups=channels)
    return out
