"""The affine stage's Adam takes torch.optim.Adam's steps bit for bit (the stage's matrices depend on it)."""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from nir_lightning.alignment.adam import StageAdam


def _run(make, steps: int = 60) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(6, generator=gen).requires_grad_(), torch.randn(3, 4, generator=gen).requires_grad_()]
    target = [torch.randn(6, generator=gen), torch.randn(3, 4, generator=gen)]
    opt, set_lr = make(params)
    for step in range(steps):
        set_lr(opt, 0.02 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))))
        opt.zero_grad()
        # the second tensor sits out every fifth step: its moments and step count must wait
        used = params if step % 5 else params[:1]
        loss = sum(((p - t) ** 3).abs().sum() + torch.sin(p * 7).sum() for p, t in zip(used, target))
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in params]


def _set_torch_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _set_stage_lr(opt: StageAdam, lr: float) -> None:
    opt.lr = lr


def test_steps_equal_torch_adam_bit_for_bit() -> None:
    ours = _run(lambda ps: (StageAdam(ps, lr=0.02), _set_stage_lr))
    torchs = _run(lambda ps: (torch.optim.Adam(ps, lr=0.02), _set_torch_lr))
    start = _run(lambda ps: (StageAdam(ps, lr=0.02), _set_stage_lr), steps=0)
    for a, b, s in zip(ours, torchs, start, strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, s)  # the parameters moved: the comparison is not between two idle runs


def test_the_stage_does_not_import_torch_dynamo() -> None:
    # the reason StageAdam exists: a fresh process can run the stage without paying for torch._dynamo
    code = (
        "import sys, torch\n"
        "from nir_lightning.alignment import AffineStage\n"
        "g = torch.Generator().manual_seed(0)\n"
        "z = torch.linspace(-1, 1, 24)\n"
        "blob = torch.exp(-((z[:, None, None] - 0.1) ** 2 + z[None, :, None] ** 2 + (z[None, None, :] + 0.1) ** 2) * 4)\n"
        "fixed = blob[None, None]\n"
        "moving = torch.roll(blob, 2, 0)[None, None]\n"
        "import numpy as np\n"
        "res = AffineStage(kind='rigid', rigid_iterations=(10, 5, 5), init='com').fit(fixed, np.eye(4), moving, np.eye(4))\n"
        "assert abs(res.world[0, 3]) > 0.5, res.world\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
