"""The one-pass lattice barrier and bending prior (0.2.23) give the values and the gradient of the
two-term autograd path, the known values on known fields, and the objective takes them only
where they are that pair."""

from __future__ import annotations

import math

import pytest
import torch

from nir_lightning.coords import normalized_to_voxel
from nir_lightning.core.jacobian import jacobian_forward
from nir_lightning.losses import FoldingPenalty, Similarity, SmoothnessPenalty, registration_objective
from nir_lightning.losses.lattice_terms import lattice_barrier_and_bending
from nir_lightning.sampling import DownsizeSampler


def lattice(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float64) * s for n, s in zip(shape, spacing, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None]


class _Lattice:
    def __init__(self, spacing: tuple[float, float, float]) -> None:
        self.spacing = spacing


def reference(phi: torch.Tensor, spacing: tuple[float, float, float], margin: float, voxel_size: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms as the objective took them before: autograd through the (..., 3, 3) Jacobian."""
    jac = jacobian_forward(phi, spacing)
    barrier = FoldingPenalty(margin=margin).lattice(_Lattice(spacing), phi, jac)  # type: ignore[arg-type]
    return barrier, SmoothnessPenalty("bending").lattice(phi, spacing, voxel_size, jac)


@pytest.mark.parametrize(
    ("batch", "shape", "spacing", "voxel_size"),
    [(1, (9, 7, 8), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0)), (2, (5, 6, 3), (1.0, 2.0, 3.0), (1.0, 0.8, 1.5)), (1, (3, 2, 4), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))],
)
def test_same_values_and_gradient_as_autograd(batch: int, shape: tuple[int, int, int], spacing: tuple[float, float, float], voxel_size: tuple[float, float, float]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    # squeezed (det J 0.22 before the noise) and rough: the barrier and its gradient are not 0
    phi = 0.6 * lattice(shape, spacing).expand(batch, -1, -1, -1, -1) + torch.randn(batch, *shape, 3, generator=gen, dtype=torch.float64) * 0.5
    a = phi.clone().requires_grad_()
    b = phi.clone().requires_grad_()
    ref = reference(a, spacing, 0.35, voxel_size)
    out = lattice_barrier_and_bending(b, spacing, margin=0.35, voxel_size=voxel_size)
    assert float(ref[0].detach()) > 0.01 and float(ref[1].detach()) > 0.01
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-12)
    (3.0 * ref[0] + 0.7 * ref[1]).backward()
    (3.0 * out[0] + 0.7 * out[1]).backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda p: torch.stack(lattice_barrier_and_bending(p, spacing, margin=0.35, voxel_size=voxel_size)), (phi.clone().requires_grad_(),))


def test_the_barrier_and_det_j_bit_for_bit_in_float32() -> None:
    """The det J and the barrier are the same arithmetic in the same order: equal, not close."""
    gen = torch.Generator().manual_seed(3)
    phi = (lattice((10, 9, 8), (2.0, 2.0, 2.0)) + torch.randn(1, 10, 9, 8, 3, generator=gen, dtype=torch.float64)).float()
    ref = reference(phi, (2.0, 2.0, 2.0), 0.35, (2.0, 2.0, 2.0))
    out = lattice_barrier_and_bending(phi, (2.0, 2.0, 2.0), margin=0.35, voxel_size=(2.0, 2.0, 2.0))
    assert torch.equal(out[0], ref[0])


def test_known_fields() -> None:
    # a translation: nothing to pay and no gradient
    t = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64, requires_grad=True)
    barrier, bend = lattice_barrier_and_bending(lattice((6, 6, 6), (2.0, 2.0, 2.0)) + t, (2.0, 2.0, 2.0), margin=0.35, voxel_size=(2.0, 2.0, 2.0))
    (barrier + bend).backward()
    assert float(barrier.detach()) == 0.0 and float(bend.detach()) == pytest.approx(0.0, abs=1e-12)
    assert t.grad is not None and float(t.grad.abs().max()) < 1e-12
    # an affine map squeezing volume to 0.008: no bending, the barrier pays margin - det J
    a = torch.diag(torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64))
    barrier, bend = lattice_barrier_and_bending(lattice((6, 6, 6), (1.0, 1.0, 1.0)) @ a.T, (1.0, 1.0, 1.0), margin=0.35)
    assert float(barrier) == pytest.approx(0.35 - 0.008, rel=1e-12) and float(bend) == pytest.approx(0.0, abs=1e-12)
    # phi(x) = x + A sin(w x_0) e_0 in mm (1.5 mm voxels): the bending energy averages A^2 w^4 / 2
    amp, w, n, vs = 0.6, 2 * math.pi / 24.0, 49, 1.5
    x = lattice((n, 4, 4), (1.0, 1.0, 1.0))
    phi = x.clone()
    phi[..., 0] = x[..., 0] + amp / vs * torch.sin(w * vs * x[..., 0])  # voxels: the warp's A and w are in mm
    _, bend = lattice_barrier_and_bending(phi, (1.0, 1.0, 1.0), margin=0.0, voxel_size=(vs, vs, vs))
    # forward differences of a sine read it a little low at this sampling (w h = 0.39 rad)
    assert float(bend) == pytest.approx(amp**2 * w**4 / 2, rel=0.05)


def test_a_lattice_too_thin_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 points along each lattice axis"):
        lattice_barrier_and_bending(lattice((4, 1, 4), (1.0, 1.0, 1.0)), (1.0, 1.0, 1.0), margin=0.3)


@pytest.mark.parametrize(
    ("folding", "smoothness"),
    [
        (FoldingPenalty(margin=0.35, jacobian_points=0), SmoothnessPenalty("bending")),  # the pair: one pass
        (FoldingPenalty(margin=0.35, jacobian_points=0), SmoothnessPenalty("diffusion")),  # two terms
        (FoldingPenalty(kind="unit", jacobian_points=0), SmoothnessPenalty("bending")),
        (FoldingPenalty(margin=0.35, jacobian_points=0), SmoothnessPenalty("none")),
    ],
)
def test_the_objective_takes_the_same_terms_either_way(folding: FoldingPenalty, smoothness: SmoothnessPenalty) -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 10, 12, 9, generator=gen, dtype=torch.float64)
    sample = DownsizeSampler(stride=2).sample((10, 12, 9), generator=torch.Generator().manual_seed(1))
    warp = (torch.randn(3, generator=gen, dtype=torch.float64) * 0.05).requires_grad_()

    def transform(x: torch.Tensor) -> torch.Tensor:
        return x + warp * torch.sin(3 * x[..., :1])

    out = registration_objective(
        transform, img, img, sample, similarity=Similarity("lncc", window=3), folding=folding, lam=5.0,
        smoothness=smoothness, alpha=0.5, voxel_size=(2.0, 2.0, 2.0),
    )
    phi_vox = normalized_to_voxel(transform(sample.points), (10, 12, 9))
    assert sample.spacing is not None
    jac = jacobian_forward(phi_vox, sample.spacing)
    torch.testing.assert_close(out["jedt"], folding.lattice(sample, phi_vox, jac), atol=1e-12, rtol=1e-12)
    expected = smoothness.lattice(phi_vox, sample.spacing, (2.0, 2.0, 2.0), jac) if smoothness.active else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(out["smooth"], expected, atol=1e-12, rtol=1e-12)
    assert float(out["smooth"].detach()) > 0 or not smoothness.active
    one_pass = folding.kind == "jedt" and smoothness.kind in ("bending", "none")
    assert ("_LatticeTermsBackward" in _graph(out["loss"])) == one_pass


def _graph(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``t``."""
    names: set[str] = set()
    visited: set[int] = set()
    todo = [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        names.add(node.name())
        todo.extend(n for n, _ in node.next_functions)
    return names
