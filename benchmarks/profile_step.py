"""Where does one optimisation step of the default configuration spend its time?

Builds the default model exactly as ``nir register`` does (LightningCLI, no extra configs) on a
pair, then times the parts of ``RegistrationModule.model_step`` plus backward and Adam over
``--steps`` steps (after ``--warmup`` untimed ones) and prints a Markdown table.

    python benchmarks/profile_step.py                       # 2 mm brain pair, CPU
    python benchmarks/profile_step.py --fixed F --moving M --device cuda

Run it alone on an idle machine: the figures are wall-clock.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PAIR = REPO.parent / "shared" / "data" / "brain-pair" / "2mm"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixed", default=str(PAIR / "subjA_t1.nii.gz"))
    p.add_argument("--moving", default=str(PAIR / "subjB_t1.nii.gz"))
    p.add_argument("-c", "--config", action="append", default=[], help="config YAML (repeatable), as for nir register")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from nir_lightning.cli import NIRCLI
    from nir_lightning.coords import normalized_to_voxel
    from nir_lightning.warp import sample_image

    cli_args = [f"--data.fixed={args.fixed}", f"--data.moving={args.moving}"]
    for c in args.config:
        cli_args += ["-c", c]
    argv0, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = NIRCLI(cli_args, run=False, trainer_defaults={"logger": False, "enable_checkpointing": False})
    finally:
        sys.argv = argv0
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    model.attach_pair(dm.pair)
    model.to(args.device)
    opt = torch.optim.Adam(model.field.parameters(), lr=model.lr)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = {}
    shape = model.shape
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        marks = [("", time.perf_counter())]

        def mark(name: str, marks: list[tuple[str, float]] = marks) -> None:
            sync()
            marks.append((name, time.perf_counter()))

        gen = model._generator(step)
        sample = model.sampler.sample(shape, generator=gen, mask=model.mask)
        mark("sampler (lattice + stencil points)")
        if not sample.is_grid:
            raise SystemExit("profile_step.py times the lattice samplers (downsize, minipatch); got a random sampler")
        phi = model.transform(sample.points)
        mark("field forward on the lattice")
        reg = model.lattice_penalty(sample, normalized_to_voxel(phi, shape))
        mark("det J + penalty on the lattice")
        if model.needs_extra_points(sample):
            reg = reg + model.extra_penalty(gen)
            mark("stencil points: field forward + det J")
        warped = sample_image(model.moving, phi)
        fixed = sample_image(model.fixed, sample.points)
        mark("warp (grid_sample moving + fixed)")
        sim = model.similarity(fixed, warped, is_grid=True)
        loss = sim + model.lam * reg
        mark("LNCC")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        opt.step()
        mark("Adam step")
        if timed:
            for (_, t0), (name, t1) in itertools.pairwise(marks):
                times[name] += t1 - t0
        counts["points"] = sample.points[..., 0].numel()
    total = sum(times.values())
    per_point = 6 if model.jacobian_stencil == "central" else 4
    print(f"pair {tuple(shape)}, {counts['points']} lattice points + {model.jacobian_points} x {per_point} stencil points per step, "
          f"device {args.device}, {torch.get_num_threads()} threads, {args.steps} timed steps")
    print("| part | ms / step | share |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1000 * t / args.steps:.1f} | {100 * t / total:.0f} % |")
    print(f"| **total** | **{1000 * total / args.steps:.1f}** | 100 % |")


if __name__ == "__main__":
    main()
