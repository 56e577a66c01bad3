"""Image similarity: pure functions plus a thin ``nn.Module`` that chooses one.

Images are samples ``(B, 1, d0, d1, d2)``: regular lattices, or unstructured points shaped
``(1, 1, N, 1, 1)`` (see :mod:`nir_lightning.sampling`). Lower is better for every loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def local_ncc(
    fixed: Tensor,
    warped: Tensor,
    *,
    window: int = 9,
    eps: float = 1e-8,
    min_variance: float = 1e-6,
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
    pool = lambda t: F.avg_pool3d(t, kernel_size=k, stride=1)
    mu_f, mu_m = pool(fixed), pool(warped)
    var_f = (pool(fixed * fixed) - mu_f * mu_f).clamp(min=0)
    var_m = (pool(warped * warped) - mu_m * mu_m).clamp(min=0)
    cov = pool(fixed * warped) - mu_f * mu_m
    cc = cov * cov / (var_f * var_m + eps)
    valid = var_f > min_variance
    if not bool(valid.any()):
        return cc.sum() * 0.0
    return -cc[valid].mean()


def global_ncc(fixed: Tensor, warped: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Negative NCC over all samples of each batch element (for unstructured samples).

    >>> x = torch.rand(1, 1, 100, 1, 1)
    >>> round(float(global_ncc(x, 2 * x + 1)), 4)
    -1.0
    """
    f = fixed.flatten(1)
    m = warped.flatten(1)
    f = f - f.mean(dim=1, keepdim=True)
    m = m - m.mean(dim=1, keepdim=True)
    ncc = (f * m).sum(1) / torch.sqrt((f * f).sum(1) * (m * m).sum(1) + eps)
    return -ncc.mean()


def mse(fixed: Tensor, warped: Tensor) -> Tensor:
    """Mean squared intensity difference."""
    return F.mse_loss(warped, fixed)


SimilarityKind = Literal["lncc", "ncc", "mse"]


class Similarity(nn.Module):
    """Chooses the similarity: ``"lncc"`` on grid samples (falls back to global NCC on
    unstructured ones), ``"ncc"`` (global) or ``"mse"``."""

    def __init__(self, kind: Literal["lncc", "ncc", "mse"] = "lncc", *, window: int = 9) -> None:
        super().__init__()
        if kind not in ("lncc", "ncc", "mse"):
            raise ValueError(f"similarity must be 'lncc', 'ncc' or 'mse', got {kind!r}")
        if window < 2:
            raise ValueError(f"window must be >= 2 samples, got {window}")
        self.kind = kind
        self.window = window

    def forward(self, fixed: Tensor, warped: Tensor, *, is_grid: bool = True) -> Tensor:
        if self.kind == "mse":
            return mse(fixed, warped)
        if self.kind == "ncc" or not is_grid:
            return global_ncc(fixed, warped)
        return local_ncc(fixed, warped, window=self.window)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, window={self.window}"


__all__ = ["Similarity", "SimilarityKind", "global_ncc", "local_ncc", "mse"]
