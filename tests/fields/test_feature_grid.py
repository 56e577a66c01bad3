"""The feature-grid encoding and the default field: values, gradients, exact Jacobians, lattice reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nir_lightning.errors import InputError
from nir_lightning.fields import DisplacementField, FeatureGrid, GridDisplacementField, GridVelocityField
from nir_lightning.fields.feature_grid import level_resolutions
from nir_lightning.fields.grid_reads import lattice_read, trilinear_with_jacobian
from nir_lightning.sampling import DownsizeSampler, MinipatchSampler, PyramidSampler


def _points(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return (torch.rand(n, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 1.8 - 0.9)


def test_levels_nest_and_sum_to_one_trilinear_grid():
    """Each level doubles the cells, and the composed grid equals the sum of every level's own interpolation."""
    assert level_resolutions(4, 4) == [4, 7, 13, 25]
    enc = FeatureGrid(levels=3, features=2, coarsest=3, init_scale=0.5).double()
    x = _points(50)
    per_level = sum(
        F.grid_sample(g, x.flip(-1).reshape(1, -1, 1, 1, 3), align_corners=True).reshape(2, -1).T for g in enc.grids
    )
    assert torch.allclose(enc(x), per_level, atol=1e-12)


def test_point_read_matches_grid_sample_and_lattice_read_matches_point_read():
    g = torch.rand(5, 6, 7, 3, dtype=torch.float64)
    x = _points(40, seed=1)
    ref = F.grid_sample(g.permute(3, 0, 1, 2)[None], x.flip(-1).reshape(1, -1, 1, 1, 3), align_corners=True)
    ours, _ = trilinear_with_jacobian(g, x, jacobian=False)
    assert torch.allclose(ours, ref.reshape(3, -1).T, atol=1e-12)
    for sample in (
        DownsizeSampler(stride=3).sample((20, 22, 18), generator=torch.Generator().manual_seed(2)),
        MinipatchSampler(num_patches=3, patch_size=5).sample((20, 22, 18), generator=torch.Generator().manual_seed(2)),
    ):
        axes = tuple(a.double() for a in sample.axes)
        pts = sample.points.double()
        lat = lattice_read(g, axes)
        pt = trilinear_with_jacobian(g, pts.reshape(-1, 3), jacobian=False)[0].reshape(lat.shape)
        assert torch.allclose(lat, pt, atol=1e-12)
        for a in range(3):  # the lattice derivative is the point derivative
            dlat = lattice_read(g, axes, derivative=a)
            dpt = trilinear_with_jacobian(g, pts.reshape(-1, 3), jacobian=True)[1][:, a].reshape(lat.shape)
            assert torch.allclose(dlat, dpt, atol=1e-10)


def test_encoding_gradient_with_respect_to_grid_and_point():
    """gradcheck: the point read and its Jacobian (which the folding penalty differentiates) are
    differentiable in the grid values and in the point; the lattice read in the grid values;
    the encoding's gradient reaches every active level."""
    g = torch.rand(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    x = _points(5, seed=3).requires_grad_()

    def read(grid, pts):
        v, j = trilinear_with_jacobian(grid, pts, jacobian=True)
        return torch.cat([v.flatten(), j.flatten()])

    assert torch.autograd.gradcheck(read, (g, x))
    axes = tuple(a.double() for a in DownsizeSampler(stride=2).sample((5, 6, 5), generator=torch.Generator().manual_seed(0)).axes)
    assert torch.autograd.gradcheck(lambda grid: lattice_read(grid, axes), (g,))
    enc = FeatureGrid(levels=3, features=2, coarsest=3).double()
    enc(_points(20)).square().sum().backward()
    assert all(level.grad is not None and float(level.grad.abs().sum()) > 0 for level in enc.grids)


@pytest.mark.parametrize("field_cls,activation", [(GridDisplacementField, "silu"), (GridDisplacementField, "relu"), (DisplacementField, "sine")])
def test_analytic_jacobian_equals_finite_differences_on_a_smooth_field(field_cls, activation):
    """forward_with_jacobian is the derivative of forward: central differences of h = 1e-6 in
    float64 agree to 1e-6 (the grid field is trilinear per cell; points within a cell of h)."""
    torch.manual_seed(0)
    if field_cls is GridDisplacementField:
        field = GridDisplacementField(levels=3, coarsest=3, features=4, width=16, init_scale=0.2, activation=activation).double()
    else:
        field = DisplacementField(num_frequencies=8, width=16, depth=2).double()
        with torch.no_grad():
            field.mlp.output.weight.mul_(100)  # a visible displacement
    field.requires_grad_(False)
    x = _points(64, seed=4)
    phi, jac = field.forward_with_jacobian(x)
    assert torch.allclose(phi, field(x), atol=1e-12)
    assert float((jac - torch.eye(3, dtype=jac.dtype)).abs().max()) > 0.05  # not the identity
    h = 1e-6
    for a in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[a] = h
        fd = (field(x + e) - field(x - e)) / (2 * h)
        assert torch.allclose(jac[..., a], fd, atol=1e-6), float((jac[..., a] - fd).abs().max())


def test_grid_field_starts_at_identity_and_reads_lattices_like_points():
    field = GridDisplacementField().requires_grad_(False)
    sample = PyramidSampler().sample((30, 34, 26), generator=torch.Generator().manual_seed(0), progress=0.9)
    assert float((field(sample.points) - sample.points).abs().max()) < 1e-3
    with torch.no_grad():
        for g in field.encoding.grids:
            g.normal_(0, 0.05)
    field.encoding._cache = None
    assert torch.allclose(field.on_lattice(sample.axes), field(sample.points), atol=1e-6)


def test_coarse_to_fine_levels_leave_finer_grids_out():
    enc = FeatureGrid(levels=3, features=2, coarsest=3, init_scale=0.3)
    x = _points(10, dtype=torch.float32)
    full = enc(x)
    enc.active_levels = 1
    coarse = enc(x)
    with torch.no_grad():
        enc.grids[2].add_(1.0)  # an inactive level changes nothing
    assert torch.equal(enc(x), coarse)
    assert not torch.allclose(full, coarse)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"levels": 0}, "levels >= 1"), ({"coarsest": 1}, "coarsest must be >= 2"), ({"levels": 9, "coarsest": 4}, "finest <= 257")],
)
def test_bad_grid_options_are_input_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        FeatureGrid(**kwargs)


@pytest.mark.parametrize("method,step_size", [("midpoint", 1.0), ("rk4", 0.5)])
def test_grid_velocity_reads_the_lattice_once_and_integrates_like_points(method, step_size):
    """GridVelocityField.on_lattice: the first velocity evaluation reads the lattice axis by axis,
    the rest is torchdiffeq as in forward; same values and same parameter gradients."""
    torch.manual_seed(0)
    field = GridVelocityField(levels=3, coarsest=3, features=2, width=8, method=method, step_size=step_size)
    with torch.no_grad():
        for p in field.parameters():
            p.normal_(0.0, 0.5)  # a velocity far from zero, so the flow moves points off the lattice
    sample = DownsizeSampler(stride=2).sample((9, 10, 11), generator=torch.Generator().manual_seed(1))
    assert sample.axes is not None
    reads = []
    encoding = field.velocity_net.encoding
    original = encoding.forward
    encoding.forward = lambda x: reads.append(x.shape[0]) or original(x)  # type: ignore[method-assign]
    on_lattice = field.on_lattice(sample.axes)
    lattice_reads, reads[:] = list(reads), []
    direct = field(sample.points)
    point_reads = list(reads)
    encoding.forward = original  # type: ignore[method-assign]
    assert (direct - sample.points).abs().max() > 0.05  # the flow is far from the identity
    torch.testing.assert_close(on_lattice, direct, atol=2e-6, rtol=0)
    assert len(lattice_reads) == len(point_reads) - 1  # v(x) on the lattice came from the axis-by-axis read
    grads = []
    for out in (field.on_lattice(sample.axes), field(sample.points)):
        field.zero_grad()
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in field.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# -- the grids' domain --------------------------------------------------------------------------------
LOW, HIGH = (-0.5, -0.8, 0.0), (0.3, 0.6, 0.9)


def _domain_grid() -> tuple[FeatureGrid, FeatureGrid]:
    """The same grids twice: spanning the image, and spanning the box (LOW, HIGH)."""
    whole = FeatureGrid(levels=3, features=2, coarsest=3, init_scale=0.5).double()
    boxed = FeatureGrid(levels=3, features=2, coarsest=3, init_scale=0.5).double()
    boxed.set_domain(LOW, HIGH)
    return whole, boxed


def _into_box(x: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.tensor(LOW, dtype=x.dtype), torch.tensor(HIGH, dtype=x.dtype)
    return ((x - (lo + hi) / 2) / ((hi - lo) / 2)).clamp(-1, 1)


def test_a_domain_spreads_the_grids_over_the_box_and_keeps_the_face_values_outside():
    whole, boxed = _domain_grid()
    x = _points(200, seed=5) * 1.1  # inside and outside the box
    assert torch.allclose(boxed(x), whole(_into_box(x)), atol=1e-12)
    feats, jac = boxed.forward_with_jacobian(x)
    assert torch.allclose(feats, boxed(x), atol=1e-12)
    # the chain rule through the box map: d/dx = (d/dt) / half-extent inside, 0 where clamped
    _, jac_t = whole.forward_with_jacobian(_into_box(x))
    lo, hi = torch.tensor(LOW, dtype=x.dtype), torch.tensor(HIGH, dtype=x.dtype)
    inside = ((x >= lo) & (x <= hi)).to(x.dtype)
    assert torch.allclose(jac, jac_t * (inside / ((hi - lo) / 2))[:, :, None], atol=1e-12)
    assert float(inside.mean()) < 0.9 and float(inside.mean()) > 0.1
    outside = inside[:, 0] == 0
    assert float(jac[outside][:, 0].abs().max()) == 0.0
    # and the lattice read, with its derivative, is the point read
    sample = DownsizeSampler(stride=3).sample((20, 22, 18), generator=torch.Generator().manual_seed(2))
    axes = tuple(a.double() for a in sample.axes)
    lat, dlat = boxed.on_lattice(axes, jacobian=True)
    assert dlat is not None
    pv, pj = boxed.forward_with_jacobian(sample.points.double().reshape(-1, 3))
    assert torch.allclose(lat.reshape(-1, 2), pv, atol=1e-12)
    assert torch.allclose(dlat.reshape(-1, 2, 3), pj.transpose(1, 2), atol=1e-10)


def test_a_domain_is_saved_with_the_field_and_old_fields_load_as_whole_image():
    _, boxed = _domain_grid()
    fresh = FeatureGrid(levels=3, features=2, coarsest=3).double()
    fresh.load_state_dict(boxed.state_dict())
    x = _points(20, seed=6)
    assert torch.equal(fresh(x), boxed(x)) and "domain=" in repr(fresh)
    old = {k: v for k, v in boxed.state_dict().items() if k != "domain"}  # saved before 0.2.3
    fresh.load_state_dict(old)
    assert torch.equal(fresh.domain, torch.tensor([[-1.0] * 3, [1.0] * 3], dtype=fresh.domain.dtype))
    assert "domain=" not in repr(fresh)


@pytest.mark.parametrize("low, high", [((0.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((0.0, float("nan"), 0.0), (1.0, 1.0, 1.0))])
def test_a_bad_domain_is_an_input_error(low, high):
    with pytest.raises(InputError, match="low < high"):
        FeatureGrid(levels=1, features=1, coarsest=2).set_domain(low, high)


@pytest.mark.parametrize("active", [1, 2, 4])
def test_every_read_is_the_sum_of_the_active_levels_with_its_gradient(active: int) -> None:
    """Points (with and without the Jacobian) and lattices read two grids (the coarser levels composed,
    and the finest active level): the same values and grid gradients as summing each level's own read."""
    enc = FeatureGrid(levels=4, features=2, coarsest=3, init_scale=0.5).double()
    enc.set_domain((-0.9, -0.8, -1.0), (0.9, 0.7, 0.95))
    enc.active_levels = active
    x = _points(40) * 0.8
    axes = tuple(torch.rand(1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 1.6 - 0.8 for n in (3, 4, 5))
    pts = torch.stack(torch.meshgrid(axes[0][0], axes[1][0], axes[2][0], indexing="ij"), -1).reshape(-1, 3)

    def reference(p: torch.Tensor) -> torch.Tensor:
        t, _ = enc._into_domain(p)
        return sum(
            F.grid_sample(g, t.flip(-1).reshape(1, -1, 1, 1, 3), align_corners=True).reshape(2, -1).T for g in list(enc.grids)[:active]
        )

    reads = {
        "forward": lambda: enc(x),
        "forward_with_jacobian": lambda: enc.forward_with_jacobian(x)[0],
        "on_lattice": lambda: enc.on_lattice(axes)[0].reshape(-1, 2),
    }
    for name, read in reads.items():
        want_points = pts if name == "on_lattice" else x
        got, want = read(), reference(want_points)
        assert torch.allclose(got, want, atol=1e-12), name
        w = torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        g_got = torch.autograd.grad((got * w).sum(), list(enc.grids)[:active])
        g_want = torch.autograd.grad((reference(want_points) * w).sum(), list(enc.grids)[:active])
        for level, (a, b) in enumerate(zip(g_got, g_want, strict=True)):
            assert torch.allclose(a, b, atol=1e-12), f"{name}, level {level}"


def test_the_det_j_points_gradient_is_sparse_on_the_way_and_dense_at_the_grids(monkeypatch) -> None:
    """The points read with their Jacobian give the grids a sparse gradient, which is summed into
    the lattice's dense one (dense_gradient): the same gradients as dense reads, dense at the
    parameters, so Adam steps on them; alone, it reaches the parameters dense too."""
    from nir_lightning.fields import feature_grid
    from nir_lightning.training.schedule import build_adam

    enc = FeatureGrid(levels=4, features=2, coarsest=3, init_scale=0.5).double()
    x = _points(64) * 0.9
    axes = tuple(torch.rand(1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 1.8 - 0.9 for n in (3, 4, 5))
    w = [torch.rand(s, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(((1, 3, 4, 5, 2), (64, 2), (64, 3, 2)))]

    def grads(points_only: bool = False) -> list[torch.Tensor]:
        enc.clear_cache()
        v, j = enc.forward_with_jacobian(x)
        loss = (v * w[1]).sum() + (j * w[2]).sum()
        if not points_only:
            loss = loss + (enc.on_lattice(axes)[0] * w[0]).sum()
        for g in enc.grids:
            g.grad = None
        loss.backward()
        return [g.grad for g in enc.grids]

    got, got_points = grads(), grads(points_only=True)
    original = feature_grid.trilinear_with_jacobian
    monkeypatch.setattr(feature_grid, "trilinear_with_jacobian", lambda *a, **k: original(*a, **{**k, "sparse_grad": False}))
    want, want_points = grads(), grads(points_only=True)
    for a, b in zip(got + got_points, want + want_points, strict=True):
        assert a.layout == torch.strided and a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-12)
    grads()
    build_adam([{"params": list(enc.parameters())}], 1e-2).step()  # a sparse gradient would be refused here


def test_a_point_read_with_sparse_grad_gives_a_leaf_grid_a_sparse_gradient_of_the_corners() -> None:
    g = torch.rand(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    x = _points(10) * 0.8
    v, j = trilinear_with_jacobian(g, x, jacobian=True, channels_first=True, sparse_grad=True)
    w = torch.rand(10, 3, 3, dtype=torch.float64)
    sparse = torch.autograd.grad(v.sum() + (j * w).sum(), g)[0]
    v, j = trilinear_with_jacobian(g, x, jacobian=True, channels_first=True)
    dense = torch.autograd.grad(v.sum() + (j * w).sum(), g)[0]
    assert sparse.layout == torch.sparse_coo and sparse.coalesce()._nnz() <= 10 * 8 * 3
    assert torch.allclose(sparse.to_dense(), dense, atol=1e-12)


def test_a_composition_with_its_graph_serves_reads_without_one_but_not_the_reverse() -> None:
    enc = FeatureGrid(levels=3, features=2, coarsest=3)
    with torch.no_grad():
        bare = enc.reading_grids()
    assert bare[0].grad_fn is None  # the coarser levels composed without a graph
    with_graph = enc.reading_grids()  # a read with a graph composes again
    assert with_graph[0].grad_fn is not None
    with torch.no_grad():
        assert enc.reading_grids() is with_graph  # and a read without one reuses it
    with torch.no_grad():
        enc.grids[0].add_(1.0)  # as an optimiser step: a new version of the grids
    assert enc.reading_grids() is not with_graph
