"""Reading a feature grid: trilinear values (and their exact derivative) at points, and on separable lattices.

The pure tensor functions that :class:`~nir_lightning.fields.feature_grid.FeatureGrid` reads its
levels with. Grid axes are array axes spanning the normalized cube ``[-1, 1]`` with vertex ``0``
at ``-1`` and the last at ``+1`` (``align_corners=True``, :mod:`nir_lightning.coords`); outside
it the edge cell is extended linearly.

- Points: :func:`trilinear_with_jacobian`, a written-out gather of the eight corners, so that the
  same corners give the value and the exact derivative with respect to the point in one pass
  (``grid_sample`` has no forward-mode derivative). Where only the grid is differentiated (the
  folding penalty's points), the same arithmetic runs one axis at a time with a written-out
  backward (``_TrilinearJacobianRead``), whose gradient can be sparse (``sparse_grad``: the
  corners read, for a grid that also passes through :func:`dense_gradient`).
- Lattices: :func:`level_lattice_read` reads axis by axis with one gather of the two
  neighbouring slices per coordinate (:func:`axis_read`; backward written out in ``_AxisRead``);
  :func:`lattice_read` is the reference form with interpolation matrices (:func:`linear_weights`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["axis_read", "dense_gradient", "lattice_points", "lattice_read", "level_lattice_read", "linear_weights", "trilinear_with_jacobian"]

# corner c = (c0, c1, c2) in {0, 1}^3, in the order of its index c0 * 4 + c1 * 2 + c2
_CORNERS = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=torch.long)


def trilinear_with_jacobian(
    grid: Tensor, x: Tensor, *, jacobian: bool, channels_first: bool = False, sparse_grad: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Trilinear interpolation of ``grid`` ``(R0, R1, R2, C)`` at normalized points ``x`` ``(M, 3)``.

    Returns the values ``(M, C)`` and, with ``jacobian``, their derivative with respect to
    ``x``, ``(M, 3, C)`` (tangent-major: row ``a`` is ``d/dx_a``; normalized units). Outside ``[-1, 1]`` the edge cell is extended
    linearly. Same values as ``grid_sample(..., align_corners=True)`` inside. ``channels_first``:
    ``grid`` is ``(C, R0, R1, R2)`` instead (a level's own layout: no transposed copy of it).
    ``sparse_grad``: where only the grid is differentiated (channels first, with ``jacobian``), its
    gradient is a sparse COO tensor of the corners read, not a dense grid of zeros around them;
    for a grid that passes through :func:`dense_gradient`, which makes it dense again.

    >>> g = torch.arange(8.0).reshape(2, 2, 2, 1)  # value = 4 i0 + 2 i1 + i2 at the vertices
    >>> v, j = trilinear_with_jacobian(g, torch.zeros(1, 3), jacobian=True)
    >>> v.tolist(), j[0, :, 0].tolist()  # the centre; d/dx = (4, 2, 1) per vertex step / 2
    ([[3.5]], [2.0, 1.0, 0.5])
    """
    dims = grid.shape[1:4] if channels_first else grid.shape[:3]
    res = torch.tensor(dims, device=x.device)
    scale = (res - 1).to(x.dtype) / 2  # vertices per normalized unit
    p = (x + 1) * scale
    cell = torch.minimum(torch.floor(p).clamp(min=0), (res - 2).clamp(min=0).to(x.dtype))
    t = p - cell
    strides = torch.tensor([dims[1] * dims[2], dims[2], 1], device=x.device)
    base = (cell.long() * strides).sum(-1)  # (M,)
    corners = _CORNERS.to(x.device)
    offsets = (corners * strides).sum(-1)  # (8,): each corner's row from the cell's first
    if channels_first and jacobian and not x.requires_grad:  # the folding penalty's points: only the grid is differentiated
        return _TrilinearJacobianRead.apply(grid, offsets[:, None] + base[None], t, scale, sparse_grad)  # rows (8, M)
    rows = base[:, None] + offsets[None]  # (M, 8)
    if channels_first:
        c = grid.shape[0]
        values = _CornerGather.apply(grid, rows.reshape(-1)).reshape(c, *rows.shape).permute(1, 2, 0)  # (M, 8, C)
    else:
        values = grid.reshape(-1, grid.shape[-1]).index_select(0, rows.reshape(-1)).reshape(*rows.shape, -1)  # (M, 8, C)
    lo, hi = 1 - t, t
    w = [torch.where(corners[:, a].bool()[None], hi[:, a : a + 1], lo[:, a : a + 1]) for a in range(3)]  # 3 x (M, 8)
    rows_w = [w[0] * w[1] * w[2]]
    if jacobian:
        sign = (corners * 2 - 1).to(x.dtype)  # d w_a / d t_a per corner
        rows_w += [sign[:, a][None] * w[(a + 1) % 3] * w[(a + 2) % 3] * scale[a] for a in range(3)]
    # one batched product reads the value and the three derivatives: (M, 1 or 4, 8) @ (M, 8, C)
    read = torch.bmm(torch.stack(rows_w, dim=1).to(values.dtype), values.contiguous())
    return read[:, 0], (read[:, 1:] if jacobian else None)


class _CornerGather(torch.autograd.Function):
    """``grid.reshape(C, -1).index_select(1, rows)`` for a channels-first ``grid`` ``(C, R0, R1, R2)``,
    whose backward returns a fresh gradient of ``grid``'s own shape: autograd can then add the
    lattice read's gradient of the same grid into it in place. Through a reshape (a view) the two
    full-grid gradients were summed into a third buffer, one more pass over the 97^3 x 4 grid a step.
    The values and the gradient are those of ``index_select`` bit for bit."""

    @staticmethod
    def forward(ctx: Any, grid: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.shape = grid.shape
        return grid.reshape(grid.shape[0], -1).index_select(1, rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rows,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.shape)
        out.view(ctx.shape[0], -1).index_add_(1, rows, grad)
        return out, None


class _TrilinearJacobianRead(torch.autograd.Function):
    """The value and the three derivatives of a channels-first ``grid`` ``(C, R0, R1, R2)`` at
    points whose eight corners are ``rows`` ``(8, M)`` (corner-major, so that every product below
    runs along the points' contiguous axis), and their offsets ``t`` ``(M, 3)`` in the cell.

    The same trilinear arithmetic as the corner weights times the corner values, done one axis at
    a time (lerp along axis 2, then 1, then 0; a derivative is the difference instead of the lerp
    along its axis), with a backward written out the same way round; only the grid is
    differentiated. Batched ``(M, 4, 8) @ (M, 8, C)`` products of eight-element rows were the
    largest cost of the folding penalty's points (16384 points on a 97^3 grid at one thread:
    forward 8.6-11.8 ms against 4.8-6.2 here, backward 13.2-17.4 against 9.5-11.0)."""

    @staticmethod
    def forward(ctx: Any, grid: Tensor, rows: Tensor, t: Tensor, scale: Tensor, sparse: bool) -> tuple[Tensor, Tensor]:
        c, m = grid.shape[0], rows.shape[1]
        v = grid.reshape(c, -1).index_select(1, rows.reshape(-1)).reshape(c, 2, 2, 2, m)  # (C, c0, c1, c2, M)
        tt = t.T.to(grid.dtype).contiguous()  # (3, M)
        s = scale.to(grid.dtype)
        d2 = v[:, :, :, 1] - v[:, :, :, 0]  # (C, 2, 2, M): along axis 2
        a2 = torch.addcmul(v[:, :, :, 0], d2, tt[2])
        d1 = a2[:, :, 1] - a2[:, :, 0]  # (C, 2, M): along axis 1
        a21 = torch.addcmul(a2[:, :, 0], d1, tt[1])
        d2 = torch.lerp(d2[:, :, 0], d2[:, :, 1], tt[1])
        value = torch.lerp(a21[:, 0], a21[:, 1], tt[0])  # (C, M)
        jac = torch.stack(
            [(a21[:, 1] - a21[:, 0]) * s[0], torch.lerp(d1[:, 0], d1[:, 1], tt[0]) * s[1], torch.lerp(d2[:, 0], d2[:, 1], tt[0]) * s[2]]
        )  # (3, C, M)
        ctx.save_for_backward(rows, tt, s)
        ctx.shape, ctx.sparse = grid.shape, sparse
        return value.T, jac.permute(2, 0, 1)

    @staticmethod
    def backward(ctx: Any, grad_value: Tensor, grad_jac: Tensor) -> tuple[Tensor | None, ...]:
        rows, tt, s = ctx.saved_tensors
        c = ctx.shape[0]
        gv = grad_value.T  # (C, M)
        g = grad_jac.permute(1, 2, 0) * s[:, None, None]  # (3, C, M)
        # each step splits a gradient over the two vertices of one axis: the value's by the
        # lerp's weights (1 - t, t), the derivative along that axis by (-1, +1)
        a = torch.stack([gv * (1 - tt[0]) - g[0], torch.addcmul(g[0], gv, tt[0])], 1)  # (C, c0, M)
        b1 = torch.stack([g[1] * (1 - tt[0]), g[1] * tt[0]], 1)
        b2 = torch.stack([g[2] * (1 - tt[0]), g[2] * tt[0]], 1)
        a = torch.stack([a * (1 - tt[1]) - b1, torch.addcmul(b1, a, tt[1])], 2)  # (C, c0, c1, M)
        b2 = torch.stack([b2 * (1 - tt[1]), b2 * tt[1]], 2)
        corners = torch.stack([a * (1 - tt[2]) - b2, torch.addcmul(b2, a, tt[2])], 3)  # (C, c0, c1, c2, M)
        if ctx.sparse:
            return _sparse_rows(corners.reshape(c, -1), rows.reshape(-1), ctx.shape), None, None, None, None
        out = gv.new_zeros(ctx.shape)
        out.view(c, -1).index_add_(1, rows.reshape(-1), corners.reshape(c, -1))
        return out, None, None, None, None


def _sparse_rows(values: Tensor, rows: Tensor, shape: torch.Size) -> Tensor:
    """``values`` ``(C, N)`` at the flat vertex ``rows`` ``(N,)`` of a ``(C, R0, R1, R2)`` grid, as
    an uncoalesced sparse COO tensor of that shape (repeated rows add up)."""
    c, n = values.shape
    channel = torch.arange(c, device=rows.device).repeat_interleave(n)
    index = torch.stack([channel, *torch.unravel_index(rows.repeat(c), tuple(shape[1:]))])
    return torch.sparse_coo_tensor(index, values.reshape(-1), shape, check_invariants=False)  # built in range


class _DenseGradient(torch.autograd.Function):
    """The identity, whose gradient leaves dense: a sparse one (reads of a few points) made dense."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.to_dense() if grad.layout != torch.strided else grad


def dense_gradient(x: Tensor) -> Tensor:
    """``x``, through which every gradient passes dense.

    A grid read both on a lattice (a dense gradient) and at a few points with ``sparse_grad`` (a
    sparse one) gets the sum of the two, accumulated by autograd before this node: the sparse
    part is added into the dense one in place, instead of a second dense grid of zeros around a
    few hundred points, filled, scattered into and added (15 MB each on the finest grid: the
    finest-stage step's median 11 % and 17 % lower at 2 threads in two alternated runs, 0.2.24).
    Should the sparse read be the only one, its gradient becomes dense here, so what reaches the
    parameter (and the optimiser) is always dense.

    >>> g = torch.zeros(1, 3, 3, 3, requires_grad=True)
    >>> v, _ = trilinear_with_jacobian(dense_gradient(g), torch.zeros(1, 3), jacobian=True, channels_first=True, sparse_grad=True)
    >>> v.sum().backward()
    >>> g.grad.layout, float(g.grad.sum()), float(g.grad[0, 1, 1, 1])
    (torch.strided, 1.0, 1.0)
    """
    return _DenseGradient.apply(x)


def linear_weights(coords: Tensor, vertices: int, *, derivative: bool = False) -> Tensor:
    """Linear interpolation (or its derivative) as a matrix: ``(B, d)`` normalized coordinates
    on one axis -> ``(B, d, vertices)``; row ``i`` reads a grid axis of ``vertices`` at ``coords[:, i]``.

    >>> linear_weights(torch.tensor([[-1.0, 0.0, 0.5]]), 3)[0].tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]]
    """
    scale = (vertices - 1) / 2
    p = (coords + 1) * scale
    cell = torch.floor(p).clamp(0, max(vertices - 2, 0))
    t = p - cell
    lo, hi = (-scale * torch.ones_like(t), scale * torch.ones_like(t)) if derivative else (1 - t, t)
    out = torch.zeros(*coords.shape, vertices, dtype=coords.dtype, device=coords.device)
    idx = cell.long()[..., None]
    out.scatter_(-1, idx, lo[..., None])
    return out.scatter_add_(-1, (idx + 1).clamp(max=vertices - 1), hi[..., None])


def lattice_points(axes: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The points of separable lattices from their per-axis coordinates ``(B, d_a)``: ``(B, d0, d1, d2, 3)``.

    >>> lattice_points((torch.zeros(1, 2), torch.ones(1, 3), torch.zeros(1, 4))).shape
    torch.Size([1, 2, 3, 4, 3])
    """
    b = axes[0].shape[0]
    return torch.stack(
        [
            axes[0][:, :, None, None].expand(b, -1, axes[1].shape[1], axes[2].shape[1]),
            axes[1][:, None, :, None].expand(b, axes[0].shape[1], -1, axes[2].shape[1]),
            axes[2][:, None, None, :].expand(b, axes[0].shape[1], axes[1].shape[1], -1),
        ],
        dim=-1,
    )


def lattice_read(grid: Tensor, axes: tuple[Tensor, Tensor, Tensor], *, derivative: int | None = None) -> Tensor:
    """Trilinear interpolation of ``grid`` ``(R0, R1, R2, C)`` on separable lattices, axis by axis.

    ``axes``: per-axis normalized coordinates ``(B, d_a)``. Trilinear interpolation is the
    product of three linear ones, so the read is three small matrix products instead of a
    gather per point. ``derivative=a`` gives the derivative along axis ``a`` instead.
    The reference form of the read (interpolation matrices, any layout); fields read with
    :func:`level_lattice_read`, which gathers instead of multiplying by mostly-zero matrices.
    Returns ``(B, d0, d1, d2, C)``.

    >>> g = torch.rand(4, 5, 6, 2)
    >>> ax = tuple(torch.rand(1, n) * 2 - 1 for n in (3, 3, 3))
    >>> pts = torch.stack(torch.meshgrid(ax[0][0], ax[1][0], ax[2][0], indexing="ij"), -1).reshape(-1, 3)
    >>> ref = trilinear_with_jacobian(g, pts, jacobian=False)[0]
    >>> bool(torch.allclose(lattice_read(g, ax).reshape(-1, 2), ref, atol=1e-6))
    True
    """
    w = [linear_weights(axes[a], grid.shape[a], derivative=derivative == a).to(grid.dtype) for a in range(3)]
    out = torch.einsum("kc,abcf->abkf" if w[2].shape[0] == 1 else "nkc,abcf->nabkf", w[2][0] if w[2].shape[0] == 1 else w[2], grid)
    if w[2].shape[0] == 1:
        out = out[None]
    out = torch.einsum("njb,nabkf->najkf", w[1], out)
    return torch.einsum("nia,najkf->nijkf", w[0], out)


def axis_read(x: Tensor, coords: Tensor, dim: int, *, derivative: bool = False) -> Tensor:
    """Linear interpolation of ``x`` along ``dim`` (``R`` vertices spanning ``[-1, 1]``) at the
    normalized ``coords`` ``(d,)``: ``x`` with that axis replaced by ``d`` values (or by the
    derivative along it, ``derivative``). One gather of the two neighbouring slices per
    coordinate; outside ``[-1, 1]`` the edge cell is extended linearly, as :func:`linear_weights`.

    >>> axis_read(torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([-1.0, 0.25, 1.0]), 1).tolist()
    [[0.0, 2.5, 4.0]]
    >>> axis_read(torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([0.25]), 1, derivative=True).tolist()
    [[2.0]]
    """
    vertices = x.shape[dim]
    scale = (vertices - 1) / 2
    p = (coords + 1) * scale
    cell = torch.floor(p).clamp(0, max(vertices - 2, 0))
    i0 = cell.long()
    i1 = (i0 + 1).clamp(max=vertices - 1)
    shape = [1] * x.dim()
    shape[dim] = -1
    t = (p - cell).to(x.dtype).reshape(shape)
    if not coords.requires_grad:  # the usual case: only the grid is differentiated
        return _AxisRead.apply(x, i0, i1, t, dim, scale if derivative else None)
    both = x.index_select(dim, torch.cat([i0, i1]))
    lo, hi = both.split(coords.shape[0], dim)
    return (hi - lo) * scale if derivative else torch.lerp(lo, hi, t)


def _take(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``x.index_select(dim, index)`` by advanced indexing: the same values, but torch's CPU
    ``index_select`` copies a slice of an inner dimension on one thread (2 ms on the finest grid's
    first axis), where the indexing kernel runs on all of them (0.5 ms on two threads)."""
    return x[(slice(None),) * dim + (index,)]


class _AxisRead(torch.autograd.Function):
    """:func:`axis_read` with a backward written out: two ``index_add_`` of the weighted gradient
    into one zero tensor, instead of autograd's split, lerp and index-select backward (a step's
    largest backward cost on the finest grid). The forward is the same arithmetic."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, i0: Tensor, i1: Tensor, t: Tensor, dim: int, scale: float | None) -> Tensor:
        lo, hi = _take(x, dim, i0), _take(x, dim, i1)
        ctx.save_for_backward(i0, i1, t)
        ctx.dim, ctx.scale, ctx.shape = dim, scale, x.shape
        return (hi - lo) * scale if scale is not None else torch.lerp(lo, hi, t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        i0, i1, t = ctx.saved_tensors
        out = grad.new_zeros(ctx.shape)
        if ctx.scale is not None:
            g1 = grad * ctx.scale
            out.index_add_(ctx.dim, i0, -g1).index_add_(ctx.dim, i1, g1)
        else:
            out.index_add_(ctx.dim, i0, grad * (1 - t)).index_add_(ctx.dim, i1, grad * t)
        return out, None, None, None, None, None


def level_lattice_read(grid: Tensor, axes: tuple[Tensor, Tensor, Tensor], *, derivative: int | None = None) -> Tensor:
    """:func:`lattice_read` of one level in its own layout, ``grid`` ``(C, R0, R1, R2)``:
    ``(B, C, d0, d1, d2)``. Gathers the two neighbouring slices per lattice coordinate, axis by
    axis (first axis first: its slices are contiguous blocks), instead of multiplying by
    mostly-zero interpolation matrices: about ``2 d0 R1 R2 C`` reads rather than
    ``R0 R1 R2 d2 C`` products on the largest level.

    >>> g = torch.rand(2, 4, 5, 6)
    >>> ax = tuple(torch.rand(2, n) * 2 - 1 for n in (3, 2, 4))
    >>> ref = lattice_read(g.permute(1, 2, 3, 0), ax, derivative=1).permute(0, 4, 1, 2, 3)
    >>> bool(torch.allclose(level_lattice_read(g, ax, derivative=1), ref, atol=1e-5))
    True
    """
    out = []
    for b in range(axes[0].shape[0]):  # lattices of one batch differ in their coordinates only
        v = grid
        for a in range(3):
            v = axis_read(v, axes[a][b], a + 1, derivative=derivative == a)
        out.append(v)
    return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)
