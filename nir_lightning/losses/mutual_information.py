"""Negative mutual information with Gaussian Parzen windows, optionally weighted per sample.

Used by the rigid/affine stage (:mod:`nir_lightning.alignment`) to align images of different
contrasts or of the same contrast with different intensity scaling, and, normalised, by the
neural field's ``mi`` similarity (:mod:`nir_lightning.losses.similarity`).

Why not ``monai.losses.GlobalMutualInformationLoss``: it clamps intensities to ``[0, 1]``
(a sample just outside that range then has zero gradient) and it has no per-sample weights,
which the alignment stage needs to exclude points that fall outside the moving image or
outside a mask. The estimator below is the same idea (Gaussian Parzen windows on equally
spaced bin centres, Mattes et al. / MONAI style) in a few lines, with weights.

Intensities are expected in ``[0, 1]`` (the loader scales them so). Nothing is clamped:
bin centres span ``[0, 1]`` and each sample contributes to every bin through a Gaussian
kernel, so values slightly outside the range still contribute, smoothly, to the edge bins.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-10


def _parzen(x: Tensor, centres: Tensor, sigma: float) -> Tensor:
    """Soft bin memberships ``(N, num_bins)``, each row summing to 1."""
    logits = -0.5 * ((x[:, None] - centres[None, :]) / sigma) ** 2
    return torch.softmax(logits, dim=1)


def mutual_information(
    a: Tensor,
    b: Tensor,
    *,
    num_bins: int = 32,
    weight: Tensor | None = None,
    sigma_ratio: float = 0.5,
    normalized: bool = False,
) -> Tensor:
    """Negative mutual information (a loss: lower is better) between intensities ``a`` and ``b``.

    ``a`` and ``b`` have any equal shape and are flattened to ``N`` samples; intensities are
    expected in ``[0, 1]`` (not clamped, see the module docstring). ``weight`` (same shape,
    ``>= 0``, e.g. a mask as float) weights each sample's contribution to the joint
    histogram, so a sample of weight 0 does not count. Each sample is spread over
    ``num_bins`` bins (centres ``linspace(0, 1, num_bins)``) with a Gaussian kernel of
    standard deviation ``sigma_ratio`` times the bin spacing; with all weights 0 the result is
    0. Memory is ``O(N * num_bins)`` per image plus a ``num_bins**2`` joint histogram.
    With ``normalized``, the result is ``-MI / H(a, b)`` in ``[-1, 0]`` (Studholme's
    overlap-invariant normalisation; the kernel's smoothing keeps identical images near -0.5,
    see below). The neural field uses it: it can move edges against the background, and plain
    MI rewards moving the anatomy's bright rim (CSF in a T2) off the fixed anatomy, which
    purifies the joint histogram. Returns a scalar, differentiable in ``a``, ``b`` (and
    ``weight``).

    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.rand(4096, generator=g)
    >>> shuffled = a[torch.randperm(4096, generator=g)]
    >>> bool(mutual_information(a, a) < mutual_information(a, shuffled))
    True
    >>> remap = 1 - (2 * a - 1) ** 2  # non-monotonic: two intensities map to one
    >>> bool(mutual_information(a, remap) < 0.5 * mutual_information(a, a) < mutual_information(a, shuffled))
    True
    >>> round(float(mutual_information(a, a, normalized=True)), 2)
    -0.53
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    if sigma_ratio <= 0:
        raise ValueError(f"sigma_ratio must be > 0, got {sigma_ratio}")
    x = a.reshape(-1)
    y = b.reshape(-1).to(x.dtype)
    centres = torch.linspace(0.0, 1.0, num_bins, dtype=x.dtype, device=x.device)
    sigma = sigma_ratio / (num_bins - 1)
    pa = _parzen(x, centres, sigma)
    pb = _parzen(y, centres, sigma)
    if weight is not None:
        if weight.shape != a.shape:
            raise ValueError(f"weight must have the shape of a, {tuple(a.shape)}, got {tuple(weight.shape)}")
        pa = pa * weight.reshape(-1, 1).to(pa.dtype)
    total = pa.sum()
    joint = pa.T @ pb / total.clamp(min=_EPS)
    marg_a = joint.sum(dim=1, keepdim=True)
    marg_b = joint.sum(dim=0, keepdim=True)
    mi = (joint * (torch.log(joint + _EPS) - torch.log(marg_a @ marg_b + _EPS))).sum()
    if normalized:
        return -mi / (-(joint * torch.log(joint + _EPS)).sum()).clamp(min=_EPS)
    return -mi


__all__ = ["mutual_information"]
