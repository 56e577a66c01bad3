"""The fold barrier on the extra det J points, differentiated through the points below its floor only."""

from __future__ import annotations

import pytest
import torch

from nir_lightning.fields import FeatureGrid, GridDisplacementField, GridVelocityField
from nir_lightning.losses import folding
from nir_lightning.losses.folding import FoldingPenalty, analytic_barrier, analytic_det, jacobian_penalty

MARGIN = 0.35


class Squeeze(torch.nn.Module):
    """``phi(x) = x + (A / k) sin(k x0) e0``: det J = 1 + A cos(k x0), known everywhere; counts the
    points it reads, call by call."""

    def __init__(self, amplitude: float, k: float = 3.0) -> None:
        super().__init__()
        self.amplitude = torch.nn.Parameter(torch.tensor(amplitude, dtype=torch.float64))
        self.k = k
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        self.calls.append(x.reshape(-1, 3).shape[0])
        d = 1 + self.amplitude * torch.cos(self.k * x[..., 0])
        one = torch.ones_like(d)
        jac = torch.diag_embed(torch.stack([d, one, one], -1))
        return x, jac


def _points(n: int = 2000) -> torch.Tensor:
    return torch.rand(1, n, 1, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_value_and_gradient_are_the_penalty_of_every_point() -> None:
    phi, pts = Squeeze(0.9), _points()
    got = analytic_barrier(phi, pts, MARGIN)
    want = jacobian_penalty(analytic_det(phi, pts), margin=MARGIN)
    det = 1 + 0.9 * torch.cos(3 * pts[..., 0])
    assert 0 < int((det < MARGIN).sum()) < pts.shape[1] // 4  # some points below the floor, most above
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert got.item() == pytest.approx(float(torch.relu(MARGIN - det).mean()), rel=1e-12)
    g_got = torch.autograd.grad(got, phi.amplitude)[0]
    g_want = torch.autograd.grad(want, phi.amplitude)[0]
    assert float(g_got) == pytest.approx(float(g_want), rel=1e-12)
    assert float(g_got) == pytest.approx(float(-(torch.cos(3 * pts[..., 0]) * (det < MARGIN)).mean()), rel=1e-12)


def test_only_the_points_below_the_floor_are_read_again_with_a_graph() -> None:
    phi, pts = Squeeze(0.9), _points()
    phi.calls.clear()
    analytic_barrier(phi, pts, MARGIN)
    below = int((1 + 0.9 * torch.cos(3 * pts[..., 0]) < MARGIN).sum())
    assert phi.calls == [pts.shape[1], below]


def test_no_point_below_the_floor_costs_nothing_and_has_no_graph() -> None:
    phi, pts = Squeeze(0.5), _points()  # det J >= 0.5 everywhere
    phi.calls.clear()
    out = analytic_barrier(phi, pts, MARGIN)
    assert float(out) == 0.0 and not out.requires_grad
    assert phi.calls == [pts.shape[1]]
    assert float(analytic_barrier(Squeeze(0.0), pts, 0.0)) == 0.0  # a translation-like field: det J 1


def test_without_a_graph_it_is_the_plain_penalty() -> None:
    phi, pts = Squeeze(0.9), _points()
    with torch.no_grad():
        phi.calls.clear()
        out = analytic_barrier(phi, pts, MARGIN)
    assert phi.calls == [pts.shape[1]]
    assert float(out) == pytest.approx(float(jacobian_penalty(analytic_det(phi, pts), margin=MARGIN)), rel=1e-12)


def penalty_share(field: torch.nn.Module) -> float:
    with torch.no_grad():
        det = analytic_det(field.forward_with_jacobian, torch.rand(3000, 3, generator=torch.Generator().manual_seed(5)) * 2 - 1)
    return float((det < MARGIN).double().mean())


@pytest.mark.parametrize("field_cls", [GridDisplacementField, GridVelocityField])
def test_the_extra_points_of_a_grid_field_give_the_same_value_and_gradients(field_cls, monkeypatch) -> None:
    """The folding penalty's extra points on a folding grid field (both field kinds): the same
    value and gradients as the penalty differentiated through every point."""
    torch.manual_seed(0)
    field = field_cls(levels=3, coarsest=3, features=4, width=16, seed=0)
    with torch.no_grad():  # rough enough that a few percent of the points fall below the floor
        for grid in (g for m in field.modules() if isinstance(m, FeatureGrid) for g in m.grids):
            grid.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    params = [p for p in field.parameters() if p.requires_grad]
    penalty = FoldingPenalty(margin=MARGIN, jacobian_points=3000, stencil="analytic")
    shape = (12, 14, 10)

    def run() -> tuple[float, list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(3)
        out = penalty.extra(field, shape, None, gen, field.forward_with_jacobian)
        return float(out), list(torch.autograd.grad(out, params, allow_unused=True))

    value, grads = run()
    assert 0 < penalty_share(field) < 0.2
    monkeypatch.setattr(folding, "analytic_barrier", lambda t, p, m: jacobian_penalty(analytic_det(t, p), margin=m))
    want_value, want_grads = run()
    assert value > 0
    assert value == pytest.approx(want_value, rel=1e-5)
    for a, b in zip(grads, want_grads, strict=True):
        if b is None:
            assert a is None
            continue
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
