"""The cheaper step (0.2.7) computes what the plain one did: fused Adam sees every update of the
grids, the written-out lattice backward equals autograd's, the determinant is the same formula."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nir_lightning.core.jacobian import determinant
from nir_lightning.data.pair import ImagePair
from nir_lightning.data.phantom import make_phantom
from nir_lightning.fields import GridDisplacementField
from nir_lightning.fields.grid_reads import _CornerGather, axis_read, trilinear_with_jacobian
from nir_lightning.training.module import RegistrationModule


def _module(**kwargs: object) -> RegistrationModule:
    p = make_phantom((14, 16, 12), spacing=2.0, seed=0)
    fixed, moving = torch.as_tensor(p.fixed)[None, None], torch.as_tensor(p.moving)[None, None]
    module = RegistrationModule(field=GridDisplacementField(levels=3, coarsest=3), jacobian_points=64, **kwargs)  # type: ignore[arg-type]
    module.attach_pair(ImagePair(fixed=fixed, moving=moving, moving_raw=moving, fixed_affine=p.affine))
    return module


def _fit(fused: bool, steps: int = 12) -> list[torch.Tensor]:
    torch.manual_seed(0)
    module = _module()
    opt = torch.optim.Adam([q for q in module.parameters() if q.requires_grad], lr=1e-2, fused=fused)
    for step in range(steps):
        sample = module.sampler.sample(module.shape, generator=torch.Generator().manual_seed(step), mask=module.mask)
        sample = dataclasses.replace(sample, levels=2 if step < steps // 2 else None)  # coarse, then every level
        loss = module.model_step(sample, torch.Generator().manual_seed(100 + step))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [q.detach().clone() for q in module.parameters()]


def test_fused_adam_fits_as_plain_adam() -> None:
    """Fused Adam writes the grids without bumping their version counters; the composition of
    the coarse levels is cached by version, so without a fresh cache each step the fit would
    read stale grids (Dice 0.53 instead of 0.61 on a brain pair)."""
    plain, fused = _fit(False), _fit(True)
    moved = max(float((a - b).abs().max()) for a, b in zip(_module().parameters(), plain, strict=True))
    assert moved > 1e-3  # the fit moved the parameters
    # Adam moves a parameter by ~lr (1e-2) a step whatever its gradient's size, so rounding can
    # move one by a small part of a step (3e-5 measured); the stale cache moved them by 0.06
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


@pytest.mark.parametrize("derivative", [False, True])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_axis_read_backward_equals_autograd(dim: int, derivative: bool) -> None:
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 7, 8, 9, generator=g, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(6, generator=g, dtype=torch.float64) * 2.4 - 1.2  # outside [-1, 1] too
    w = torch.randn_like(axis_read(x.detach(), coords, dim, derivative=derivative))
    fast = torch.autograd.grad((axis_read(x, coords, dim, derivative=derivative) * w).sum(), x)[0]
    # coordinates that require a gradient take autograd's own path (index_select, split, lerp)
    slow = torch.autograd.grad((axis_read(x, coords.clone().requires_grad_(), dim, derivative=derivative) * w).sum(), x)[0]
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda v: axis_read(v, coords, dim, derivative=derivative), (x,))


def test_corner_gather_is_index_select_and_the_det_j_points_add_no_grid_sized_gradient(monkeypatch) -> None:
    """The corner gather gives index_select's values and gradient bit for bit. In a training step
    the lattice and the det J points both read the finest level: the points' gradient reaches it
    sparse and is added into the lattice's (0.2.24), where a dense one was a second grid of zeros
    scattered into and added to the first; the grid's gradient is the same."""
    from nir_lightning.fields import feature_grid

    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(4, 9, 10, 11, generator=gen, requires_grad=True)
    rows = torch.randint(0, 9 * 10 * 11, (500,), generator=gen)
    w = torch.randn(4, 500, generator=gen)
    fast = torch.autograd.grad((_CornerGather.apply(grid, rows) * w).sum(), grid)[0]
    slow = torch.autograd.grad((grid.reshape(4, -1).index_select(1, rows) * w).sum(), grid)[0]
    assert torch.equal(_CornerGather.apply(grid, rows), grid.reshape(4, -1).index_select(1, rows))
    assert torch.equal(fast, slow)
    g64 = grid.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: _CornerGather.apply(v, rows), (g64,))

    module = _module(margin=0.9)
    with torch.no_grad():  # a rough field: many det J points below the floor, so they carry a gradient
        for level in module.field.encoding.grids:
            level.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    finest_level = module.field.encoding.grids[-1]
    finest = list(finest_level.shape[1:])

    def step() -> tuple[int, torch.Tensor]:
        finest_level.grad = None
        sample = module.sampler.sample(module.shape, generator=torch.Generator().manual_seed(0), mask=module.mask)
        loss = module.model_step(sample, torch.Generator().manual_seed(1))
        assert float(loss["jedt"]) > 0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            loss["loss"].backward()
        zero_grids = sum(1 for e in prof.events() if e.key == "aten::zero_" and e.input_shapes and e.input_shapes[0] == finest)
        assert finest_level.grad is not None and finest_level.grad.layout == torch.strided
        return zero_grids, finest_level.grad.clone()

    sparse_zeros, sparse_grad = step()
    original = feature_grid.trilinear_with_jacobian
    monkeypatch.setattr(feature_grid, "trilinear_with_jacobian", lambda *a, **k: original(*a, **{**k, "sparse_grad": False}))
    dense_zeros, dense_grad = step()
    assert (sparse_zeros, dense_zeros) == (1, 2)  # the lattice's gradient grid only, against one more for the points
    torch.testing.assert_close(sparse_grad, dense_grad, atol=1e-6, rtol=1e-5)


def test_the_det_j_points_read_equals_the_corner_weights_read() -> None:
    """The det J points' read (0.2.23: one axis at a time, written-out backward) gives the values,
    the derivatives and the grid's gradient of the corner-weights read (the path a point that
    needs its own gradient still takes, as in the velocity field's flow), also outside [-1, 1]."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(4, 7, 9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.rand(300, 3, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    fast = trilinear_with_jacobian(grid, x, jacobian=True, channels_first=True)
    slow = trilinear_with_jacobian(grid, x.clone().requires_grad_(), jacobian=True, channels_first=True)
    assert slow[1] is not None and fast[1] is not None
    torch.testing.assert_close(fast[0], slow[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-12, rtol=0)
    wv, wj = torch.randn_like(fast[0]), torch.randn_like(fast[1])
    g_fast = torch.autograd.grad((fast[0] * wv).sum() + (fast[1] * wj).sum(), grid)[0]
    g_slow = torch.autograd.grad((slow[0] * wv).sum() + (slow[1] * wj).sum(), grid)[0]
    torch.testing.assert_close(g_fast, g_slow, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda g: trilinear_with_jacobian(g, x[:20], jacobian=True, channels_first=True), (grid,))


def test_determinant_is_the_cofactor_formula() -> None:
    jac = torch.randn(50, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(determinant(jac), torch.linalg.det(jac), atol=1e-12, rtol=0)
    x = jac.clone().requires_grad_()
    (grad,) = torch.autograd.grad(determinant(x).sum(), x)
    torch.testing.assert_close(grad, torch.linalg.det(jac)[:, None, None] * torch.linalg.inv(jac).transpose(1, 2), atol=1e-10, rtol=0)
