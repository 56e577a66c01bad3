"""Where does one optimisation step of the default configuration spend its time?

Builds the model exactly as ``nir register`` does (LightningCLI over the same config files) on a
pair, then times the training step over ``--steps`` steps (after ``--warmup`` untimed ones) and
prints a Markdown table. The step is the training step's own code: the sampler, then
``RegistrationModule.model_step`` (which is :func:`nir_lightning.losses.registration_objective`
with the module's transform, images, similarity, folding penalty, ``lam``, mask and generator),
backward and Adam. Inside the objective, the field's forward evaluations (lattice/points and
det J stencil points) and the similarity are timed by wrapping them, not by re-implementing
the objective, so what is profiled is what is trained.

    python benchmarks/profile_step.py                       # 2 mm brain pair, CPU
    python benchmarks/profile_step.py --demo --steps 1 --warmup 0
    python benchmarks/profile_step.py --fixed F --moving M -c configs/model/diffeomorphic.yaml --device cuda

Run it alone on an idle machine: the figures are wall-clock.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
PAIR = REPO.parent / "shared" / "data" / "brain-pair" / "2mm"

SAMPLER = "sampler (lattice / points)"
OBJECTIVE = "objective forward (registration_objective)"
FIELD = "  of which: field forward (sample + det J points)"
SIMILARITY = "  of which: similarity"
BACKWARD = "backward"
OPTIMIZER = "Adam step"
TOP_LEVEL = (SAMPLER, OBJECTIVE, BACKWARD, OPTIMIZER)


class Timer:
    """Wall-clock totals per part, synchronising the device around each part."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.enabled = False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            if self.enabled:
                self.totals[name] += time.perf_counter() - t0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--demo", action="store_true", help="the built-in synthetic phantom pair (no data needed)")
    src.add_argument("--fixed", default=None, help=f"fixed image (default: the 2 mm brain pair under {PAIR})")
    p.add_argument("--moving", default=None, help="moving image (with --fixed)")
    p.add_argument("-c", "--config", action="append", default=[], help="config YAML (repeatable), as for nir register")
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--phase", type=int, choices=(1, 2), default=1, help="hybrid configs: profile phase 2 (NF2 on mini-patches)")
    p.add_argument("--progress", type=float, default=1.0,
                   help="how far into the fit (0-1): which stage a coarse-to-fine sampler is in (default: the last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if (args.fixed is None) != (args.moving is None):
        p.error("give both --fixed and --moving (or neither: the 2 mm brain pair, or --demo)")
    return args


def build_model(args: argparse.Namespace) -> Any:
    """The :class:`~nir_lightning.training.module.RegistrationModule` of ``nir register`` with
    the pair attached, on ``args.device``."""
    from nir_lightning.training.hybrid_callback import apply_phase
    from nir_lightning.training.lightning_cli import NIRCLI, quiet_third_party

    quiet_third_party()
    cli_args: list[str] = []
    for c in args.config:
        cli_args += ["-c", c]
    if args.demo:
        cli_args += ["--data.demo=true", f"--data.demo_dir={tempfile.mkdtemp(prefix='nir_profile_demo_')}"]
    else:
        cli_args += [f"--data.fixed={args.fixed or PAIR / 'subjA_t1.nii.gz'}", f"--data.moving={args.moving or PAIR / 'subjB_t1.nii.gz'}"]
    cli_args += [f"--seed_everything={args.seed}", f"--model.seed={args.seed}"]
    argv0, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when args and sys.argv both hold options
    try:
        cli = NIRCLI(cli_args, run=False, trainer_defaults={"logger": False, "enable_checkpointing": False})
    finally:
        sys.argv = argv0
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    model.attach_pair(dm.pair)
    if args.phase == 2:
        if model.schedule is None:
            raise SystemExit("profile_step.py: --phase 2 needs a hybrid config (model.field2 and model.schedule)")
        apply_phase(model, 2, model.schedule)
    return model.to(args.device)


def instrument(model: Any, timer: Timer) -> None:
    """Time the field's forward evaluations and the similarity inside ``model.model_step``
    without changing what it computes (an instance attribute wrapping ``transform``; hooks)."""
    transform: Callable[[Tensor], Tensor] = model.transform

    def timed_transform(x: Tensor) -> Tensor:
        with timer.part(FIELD):
            return transform(x)

    model.transform = timed_transform  # model_step passes self.transform to the objective
    with_jacobian: Callable[[Tensor], tuple[Tensor, Tensor]] = model.transform_with_jacobian

    def timed_with_jacobian(x: Tensor) -> tuple[Tensor, Tensor]:
        with timer.part(FIELD):
            return with_jacobian(x)

    model.transform_with_jacobian = timed_with_jacobian
    starts: list[float] = []

    def pre_hook(*_: Any) -> None:
        timer.sync()
        starts.append(time.perf_counter())

    def post_hook(*_: Any) -> None:
        timer.sync()
        if timer.enabled:
            timer.totals[SIMILARITY] += time.perf_counter() - starts.pop()
        else:
            starts.pop()

    model.similarity.register_forward_pre_hook(pre_hook)
    model.similarity.register_forward_hook(post_hook)


def main(argv: list[str] | None = None) -> int:
    from nir_lightning.training.schedule import build_adam

    args = parse_args(argv)
    model = build_model(args)
    dev = torch.device(args.device)
    timer = Timer(dev)
    instrument(model, timer)
    opt = build_adam([{"params": [p for p in model.parameters() if p.requires_grad]}], model.lr)  # as configure_optimizers
    shape = model.shape
    points = stencil = 0
    kind = ""
    for step in range(args.warmup + args.steps):
        timer.enabled = step >= args.warmup
        gen = model._generator(step)  # the generator of training_step at global step `step`
        with timer.part(SAMPLER):
            sample = model.sampler.sample(shape, generator=gen, mask=model.mask, progress=args.progress)
        with timer.part(OBJECTIVE):
            out = model.model_step(sample, gen)
        with timer.part(BACKWARD):
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
        with timer.part(OPTIMIZER):
            opt.step()
        points, kind = sample.points[..., 0].numel(), "lattice" if sample.is_grid else "random"
        extra = model.folding.needs_extra_points(sample)
        per_point = {"central": 6, "forward": 4, "analytic": 1}[model.folding.stencil]
        stencil = model.folding.jacobian_points * per_point if extra else 0
    total = sum(timer.totals[name] for name in TOP_LEVEL)
    print(f"pair {tuple(shape)}, {points} {kind} points + {stencil} det J point evaluations per step "
          f"({model.folding.stencil}), field {type(model.field).__name__}, sampler "
          f"{type(model.sampler).__name__} at progress {args.progress}, device {args.device}, {torch.get_num_threads()} threads, {args.steps} timed steps")
    print("| part | ms / step | share |\n|---|---|---|")
    for name in (SAMPLER, OBJECTIVE, FIELD, SIMILARITY, BACKWARD, OPTIMIZER):
        t = timer.totals[name]
        print(f"| {name} | {1000 * t / args.steps:.1f} | {100 * t / total:.0f} % |")
    print(f"| **total** | **{1000 * total / args.steps:.1f}** | 100 % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
