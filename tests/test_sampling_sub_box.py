"""A step that samples part of the lattice box (``PyramidSampler.box_fractions``): its lattice is a
part of the whole box's, it holds about the fraction asked, the parts cover the box over the
steps, the folding penalty's extra points follow it at their usual density, and a fraction of 1
changes nothing (issue 24: the diffeomorphic config's time)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from nir_lightning.coords import normalized_to_voxel
from nir_lightning.errors import InputError
from nir_lightning.losses import FoldingPenalty, Similarity, registration_objective
from nir_lightning.sampling import (
    CoordinateSample,
    PyramidSampler,
    RandomSampler,
    foreground_box,
    points_in_box,
    random_sub_box,
)

SHAPE = (40, 44, 38)


def brain_mask() -> torch.Tensor:
    """An ellipsoid well inside the grid (its box is smaller than the image)."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in SHAPE], indexing="ij"), -1)
    centre, radii = torch.tensor([20.0, 22.0, 19.0]), torch.tensor([15.0, 16.0, 13.0])
    return (((idx - centre) / radii) ** 2).sum(-1) <= 1


def voxels(sample: CoordinateSample) -> set[tuple[int, int, int]]:
    vox = normalized_to_voxel(sample.points.double(), SHAPE).reshape(-1, 3)
    assert float((vox - vox.round()).abs().max()) < 1e-4  # voxel centres (float32 points)
    return {tuple(int(v) for v in row) for row in vox.round().long()}


def one_stage(fraction: float | None) -> PyramidSampler:
    return PyramidSampler(
        strides=[2], sigmas=[0.0], fractions=[1.0], levels=[3], max_points=[10**6], box_fractions=None if fraction is None else [fraction]
    )


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_a_part_of_the_box_is_a_part_of_its_lattice_of_about_that_volume(fraction: float) -> None:
    mask = brain_mask()
    whole_sampler, part_sampler = one_stage(None), one_stage(fraction)
    for step in range(10):
        whole = whole_sampler.sample(SHAPE, generator=torch.Generator().manual_seed(step), mask=mask, step=step)
        part = part_sampler.sample(SHAPE, generator=torch.Generator().manual_seed(step), mask=mask, step=step)
        assert whole.focus is None and part.focus is not None
        # the same stratified offset (a function of seed and step): the part's points are the whole lattice's
        assert voxels(part) <= voxels(whole)
        lo, hi = part.focus
        assert all(lo[a] <= v[a] < hi[a] for v in voxels(part) for a in range(3))
        share = part.num_points / whole.num_points
        assert abs(share - fraction) < 0.1, share
        # the similarity reads the images by slicing the part, as it reads the whole box
        assert part.voxel_stop == hi and part.spacing == (2.0, 2.0, 2.0)


def test_the_parts_cover_the_whole_box_over_the_steps() -> None:
    mask = brain_mask()
    sampler = one_stage(0.5)
    inside = torch.zeros(SHAPE, dtype=torch.long)
    steps = 120
    for step in range(steps):
        part = sampler.sample(SHAPE, generator=torch.Generator().manual_seed(step), mask=mask, step=step)
        assert part.focus is not None
        (l0, l1, l2), (h0, h1, h2) = part.focus
        inside[l0:h0, l1:h1, l2:h2] += 1
    # every foreground voxel in some step's parts, the middle in all (the box's corners, background
    # outside the anatomy, in the fewest: a part's place is drawn along each axis)
    assert int(inside[mask].min()) > 0
    assert int(inside[tuple(n // 2 for n in SHAPE)]) == steps


def test_random_sub_box_keeps_the_lattice_and_its_bounds() -> None:
    box = ((3, 1, 0), (27, 33, 26))  # 8, 11 and 9 stride-3 steps (the last axis's end not on the lattice)
    for seed in range(30):
        lo, hi = random_sub_box(box, 3, 0.5, torch.Generator().manual_seed(seed))
        for a in range(3):
            assert box[0][a] <= lo[a] < hi[a] <= box[1][a]
            assert (lo[a] - box[0][a]) % 3 == 0  # a whole number of steps from the box's corner
            assert -(-(hi[a] - lo[a]) // 3) >= 6  # at least 6 steps (an LNCC window and more)
    assert random_sub_box(box, 3, 1.0, torch.Generator()) == box


def test_a_fraction_of_one_draws_nothing_and_changes_nothing() -> None:
    mask = brain_mask()
    for sampler in (PyramidSampler(box_fractions=None), PyramidSampler(box_fractions=[1.0, 1.0, 1.0])):
        g = torch.Generator().manual_seed(3)
        s = sampler.sample(SHAPE, generator=g, mask=mask, progress=0.9, step=7)
        assert s.focus is None
        after = torch.rand(4, generator=g)
        ref_g = torch.Generator().manual_seed(3)
        ref = PyramidSampler(box_fractions=None).sample(SHAPE, generator=ref_g, mask=mask, progress=0.9, step=7)
        assert torch.equal(s.points, ref.points) and torch.equal(after, torch.rand(4, generator=ref_g))


def test_only_the_stages_asked_for_sample_a_part() -> None:
    sampler = PyramidSampler(box_fractions=[1.0, 1.0, 0.5])
    mask = brain_mask()
    assert sampler.sample(SHAPE, generator=torch.Generator().manual_seed(0), mask=mask, progress=0.5).focus is None
    assert sampler.sample(SHAPE, generator=torch.Generator().manual_seed(0), mask=mask, progress=0.9).focus is not None
    assert "box_fractions=[1.0, 1.0, 0.5]" in repr(sampler) and "box_fractions" not in repr(PyramidSampler(box_fractions=None))


@pytest.mark.parametrize(
    ("fractions", "match"),
    [([0.5, 1.0], "one per stage"), ([1.0, 1.0, 0.0], r"in \(0, 1\]"), ([1.0, 1.5, 1.0], r"in \(0, 1\]"), ([1.0, math.nan, 1.0], r"in \(0, 1\]")],
)
def test_bad_box_fractions_are_named(fractions: list[float], match: str) -> None:
    with pytest.raises(InputError, match=match):
        PyramidSampler(box_fractions=fractions)


def test_points_in_a_box_keep_the_density_inside_it() -> None:
    mask = brain_mask()
    box = ((0, 0, 0), (20, 44, 38))  # the half of the image below the ellipsoid's centre on axis 0
    share = float(mask[:20].sum()) / float(mask.sum())
    drawn = RandomSampler(num_points=4000).sample(SHAPE, generator=torch.Generator().manual_seed(0), mask=mask)
    s = CoordinateSample(points=points_in_box(drawn.points, SHAPE, box), spacing=None)
    assert abs(s.num_points - 4000 * share) < 150 and s.points.shape[2:] == (1, 1, 3)
    for v in voxels(s):
        assert mask[v] and v[0] < 20


def test_folding_extra_points_follow_the_focus() -> None:
    mask = brain_mask()
    tight = foreground_box(mask)
    focus = ((tight[0][0], tight[0][1], tight[0][2]), (20, tight[1][1], tight[1][2]))
    seen: list[torch.Tensor] = []

    def with_jacobian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(x.detach().reshape(-1, 3))
        return x, torch.eye(3).expand(*x.shape, 3, 3)

    penalty = FoldingPenalty(margin=0.3, jacobian_points=2000, stencil="analytic")
    assert float(penalty.extra(lambda x: x, SHAPE, mask, torch.Generator().manual_seed(0), with_jacobian, focus=focus)) == 0.0
    pts = normalized_to_voxel(seen[-1].double(), SHAPE)
    assert float(pts[:, 0].max()) < 20 - 0.5 + 1e-6  # jittered inside their voxels, all of which lie in the focus
    assert abs(pts.shape[0] - 1000) < 150  # about half the foreground lies in the focus: half the points
    penalty.extra(lambda x: x, SHAPE, mask, torch.Generator().manual_seed(0), with_jacobian)
    assert seen[-1].shape[0] == 2000 and float(normalized_to_voxel(seen[-1].double(), SHAPE)[:, 0].max()) > 20


def test_the_objective_draws_the_det_j_points_of_a_part_in_it() -> None:
    mask = brain_mask()
    sampler = PyramidSampler(strides=[2], sigmas=[0.0], fractions=[1.0], levels=None, max_points=[10**6], box_fractions=[0.4])
    sample = sampler.sample(SHAPE, generator=torch.Generator().manual_seed(1), mask=mask, step=5)
    assert sample.focus is not None
    seen: list[torch.Tensor] = []

    def with_jacobian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(x.detach().reshape(-1, 3))
        return x, torch.eye(3).expand(*x.shape, 3, 3)

    img = torch.rand(1, 1, *SHAPE)
    out = registration_objective(
        lambda x: x, img, img, sample, similarity=Similarity("lncc", window=3), folding=FoldingPenalty(jacobian_points=500, stencil="analytic"),
        lam=1.0, mask=mask, generator=torch.Generator().manual_seed(2), transform_with_jacobian=with_jacobian,
    )
    assert round(float(out["sim"]), 4) == -1.0 and float(out["jedt"]) == 0.0
    (lo, hi), pts = sample.focus, normalized_to_voxel(seen[0].double(), SHAPE)
    for a in range(3):
        assert float(pts[:, a].min()) >= lo[a] - 0.5 - 1e-6 and float(pts[:, a].max()) <= hi[a] - 0.5 + 1e-6
    assert 0 < pts.shape[0] < 500


def config_cli(configs: list[str], configs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> Any:
    """``NIRCLI`` built, not run, from ``configs`` (in that order) on the demo pair, without a logger."""
    import sys

    from nir_lightning.training.lightning_cli import NIRCLI

    args = [a for c in configs for a in ("-c", str(configs_dir / c))]
    args += ["-c", str(configs_dir / "logger" / "none.yaml"), "--data.demo=true", f"--trainer.default_root_dir={tmp_path}", *extra]
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI warns when args and sys.argv both hold options
    return NIRCLI(args, run=False)


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        (["model/diffeomorphic.yaml"], [1.0, 0.5, 0.5]),
        (["model/displacement.yaml", "model/diffeomorphic.yaml"], [1.0, 0.5, 0.5]),
        (["model/diffeomorphic.yaml", "sampler/pyramid.yaml"], [1.0, 0.5, 0.5]),  # pyramid.yaml leaves the parts alone
        (["model/displacement.yaml"], [1.0, 0.5, 0.75]),
        ([], [1.0, 0.5, 0.75]),  # the module's default sampler
        (["sampler/pyramid.yaml"], [1.0, 0.5, 0.75]),
        (["model/displacement.yaml", "sampler/pyramid_fast.yaml"], [1.0, 1.0, 0.5]),
        (["sampler/pyramid_fast.yaml", "model/displacement.yaml"], [1.0, 1.0, 0.5]),
    ],
)
def test_configs_set_the_parts_in_any_order(configs: list[str], expected: list[float], configs_dir, tmp_path, monkeypatch) -> None:
    sampler = config_cli(configs, configs_dir, tmp_path, monkeypatch).model.sampler
    assert isinstance(sampler, PyramidSampler) and sampler.box_fractions == expected
    assert sampler.strides == [4, 3, 2] and sampler.fractions == pytest.approx([0.273, 0.512, 0.215])


@pytest.mark.parametrize(
    ("configs", "steps"),
    [
        (["model/diffeomorphic.yaml"], 380),
        (["trainer/cpu.yaml", "model/diffeomorphic.yaml"], 380),
        (["model/diffeomorphic.yaml", "trainer/cpu.yaml"], 380),
        (["model/diffeomorphic.yaml", "trainer/gpu.yaml"], 380),
        (["model/displacement.yaml", "trainer/cpu.yaml"], 293),
        (["trainer/cpu.yaml"], 293),
        ([], 293),
        (["model/diffeomorphic.yaml", "model/symmetric.yaml"], 380),
        (["model/siren.yaml", "trainer/cpu.yaml"], 250),
        (["trainer/cpu.yaml", "model/hybrid.yaml"], 250),
        (["model/displacement.yaml", "model/hybrid_diffeomorphic.yaml"], 250),
        (["model/siren_diffeomorphic.yaml"], 250),
    ],
)
def test_the_fit_length_is_the_modes_in_any_order(configs: list[str], steps: int, configs_dir, tmp_path, monkeypatch) -> None:
    """The diffeomorphic config fits 380 steps, the default 293, the SIREN and hybrid files the 250
    they were measured with, whichever order the trainer config comes in (0.2.24: the trainer
    configs no longer set max_steps)."""
    extra = ["--trainer.accelerator=cpu"] if "trainer/gpu.yaml" in configs else []  # the config's steps, on a machine without a GPU
    assert config_cli(configs, configs_dir, tmp_path, monkeypatch, *extra).trainer.max_steps == steps


@pytest.mark.parametrize(("configs", "by_stage"), [([], (80, 151, 62)), (["model/diffeomorphic.yaml"], (104, 195, 81))])
def test_the_default_pyramid_takes_its_documented_steps_by_stage(configs: list[str], by_stage: tuple[int, ...], configs_dir, tmp_path, monkeypatch) -> None:
    """configs/sampler/pyramid.yaml and the README state the steps of each stage (0.2.25: 80 / 151 / 62
    of 293, the diffeomorphic config's 104 / 195 / 81 of 380), as the module's progress
    (global_step / max_steps) reaches the sampler."""
    cli = config_cli(configs, configs_dir, tmp_path, monkeypatch)
    n, sampler = cli.trainer.max_steps, cli.model.sampler
    stages = [sampler.stage(step / n) for step in range(n)]
    assert tuple(stages.count(k) for k in range(3)) == by_stage
