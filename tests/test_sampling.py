"""Coordinate samplers and the chunked full grid."""

from __future__ import annotations

import math

import pytest
import torch

from nir_lightning.coords import normalized_to_voxel
from nir_lightning.core.chunked import grid_chunks as full_grid_chunks
from nir_lightning.core.resample import sample_image
from nir_lightning.errors import InputError
from nir_lightning.sampling import (
    CoordinateSample,
    DownsizeSampler,
    MinipatchSampler,
    PyramidSampler,
    RandomSampler,
    budget_stride,
)

SHAPE = (13, 17, 11)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_voxels(sample: CoordinateSample, shape=SHAPE) -> torch.Tensor:
    """Voxel indices of a sample; they must be integers (samples sit on voxel centres)."""
    vox = normalized_to_voxel(sample.points.double(), shape)
    assert float((vox - vox.round()).abs().max()) < 1e-4
    return vox.round().long()


def assert_in_unit_cube(sample: CoordinateSample) -> None:
    assert float(sample.points.min()) >= -1.0 - 1e-6
    assert float(sample.points.max()) <= 1.0 + 1e-6


# -- RandomSampler ---------------------------------------------------------------------------
def test_random_sampler_shape_range_and_determinism():
    s = RandomSampler(num_points=500).sample(SHAPE, generator=gen(0))
    assert s.points.shape == (1, 500, 1, 1, 3)
    assert s.spacing is None and not s.is_grid and s.num_points == 500
    assert_in_unit_cube(s)
    vox = as_voxels(s)
    assert int(vox.min()) >= 0
    for a, n in enumerate(SHAPE):
        assert int(vox[..., a].max()) <= n - 1
        assert len(vox[..., a].unique()) > n // 2  # spread over the axis
    again = RandomSampler(num_points=500).sample(SHAPE, generator=gen(0))
    other = RandomSampler(num_points=500).sample(SHAPE, generator=gen(1))
    assert torch.equal(s.points, again.points)
    assert not torch.equal(s.points, other.points)


def test_random_sampler_mask_restricts_points():
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[2:5, 10:12, 3] = True  # 6 voxels
    mask[9, 1, 8] = True  # and one more elsewhere
    s = RandomSampler(num_points=400).sample(SHAPE, generator=gen(3), mask=mask)
    vox = as_voxels(s).reshape(-1, 3)
    assert bool(mask[vox[:, 0], vox[:, 1], vox[:, 2]].all())
    assert len({tuple(v) for v in vox.tolist()}) == 7  # all 7 mask voxels are drawn
    # an empty mask falls back to the whole image
    empty = torch.zeros(SHAPE, dtype=torch.bool)
    s2 = RandomSampler(num_points=400).sample(SHAPE, generator=gen(3), mask=empty)
    assert len({tuple(v) for v in as_voxels(s2).reshape(-1, 3).tolist()}) > 300


def test_random_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        RandomSampler(num_points=1)


# -- DownsizeSampler --------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_downsize_sampler_lattice(stride):
    for seed in range(4):
        s = DownsizeSampler(stride=stride).sample(SHAPE, generator=gen(seed))
        assert s.spacing == (float(stride),) * 3 and s.is_grid
        assert_in_unit_cube(s)
        vox = as_voxels(s)
        offset = vox[0, 0, 0, 0]
        assert all(0 <= int(o) < stride for o in offset)
        # promised shape: ceil((n - offset) / stride) per axis
        want = tuple(math.ceil((n - int(o)) / stride) for n, o in zip(SHAPE, offset))
        assert tuple(s.points.shape) == (1, *want, 3)
        # neighbours along axis a are `stride` voxels apart on component a only
        for a in range(3):
            step = torch.diff(vox[0].double(), dim=a)
            expected = torch.zeros(3, dtype=torch.float64)
            expected[a] = stride
            assert torch.equal(step, expected.expand_as(step)), (a, step.unique())
        # and the lattice reaches the last voxel within one stride
        for a, n in enumerate(SHAPE):
            assert n - stride <= int(vox[..., a].max()) <= n - 1


def test_downsize_offsets_vary_with_the_generator():
    offsets = set()
    for seed in range(30):
        s = DownsizeSampler(stride=3).sample(SHAPE, generator=gen(seed))
        offsets.add(tuple(as_voxels(s)[0, 0, 0, 0].tolist()))
    assert len(offsets) >= 8, offsets
    for a in range(3):
        assert {o[a] for o in offsets} == {0, 1, 2}


def test_downsize_sampler_visits_every_voxel_over_offsets():
    stride = 2
    seen = torch.zeros(SHAPE, dtype=torch.bool)
    for seed in range(60):
        vox = as_voxels(DownsizeSampler(stride=stride).sample(SHAPE, generator=gen(seed))).reshape(-1, 3)
        seen[vox[:, 0], vox[:, 1], vox[:, 2]] = True
    assert bool(seen.all())


@pytest.mark.parametrize("stride", [2, 3])
def test_fit_steps_stratify_the_lattice_offsets(stride: int):
    """Given the fit's step, each cycle of stride**3 consecutive steps visits every sub-lattice
    once (every voxel exactly once per cycle), in an order that depends on the seed; the same
    (seed, step) gives the same lattice, whatever ran before (a resumed fit)."""
    n = stride**3
    sampler = DownsizeSampler(stride=stride)

    def visits(seed: int, steps: range) -> torch.Tensor:
        count = torch.zeros(SHAPE, dtype=torch.long)
        for step in steps:
            vox = as_voxels(sampler.sample(SHAPE, generator=gen(1000 * seed + step), step=step, seed=seed)).reshape(-1, 3)
            count[vox[:, 0], vox[:, 1], vox[:, 2]] += 1
        return count

    for cycle in range(3):
        counts = visits(0, range(cycle * n, (cycle + 1) * n))
        inner = counts[: SHAPE[0] // stride * stride, : SHAPE[1] // stride * stride, : SHAPE[2] // stride * stride]
        assert bool((inner == 1).all()), f"cycle {cycle}: visits {inner.unique().tolist()}"

    def origin(seed: int, step: int) -> tuple[int, ...]:
        return tuple(as_voxels(sampler.sample(SHAPE, generator=gen(step), step=step, seed=seed))[0, 0, 0, 0].tolist())

    order0, order1 = [origin(0, t) for t in range(n)], [origin(1, t) for t in range(n)]
    assert order0 != order1 and sorted(order0) == sorted(order1)
    assert origin(0, 5) == order0[5]  # a function of (seed, step) alone
    # i.i.d. offsets over the same number of steps leave sub-lattices unvisited or visited twice
    iid = torch.zeros(SHAPE, dtype=torch.long)
    for step in range(n):
        vox = as_voxels(sampler.sample(SHAPE, generator=gen(step))).reshape(-1, 3)
        iid[vox[:, 0], vox[:, 1], vox[:, 2]] += 1
    assert int(iid.max()) > 1


def test_stratified_offsets_leave_the_steps_other_draws_unchanged():
    """The offset draw is taken from the step's generator either way: what the step draws next
    (the det J points) does not depend on whether the offsets are stratified."""
    a, b = gen(7), gen(7)
    DownsizeSampler(stride=2).sample(SHAPE, generator=a)
    DownsizeSampler(stride=2).sample(SHAPE, generator=b, step=3, seed=0)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_downsize_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        DownsizeSampler(stride=0)
    with pytest.raises(ValueError, match="at least 4"):
        DownsizeSampler(stride=4).sample((8, 3, 8), generator=gen())


# -- MinipatchSampler ------------------------------------------------------------------------
def test_minipatch_patches_are_full_resolution_cubes():
    p = 5
    s = MinipatchSampler(num_patches=6, patch_size=p).sample(SHAPE, generator=gen(0))
    assert s.points.shape == (6, p, p, p, 3)
    assert s.spacing == (1.0, 1.0, 1.0)
    assert_in_unit_cube(s)
    vox = as_voxels(s)
    base = torch.stack(torch.meshgrid(*[torch.arange(p)] * 3, indexing="ij"), dim=-1)
    corners = []
    for b in range(6):
        corner = vox[b, 0, 0, 0]
        assert torch.equal(vox[b], corner + base)  # contiguous, one voxel apart, axis order kept
        for a, n in enumerate(SHAPE):
            assert 0 <= int(corner[a]) <= n - p
        corners.append(tuple(corner.tolist()))
    assert len(set(corners)) > 1


def test_minipatch_patches_contain_a_mask_voxel():
    p = 4
    for where in [(6, 8, 5), (0, 0, 0), (12, 16, 10), (1, 15, 9)]:  # centre, corners, near edges
        mask = torch.zeros(SHAPE, dtype=torch.bool)
        mask[where] = True
        s = MinipatchSampler(num_patches=3, patch_size=p).sample(SHAPE, generator=gen(1), mask=mask)
        vox = as_voxels(s).reshape(3, -1, 3)
        for b in range(3):
            assert where in {tuple(v) for v in vox[b].tolist()}, (where, vox[b, 0].tolist())
            assert int(vox[b].min()) >= 0
            for a, n in enumerate(SHAPE):
                assert int(vox[b, :, a].max()) <= n - 1


def test_minipatch_patch_as_large_as_the_image():
    shape = (6, 7, 6)
    s = MinipatchSampler(num_patches=1, patch_size=6).sample(shape, generator=gen())
    vox = as_voxels(s, shape)
    assert vox[0, 0, 0, 0].tolist() == [0, int(vox[0, 0, 0, 0, 1]), 0]
    assert 0 <= int(vox[0, 0, 0, 0, 1]) <= 1


def test_minipatch_rejects_bad_arguments():
    with pytest.raises(ValueError):
        MinipatchSampler(num_patches=0)
    with pytest.raises(ValueError):
        MinipatchSampler(patch_size=1)
    with pytest.raises(ValueError, match="patch_size=8"):
        MinipatchSampler(patch_size=8).sample((10, 7, 10), generator=gen())


# -- full grid ---------------------------------------------------------------------------------
@pytest.mark.parametrize("max_points", [1, 17 * 11, 3 * 17 * 11 + 5, 10**6])
def test_full_grid_chunks_cover_every_voxel_once(max_points):
    counts = torch.zeros(SHAPE, dtype=torch.long)
    next_start = 0
    plane = SHAPE[1] * SHAPE[2]
    for sl, pts in full_grid_chunks(SHAPE, max_points=max_points):
        assert sl.start == next_start and sl.stop > sl.start
        next_start = sl.stop
        assert pts.shape == (1, sl.stop - sl.start, SHAPE[1], SHAPE[2], 3)
        assert pts[0, ..., 0].numel() <= max(max_points, plane)
        vox = normalized_to_voxel(pts.double(), SHAPE)
        assert float((vox - vox.round()).abs().max()) < 1e-4
        vox = vox.round().long().reshape(-1, 3)
        assert int(vox[:, 0].min()) == sl.start and int(vox[:, 0].max()) == sl.stop - 1
        counts.index_put_((vox[:, 0], vox[:, 1], vox[:, 2]), torch.ones(len(vox), dtype=torch.long), accumulate=True)
    assert next_start == SHAPE[0]
    assert int(counts.min()) == 1 and int(counts.max()) == 1


# -- coarse to fine --------------------------------------------------------------------------------
def test_pyramid_sampler_walks_its_stages_in_order():
    s = PyramidSampler(strides=[4, 3, 2], sigmas=[2.0, 1.0, 0.0], fractions=[1, 1, 2], levels=[2, 4, 5], box_fractions=None)
    gen = torch.Generator().manual_seed(0)
    seen = [s.sample((30, 32, 34), generator=gen, progress=p) for p in (0.0, 0.24, 0.26, 0.49, 0.51, 0.99, 1.0)]
    assert [x.spacing[0] for x in seen] == [4, 4, 3, 3, 2, 2, 2]
    assert [x.sigma for x in seen] == [2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [x.levels for x in seen] == [2, 2, 4, 4, 5, 5, 5]
    assert all(x.is_grid and x.separable for x in seen)


def test_pyramid_sampler_keeps_its_point_budget_on_finer_images():
    """A 1 mm image gets the 2 mm image's point count: the stride (and the smoothing with it) grows."""
    s = PyramidSampler(strides=[2], sigmas=[1.0], fractions=[1.0], levels=None, max_points=20_000, box_fractions=None)
    gen = torch.Generator().manual_seed(0)
    small = s.sample((40, 48, 56), generator=gen)
    mid = s.sample((80, 96, 112), generator=gen)
    large = s.sample((160, 192, 224), generator=gen)
    assert small.spacing == (2.0, 2.0, 2.0) and small.sigma == 1.0  # 13,440 points fit
    assert mid.spacing == (4.0, 4.0, 4.0) and mid.num_points == small.num_points  # 3 would hold 32,832
    assert large.spacing == (8.0, 8.0, 8.0) and large.num_points == small.num_points
    assert (mid.sigma, large.sigma) == (2.0, 4.0)
    assert budget_stride((160, 192, 224), 3, 2**17) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strides": []}, "at least one stage"),
        ({"strides": [4, 2], "sigmas": [1.0], "fractions": [1, 1], "levels": None, "max_points": 64}, "sigmas has 1 entries but strides has 2"),
        ({"strides": [4, 2], "sigmas": [1.0, 0.0], "fractions": [1, 1], "levels": None, "max_points": 64}, "box_fractions has 3 entries but strides has 2"),
        ({"strides": [0], "sigmas": [0.0], "fractions": [1.0], "levels": None, "max_points": 64}, "strides must be >= 1"),
        ({"fractions": [0.5, 0.0, 1.0]}, "fractions must be > 0"),
        ({"levels": [0, 5, 5]}, "levels must be >= 1"),
        ({"max_points": 2}, "max_points must be >= 8"),
        ({"crop_margin": -1}, "crop_margin must be >= 0"),
    ],
)
def test_pyramid_sampler_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        PyramidSampler(**kwargs)


def test_pyramid_lattice_spans_the_mask_box_and_reads_images_by_slicing():
    """crop: the lattice covers the mask's bounding box grown by crop_margin steps, every mask voxel
    is within half a step of it, and CoordinateSample.read slices what interpolation reads."""
    shape = (40, 44, 48)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[10:25, 12:30, 20:34] = True
    image = torch.rand(1, 1, *shape)
    cropped = PyramidSampler(strides=[3], sigmas=[0.0], fractions=[1.0], levels=None, max_points=2**17, box_fractions=None)
    whole = PyramidSampler(strides=[3], sigmas=[0.0], fractions=[1.0], levels=None, max_points=2**17, crop=False, box_fractions=None)
    for seed in range(4):
        c = cropped.sample(shape, generator=torch.Generator().manual_seed(seed), mask=mask)
        w = whole.sample(shape, generator=torch.Generator().manual_seed(seed), mask=mask)
        vox = normalized_to_voxel(c.points, shape)[0]
        lo = vox.reshape(-1, 3).min(dim=0).values
        hi = vox.reshape(-1, 3).max(dim=0).values
        assert (lo >= torch.tensor([10 - 6, 12 - 6, 20 - 6]) - 1e-4).all()  # 2 steps of 3 voxels
        assert (hi <= torch.tensor([24 + 6, 29 + 6, 33 + 6]) + 1e-4).all()
        assert (lo <= torch.tensor([10 - 6 + 2, 12 - 6 + 2, 20 - 6 + 2]) + 1e-4).all()  # starts within one step
        assert c.num_points < 0.55 * w.num_points
        torch.testing.assert_close(c.read(image), sample_image(image, c.points), atol=1e-5, rtol=0)
    no_mask = cropped.sample(shape, generator=torch.Generator().manual_seed(0))  # no mask: the whole image
    assert no_mask.num_points == whole.sample(shape, generator=torch.Generator().manual_seed(0), mask=mask).num_points


def test_pyramid_budget_counts_the_box():
    """A stage whose whole-image lattice would exceed the budget keeps its stride when the box fits."""
    shape = (80, 96, 112)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[20:60, 20:70, 30:80] = True
    s = PyramidSampler(strides=[2], sigmas=[0.0], fractions=[1.0], levels=None, max_points=40_000, box_fractions=None)
    assert s.sample(shape, generator=torch.Generator().manual_seed(0)).spacing == (3.0, 3.0, 3.0)
    c = s.sample(shape, generator=torch.Generator().manual_seed(0), mask=mask)
    assert c.spacing == (2.0, 2.0, 2.0) and c.num_points <= 40_000
