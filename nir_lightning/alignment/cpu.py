"""How the affine stage computes on the CPU: one thread, subnormal floats flushed to zero.

The Parzen windows of mutual information (:mod:`nir_lightning.losses.mutual_information`) give
each sample a membership in every one of its 32 bins through a Gaussian; far from the sample's bin
these are tiny, and their products (the joint histogram's matrix product, the softmax and their
gradients) fall below float32's smallest normal number (1.2e-38): subnormals, which x86 CPUs
compute in microcode, tens of times slower. They were three quarters of an affine-stage step (8192
points, one core of the 2-core dev machine: the joint histogram's product 4.7 ms -> 0.13 ms, MI
forward and backward 12.8 ms -> 3.1 ms). A subnormal is below float32's resolution next to the
numbers it is added to, so the stage's losses, gradients and matrices come out the same bit for bit
(``tests/alignment/test_cpu.py``; the matrices of the 2 mm brain pairs too).

The flag is a register of each thread (``torch.set_flush_denormal`` sets the calling thread's),
and the worker threads of torch's intra-op pool keep theirs: with two threads, half of every
operation would still run subnormals in microcode. So the stage runs on this thread alone
(``torch.set_num_threads(1)`` inside the block): one thread with subnormals flushed is at least
twice as quick as two without (MI forward and backward 3.1 ms against more than 12.8 / 2), and
the stage's steps are small (8192 points), so a second thread gains little anyway (a third of
the stage's time on the dev machine, before). It also makes the affine result the same whatever
``--threads`` is (it differed by about as much as from one seed to another). Both settings are
restored when the block ends, so the deformable fit sees neither; torch's thread count is the
process's, though, so torch work of another Python thread during the stage runs on one thread too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["denormals_flushed", "flushing_denormals", "one_thread", "stage_arithmetic"]


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


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's CPU operations on this thread alone inside the block; the previous count after it."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def stage_arithmetic(device: torch.device) -> Iterator[None]:
    """The affine stage's settings: on the CPU one thread with subnormals flushed (see the module
    docstring); on a GPU only the flag, for the few CPU operations of the stage."""
    with denormals_flushed(), one_thread() if device.type == "cpu" else contextlib.nullcontext():
        yield
