"""The smoothness priors on known fields: zero where they must be, the analytic value on affine and sine warps."""

from __future__ import annotations

import math

import pytest
import torch

from nir_lightning.coords import normalized_to_voxel
from nir_lightning.core.jacobian import jacobian_forward
from nir_lightning.errors import InputError
from nir_lightning.losses import FoldingPenalty, Similarity, SmoothnessPenalty, registration_objective
from nir_lightning.losses.smoothness import bending_energy_lattice, diffusion_energy, log_det_energy
from nir_lightning.sampling import DownsizeSampler, RandomSampler


def lattice(n: int, h: float) -> torch.Tensor:
    """Voxel positions ``(1, n, n, n, 3)`` of a lattice of step ``h``."""
    ax = torch.arange(n, dtype=torch.float64) * h
    return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1)[None]


@pytest.mark.parametrize("kind", ["bending", "diffusion", "logdet"])
def test_translation_costs_nothing_and_has_no_gradient(kind: str) -> None:
    t = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64, requires_grad=True)
    value = SmoothnessPenalty(kind).lattice(lattice(6, 1.0) + t, (1.0, 1.0, 1.0))
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-12)
    assert t.grad is not None and float(t.grad.abs().max()) < 1e-12


def test_affine_map_values() -> None:
    a = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.05, 0.0, 1.1]], dtype=torch.float64)
    phi = lattice(6, 2.0) @ a.T + 3.0
    assert float(SmoothnessPenalty("bending").lattice(phi, (2.0, 2.0, 2.0))) == pytest.approx(0.0, abs=1e-12)
    diff = float(SmoothnessPenalty("diffusion").lattice(phi, (2.0, 2.0, 2.0)))
    assert diff == pytest.approx(float((a - torch.eye(3, dtype=torch.float64)).square().sum()), rel=1e-9)
    logdet = float(SmoothnessPenalty("logdet").lattice(phi, (2.0, 2.0, 2.0)))
    assert logdet == pytest.approx(math.log(float(torch.linalg.det(a))) ** 2, rel=1e-9)


def test_sine_warp_bending_value_and_gradient() -> None:
    """``phi_0 = x_0 + A sin(w x_0)``: bending energy ``A^2 w^4 / 2`` on average over whole periods,
    and its derivative in ``A`` is ``A w^4``."""
    period, h = 8.0, 0.125
    w = 2 * math.pi / period
    n = int(2 * period / h) + 1  # two whole periods
    x = lattice(n, h)[:, :, :3, :3]  # the warp varies along axis 0 only
    amp = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    phi = x.clone()
    phi = torch.cat([phi[..., :1] + amp * torch.sin(w * x[..., :1]), phi[..., 1:]], dim=-1)
    value = bending_energy_lattice(jacobian_forward(phi, (h, h, h)), (h, h, h))
    value.backward()
    value = value.detach()
    expected = 0.7**2 * w**4 / 2
    assert float(value) == pytest.approx(expected, rel=0.02)
    assert amp.grad is not None and float(amp.grad) == pytest.approx(0.7 * w**4, rel=0.02)


def test_point_priors_on_jacobians() -> None:
    jac = torch.diag(torch.tensor([2.0, 1.0, 0.5]))[None]
    assert float(diffusion_energy(jac)) == pytest.approx(1.25)
    assert float(log_det_energy(jac)) == pytest.approx(0.0, abs=1e-12)
    assert float(SmoothnessPenalty("bending").points(jac)) == 0.0  # needs neighbours


def test_objective_adds_alpha_times_prior() -> None:
    """The objective's loss grows by ``alpha * smooth`` for a sine-warped field, on a lattice and on points."""
    shape = (12, 12, 12)
    img = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))

    def warp(x: torch.Tensor) -> torch.Tensor:
        return x + 0.05 * torch.sin(3 * x[..., :1]).expand_as(x)

    gen = torch.Generator().manual_seed(1)
    for sample in (DownsizeSampler(stride=2).sample(shape, generator=gen), RandomSampler(num_points=500).sample(shape, generator=gen)):
        common = {"similarity": Similarity("lncc", window=3), "folding": FoldingPenalty(), "lam": 1.0}
        plain = registration_objective(warp, img, img, sample, **common)  # type: ignore[arg-type]
        smooth = registration_objective(warp, img, img, sample, smoothness=SmoothnessPenalty("diffusion"), alpha=2.0, **common)  # type: ignore[arg-type]
        assert float(smooth["smooth"]) > 0
        assert float(smooth["loss"]) == pytest.approx(float(plain["loss"]) + 2.0 * float(smooth["smooth"]), rel=1e-6)
        assert float(plain["smooth"]) == 0.0  # no prior, no term


def test_lattice_prior_matches_voxel_units() -> None:
    """The lattice prior reads phi in fixed voxels: the same field on a finer grid has the same diffusion value."""
    shape = (16, 16, 16)
    sample = DownsizeSampler(stride=2).sample(shape, generator=torch.Generator().manual_seed(0))
    phi = normalized_to_voxel(sample.points * 1.1, shape)  # a 10 % scaling about the centre
    assert sample.spacing is not None
    assert float(SmoothnessPenalty("diffusion").lattice(phi, sample.spacing)) == pytest.approx(3 * 0.1**2, rel=1e-5)


def _sine_warp_vox(n: int, size_mm: float, amp_mm: float, w_per_mm: float) -> torch.Tensor:
    """``phi(x) = x + amp sin(w x_0) e_0`` (x in mm) on an ``n^3`` lattice of voxels of ``size_mm``, in voxels."""
    idx = torch.arange(n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), -1)[None]
    disp = torch.zeros_like(grid)
    disp[..., 0] = amp_mm * torch.sin(w_per_mm * grid[..., 0] * size_mm) / size_mm
    return grid + disp


def test_bending_is_per_millimetre_so_one_alpha_fits_every_voxel_size() -> None:
    """The same anatomy's warp sampled at 1 mm and at 2 mm has the same bending energy, A^2 w^4 / 2 per mm^4
    (to the finite differences' error); taken per voxel, the 2 mm one would read 4 times larger."""
    amp, w = 0.5, 2 * math.pi / 24  # a 24 mm wave of 0.5 mm
    want = amp**2 * w**4 / 2
    prior = SmoothnessPenalty("bending")
    one = float(prior.lattice(_sine_warp_vox(48, 1.0, amp, w), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)))
    two = float(prior.lattice(_sine_warp_vox(24, 2.0, amp, w), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)))
    assert one == pytest.approx(want, rel=0.05)
    assert two == pytest.approx(want, rel=0.1)
    assert two == pytest.approx(one, rel=0.1)
    per_voxel = float(prior.lattice(_sine_warp_vox(24, 2.0, amp, w), (1.0, 1.0, 1.0)))
    assert per_voxel == pytest.approx(4 * two, rel=1e-6)


def test_dimensionless_priors_do_not_depend_on_the_voxel_size() -> None:
    shape = (16, 16, 16)
    sample = DownsizeSampler(stride=2).sample(shape, generator=torch.Generator().manual_seed(0))
    phi = normalized_to_voxel(sample.points * 1.1, shape)
    assert sample.spacing is not None
    for kind in ("diffusion", "logdet"):
        prior = SmoothnessPenalty(kind)  # type: ignore[arg-type]
        assert float(prior.lattice(phi, sample.spacing, (2.0, 2.0, 2.0))) == pytest.approx(float(prior.lattice(phi, sample.spacing)), rel=1e-5)


def test_unknown_kind_names_the_options() -> None:
    with pytest.raises(InputError, match="smoothness must be one of 'none', 'bending'"):
        SmoothnessPenalty("tv")  # type: ignore[arg-type]
