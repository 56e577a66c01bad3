"""Subnormal floats flushed to zero while the affine stage runs on the CPU.

The Parzen windows of mutual information (:mod:`nir_lightning.losses.mutual_information`) give
each sample a membership in every one of its 32 bins through a Gaussian; far from the sample's bin
these are tiny, and their products (the joint histogram's matrix product, the softmax and their
gradients) fall below float32's smallest normal number (1.2e-38): subnormals, which x86 CPUs
compute in microcode, tens of times slower. They were three quarters of an affine-stage step (8192
points, one core of the 2-core dev machine: the joint histogram's product 4.7 ms -> 0.13 ms, MI
forward and backward 12.8 ms -> 3.1 ms). A subnormal is below float32's resolution next to the
numbers it is added to, so the stage's losses, gradients and matrices come out the same bit for bit
(``tests/alignment/test_denormals.py``; the matrices of the 2 mm brain pairs too).

The flag is a register of the calling thread (``torch.set_flush_denormal``): worker threads of
torch's intra-op pool keep theirs, so what runs there is not sped up, and nothing outside the
``with`` block sees the flag, the deformable fit included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["denormals_flushed", "flushing_denormals"]


def flushing_denormals() -> bool:
    """Whether this thread's CPU arithmetic flushes subnormal floats to zero (torch has no getter)."""
    return float(torch.tensor([1e-40], dtype=torch.float32) * 2.0) == 0.0


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush subnormal floats to zero on this thread inside the block (where the CPU can: x86 with
    SSE3); the previous setting after it."""
    if flushing_denormals() or not torch.set_flush_denormal(True):  # already on, or the CPU cannot
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
