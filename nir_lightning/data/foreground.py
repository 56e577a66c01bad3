"""The one foreground rule of the package (masks of the samplers, the folding metric, Dice checks)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["FOREGROUND_THRESHOLD", "foreground"]

FOREGROUND_THRESHOLD = 0.01
"""The one foreground rule: fixed intensities (scaled to [0, 1]) above 1 % of their range."""


def foreground(scaled: Tensor) -> Tensor:
    """Foreground of an image scaled to [0, 1] (any shape): ``scaled > FOREGROUND_THRESHOLD``.

    >>> import torch
    >>> foreground(torch.tensor([0.0, 0.005, 0.5])).tolist()
    [False, False, True]
    """
    return scaled > FOREGROUND_THRESHOLD
