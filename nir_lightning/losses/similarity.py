"""Image similarity: pure functions plus a thin ``nn.Module`` that chooses one.

Images are samples ``(B, 1, d0, d1, d2)``: regular lattices, or unstructured points shaped
``(1, 1, N, 1, 1)`` (see :mod:`nir_lightning.sampling`). Lower is better for every loss.
An optional ``weight`` of the same shape (1 inside the masks, 0 outside) restricts what counts:
samples (``ncc``, ``mse``, ``mi``) or windows (``lncc``: a window counts when most of it lies
inside) outside get no say.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nir_lightning.losses.mutual_information import mutual_information


class _BoxMean(torch.autograd.Function):
    """Mean over valid boxes, one axis at a time; the backward is the same filter on the padded
    gradient (a box filter's adjoint), which is faster than ``avg_pool3d``'s own backward."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, kernel: tuple[int, int, int]) -> Tensor:
        ctx.kernel = kernel
        for axis, k in zip((2, 3, 4), kernel, strict=True):
            if k > 1:
                t = t.unfold(axis, k, 1).mean(-1)
        return t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        k0, k1, k2 = ctx.kernel
        padded = F.pad(grad, (k2 - 1, k2 - 1, k1 - 1, k1 - 1, k0 - 1, k0 - 1))
        return _BoxMean.apply(padded, ctx.kernel), None


def box_mean(t: Tensor, kernel: list[int]) -> Tensor:
    """Mean over valid boxes of ``kernel`` samples, ``(B, C, d0, d1, d2)`` -> ``(B, C, d0-k0+1, ...)``.

    One axis at a time (a box is separable): ``k0 + k1 + k2`` additions per output instead of
    ``k0 * k1 * k2``; equal to ``avg_pool3d(t, kernel, stride=1)`` up to rounding, gradient included.

    >>> t = torch.rand(1, 2, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    >>> bool(torch.allclose(box_mean(t, [3, 4, 5]), F.avg_pool3d(t, [3, 4, 5], stride=1)))
    True
    >>> torch.autograd.gradcheck(lambda x: box_mean(x, [3, 4, 5]), (t,))
    True
    """
    return _BoxMean.apply(t, tuple(int(k) for k in kernel))


def local_ncc(
    fixed: Tensor,
    warped: Tensor,
    *,
    window: int = 9,
    eps: float = 1e-8,
    min_variance: float = 1e-6,
    weight: Tensor | None = None,
) -> Tensor:
    """Negative squared local NCC over valid box windows of ``window`` samples per side.

    Windows where the fixed image is (near-)constant, such as background, carry no
    information and are excluded rather than averaged in. Windows that do not fit a side
    are shrunk to that side. Identical images give -1.

    >>> x = torch.rand(1, 1, 12, 12, 12)
    >>> round(float(local_ncc(x, x, window=5)), 4)
    -1.0
    """
    k = [min(window, s) for s in fixed.shape[2:]]
    pool = lambda t: box_mean(t, k)
    if weight is None:
        # one pooled call over the five maps (channels), not five
        c = fixed.shape[1]
        stats = pool(torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1))
        mu_f, mu_m, ff, mm, fm = stats.split(c, dim=1)
        var_f = (ff - mu_f * mu_f).clamp(min=0)
        var_m = (mm - mu_m * mu_m).clamp(min=0)
        cov = fm - mu_f * mu_m
        valid = var_f > min_variance
    else:  # each window's statistics over its samples inside the masks only
        w = weight.to(fixed.dtype)
        c = fixed.shape[1]
        stats = pool(torch.cat([w.expand_as(fixed), w * fixed, w * warped, w * fixed * fixed, w * warped * warped, w * fixed * warped], dim=1))
        frac, sf, sm, ff, mm, fm = stats.split(c, dim=1)
        total = frac.clamp(min=eps)
        mu_f, mu_m = sf / total, sm / total
        var_f = (ff / total - mu_f * mu_f).clamp(min=0)
        var_m = (mm / total - mu_m * mu_m).clamp(min=0)
        cov = fm / total - mu_f * mu_m
        valid = (var_f > min_variance) & (frac > 0.25)
    cc = cov * cov / (var_f * var_m + eps)
    if not bool(valid.any()):
        return cc.sum() * 0.0
    return -cc[valid].mean()


def global_ncc(fixed: Tensor, warped: Tensor, *, eps: float = 1e-8, weight: Tensor | None = None) -> Tensor:
    """Negative NCC over all samples of each batch element (for unstructured samples).

    >>> x = torch.rand(1, 1, 100, 1, 1)
    >>> round(float(global_ncc(x, 2 * x + 1)), 4)
    -1.0
    """
    f = fixed.flatten(1)
    m = warped.flatten(1)
    if weight is None:
        f = f - f.mean(dim=1, keepdim=True)
        m = m - m.mean(dim=1, keepdim=True)
        ncc = (f * m).sum(1) / torch.sqrt((f * f).sum(1) * (m * m).sum(1) + eps)
        return -ncc.mean()
    w = weight.flatten(1).to(f.dtype)
    total = w.sum(1, keepdim=True).clamp(min=eps)
    f = f - (w * f).sum(1, keepdim=True) / total
    m = m - (w * m).sum(1, keepdim=True) / total
    ncc = (w * f * m).sum(1) / torch.sqrt((w * f * f).sum(1) * (w * m * m).sum(1) + eps)
    return -ncc.mean()


def mse(fixed: Tensor, warped: Tensor, *, weight: Tensor | None = None) -> Tensor:
    """Mean squared intensity difference (over the weighted samples)."""
    if weight is None:
        return F.mse_loss(warped, fixed)
    w = weight.to(fixed.dtype)
    return (w * (warped - fixed) ** 2).sum() / w.sum().clamp(min=1e-8)


SimilarityKind = Literal["lncc", "ncc", "mse", "mi"]


class Similarity(nn.Module):
    """Chooses the similarity: ``"lncc"`` on grid samples (falls back to global NCC on
    unstructured ones), ``"ncc"`` (global), ``"mse"`` or ``"mi"`` (Parzen-window mutual
    information over the samples, normalised by the joint entropy, :func:`~nir_lightning.losses.mutual_information.mutual_information`:
    for pairs of different contrasts, T1 against T2 or FLAIR, where NCC assumes a linear relation).

    >>> x = torch.rand(1, 1, 6, 6, 6)
    >>> float(Similarity("mi")(x, x)) < float(Similarity("mi")(x, torch.rand(1, 1, 6, 6, 6)))
    True
    """

    def __init__(self, kind: SimilarityKind = "lncc", *, window: int = 9, num_bins: int = 32) -> None:
        super().__init__()
        if kind not in ("lncc", "ncc", "mse", "mi"):
            raise ValueError(f"similarity must be 'lncc', 'ncc', 'mse' or 'mi', got {kind!r}")
        if window < 2:
            raise ValueError(f"window must be >= 2 samples, got {window}")
        self.kind = kind
        self.window = window
        self.num_bins = num_bins

    def forward(self, fixed: Tensor, warped: Tensor, *, is_grid: bool = True, weight: Tensor | None = None) -> Tensor:
        if self.kind == "mse":
            return mse(fixed, warped, weight=weight)
        if self.kind == "mi":
            return mutual_information(fixed, warped, num_bins=self.num_bins, weight=weight, normalized=True)
        if self.kind == "ncc" or not is_grid:
            return global_ncc(fixed, warped, weight=weight)
        return local_ncc(fixed, warped, window=self.window, weight=weight)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, window={self.window}"


__all__ = ["Similarity", "SimilarityKind", "global_ncc", "local_ncc", "mse"]
