"""Adam for the affine stage's few parameters, without ``torch.optim``.

Constructing any ``torch.optim`` optimiser imports ``torch._dynamo`` (its ``add_param_group`` is
wrapped by ``torch._disable_dynamo``, which imports it on the first call): 1.1 s on the 2-core dev
machine. ``nir register`` runs the stage in a second process while the first imports Lightning
(:mod:`nir_lightning.app.early_affine`), and that process has nothing else to import it for.
:class:`StageAdam` is the update of ``torch.optim.Adam`` as torch computes it on the CPU (its
single-tensor path: no weight decay, no AMSGrad, the default betas and eps), operation for
operation, so the stage's matrices are the same bit for bit
(``tests/alignment/test_adam.py`` compares every step with ``torch.optim.Adam``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["StageAdam"]


class StageAdam:
    """Adam (Kingma & Ba, 2015) over a list of tensors, each with its own moments and step count.

    Args:
        params: the tensors to optimise (leaves that require gradients).
        lr: the learning rate; :attr:`lr` may be changed between steps (the stage's cosine).
        betas: the decay of the first and second moment estimates.
        eps: added to the denominator.

    >>> p = torch.zeros(2, requires_grad=True)
    >>> opt = StageAdam([p], lr=0.1)
    >>> (p - torch.tensor([1.0, -1.0])).square().sum().backward()
    >>> opt.step()
    >>> p.detach()  # the first step moves each parameter by lr against its gradient's sign
    tensor([ 0.1000, -0.1000])
    """

    def __init__(self, params: Iterable[Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr = float(lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self._steps = [0] * len(self.params)
        self._exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``, as ``torch.optim``'s default)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every tensor that has a gradient (a tensor without one keeps its state)."""
        for i, (param, exp_avg, exp_avg_sq) in enumerate(zip(self.params, self._exp_avg, self._exp_avg_sq, strict=True)):
            grad = param.grad
            if grad is None:
                continue
            self._steps[i] += 1
            step = float(self._steps[i])
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            bias_correction1 = 1 - self.beta1**step
            bias_correction2 = 1 - self.beta2**step
            step_size = self.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
