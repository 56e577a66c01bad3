"""The training objective as a pure function of transform, images and sample.

``loss = similarity(fixed(x), moving(phi(x))) + lam * folding(phi) + alpha * smoothness(phi)``
over the sampled fixed points ``x``; symmetric (an invertible ``phi``), ``similarity(moving(x),
fixed(phi^-1(x)))`` on the same points is added: each image compared with the other warped onto it. The LightningModule's ``training_step`` and ``benchmarks/profile_step.py`` both
call :func:`registration_objective`, so what is profiled is what is trained.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nir_lightning.coords import apply_matrix, inside_grid, normalized_to_voxel, voxel_to_normalized
from nir_lightning.core.jacobian import determinant, jacobian_forward
from nir_lightning.core.resample import sample_image
from nir_lightning.losses.folding import FoldingPenalty, forward_stencil_jacobian
from nir_lightning.losses.lattice_terms import lattice_barrier_and_bending
from nir_lightning.losses.similarity import Similarity
from nir_lightning.losses.smoothness import SmoothnessPenalty
from nir_lightning.sampling import CoordinateSample


def registration_objective(
    transform: Callable[[Tensor], Tensor],
    fixed: Tensor,
    moving: Tensor,
    sample: CoordinateSample,
    *,
    similarity: Similarity,
    folding: FoldingPenalty,
    lam: float,
    smoothness: SmoothnessPenalty | None = None,
    alpha: float = 0.0,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    moving_chain: Tensor | None = None,
    moving_fov: bool = False,
    transform_with_jacobian: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    transform_lattice: Callable[[tuple[Tensor, Tensor, Tensor]], Tensor] | None = None,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
    inverse: Callable[[Tensor], Tensor] | None = None,
    inverse_lattice: Callable[[tuple[Tensor, Tensor, Tensor]], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Similarity and folding penalty of ``transform`` on one coordinate sample.

    Args:
        transform: ``phi`` on normalized points ``(B, d0, d1, d2, 3)``.
        fixed, moving: images ``(1, 1, D0, D1, D2)`` on the fixed grid (scaled intensities);
            ``moving`` may be on its own grid, with ``moving_chain``.
        sample: the sampled fixed points (a lattice, or unstructured points).
        similarity, folding, lam: the similarity, the folding barrier and its weight.
        smoothness, alpha: the smoothness prior (:mod:`~nir_lightning.losses.smoothness`) and its
            weight, on the sample's own Jacobian (``None`` or ``alpha=0``: none).
        mask: fixed foreground ``(D0, D1, D2)`` (bool), where extra folding points are drawn.
        generator: draws the extra folding points; ``None`` skips them.
        fixed_mask, moving_mask: the user's masks as images ``(1, 1, D0, D1, D2)`` (1 inside,
            0 outside) on the fixed grid: the similarity counts a sample only where the fixed
            mask holds at ``x`` and the moving mask at ``phi(x)`` (nearest neighbour, so the
            weight carries no gradient that would pull the mask's edge).
        moving_chain: 4x4 matrix from fixed-normalized to ``moving``'s own normalized
            coordinates (:func:`~nir_lightning.coords.normalized_chain_matrix`), when ``moving``
            is the native moving image: it is sampled at ``M phi(x)`` (the affine part after the
            deformable one, :mod:`nir_lightning.coords`). ``None``: ``moving`` is on the fixed grid.
        moving_fov: count a sample only where it lands inside ``moving``'s grid (``|M phi(x)| <= 1``
            in its normalized coordinates), as ITK's metrics do: a moving scan that covers only
            part of the fixed anatomy (a slab, a cut-off head) is then not compared with its zero
            padding, which the field would otherwise stretch the scan's edge to fill.
        transform_with_jacobian: ``phi`` and its exact Jacobian, for ``folding.stencil == "analytic"``.
        transform_lattice: ``phi`` on a separable lattice from its per-axis coordinates (the
            same values as ``transform`` on its points, faster); used when the sample is one.
        voxel_size: the fixed image's voxel size in mm along each array axis: the smoothness
            prior is taken per millimetre (``(1, 1, 1)``: per voxel).
        inverse: ``phi^-1`` on normalized points: the objective becomes symmetric, the sum of the
            forward similarity and ``similarity(moving(x), fixed(phi^-1(x)))`` at the same points
            ``x`` (each image compared with the other warped onto it, as SyN compares them,
            though not at a midpoint; each direction weighs as the forward one does alone, so
            ``lam`` and ``alpha`` hold the field back half as much against the two). Masks and
            ``moving_fov`` weigh the second term at the points where each image is read.
            ``None``: the forward similarity alone.
        inverse_lattice: ``phi^-1`` on a separable lattice (as ``transform_lattice``).

    Returns:
        ``{"loss", "sim", "sim_inverse", "jedt", "smooth"}`` scalars (``sim``: the forward
        similarity, ``sim_inverse`` the second term, 0 when not symmetric; ``jedt``: the whole
        folding term before ``lam``; ``smooth``: the smoothness prior before ``alpha``).

    >>> from nir_lightning.sampling import DownsizeSampler
    >>> img = torch.rand(1, 1, 8, 8, 8)
    >>> s = DownsizeSampler(stride=1).sample((8, 8, 8), generator=torch.Generator().manual_seed(0))
    >>> out = registration_objective(lambda x: x, img, img, s, similarity=Similarity("lncc", window=3),
    ...                              folding=FoldingPenalty(), lam=10.0)
    >>> round(float(out["sim"]), 4), float(out["jedt"]), float(out["smooth"])
    (-1.0, 0.0, 0.0)
    >>> out = registration_objective(lambda x: x, img, img, s, similarity=Similarity("lncc", window=3),
    ...                              folding=FoldingPenalty(), lam=10.0, inverse=lambda y: y)
    >>> round(float(out["sim_inverse"]), 4), round(float(out["loss"]), 4)
    (-1.0, -2.0)
    """
    shape = (int(fixed.shape[-3]), int(fixed.shape[-2]), int(fixed.shape[-1]))
    pts = sample.points
    smooth_on = smoothness is not None and smoothness.active and alpha > 0
    smooth = pts.new_zeros(())
    if sample.is_grid:
        axes = sample.axes
        phi = transform_lattice(axes) if transform_lattice is not None and axes is not None else transform(pts)
        phi_vox = normalized_to_voxel(phi, shape)
        assert sample.spacing is not None
        if _fused_lattice_terms(folding, smoothness if smooth_on else None, sample, phi_vox):
            reg, smooth = lattice_barrier_and_bending(phi_vox, sample.spacing, margin=folding.margin, voxel_size=voxel_size, bending=smooth_on)
        else:
            jac_vox = jacobian_forward(phi_vox, sample.spacing) if min(phi_vox.shape[1:4]) >= 2 else None
            reg = folding.lattice(sample, phi_vox, jac_vox)
            if smooth_on:
                assert smoothness is not None
                smooth = smoothness.lattice(phi_vox, sample.spacing, voxel_size, jac_vox)
    else:
        phi_vox, jac = forward_stencil_jacobian(transform, pts, shape)
        phi = voxel_to_normalized(phi_vox, shape)
        reg = folding(determinant(jac))
        if smooth_on:
            assert smoothness is not None
            smooth = smoothness.points(jac)
    if generator is not None and folding.needs_extra_points(sample):
        reg = reg + folding.extra(transform, shape, mask, generator, transform_with_jacobian, focus=sample.focus)
    at = phi if moving_chain is None else apply_matrix(phi, moving_chain)
    warped = sample_image(moving, at)
    fixed_s = sample.read(fixed)
    weight = _product(
        None if fixed_mask is None else sample.read(fixed_mask, mode="nearest"),
        None if moving_mask is None else sample_image(moving_mask, phi.detach(), mode="nearest"),
        # (B, 1, ...) as the sampled image; no gradient pulls the field of view's edge
        inside_grid(at.detach()).unsqueeze(1).to(warped.dtype) if moving_fov else None,
    )
    sim = similarity(fixed_s, warped, is_grid=sample.is_grid, weight=weight)
    sim_inverse = pts.new_zeros(())
    if inverse is None:
        loss = sim + lam * reg
    else:
        sim_inverse = _inverse_similarity(
            inverse, inverse_lattice, fixed, moving, sample, similarity,
            fixed_mask=fixed_mask, moving_mask=moving_mask, moving_chain=moving_chain, moving_fov=moving_fov,
        )
        loss = sim + sim_inverse + lam * reg
    if smooth_on:
        loss = loss + alpha * smooth
    return {"loss": loss, "sim": sim, "sim_inverse": sim_inverse, "jedt": reg, "smooth": smooth}


def _fused_lattice_terms(folding: FoldingPenalty, smoothness: SmoothnessPenalty | None, sample: CoordinateSample, phi_vox: Tensor) -> bool:
    """Whether the lattice's barrier and prior are the pair that
    :func:`~nir_lightning.losses.lattice_terms.lattice_barrier_and_bending` computes in one pass
    (the same values as :meth:`FoldingPenalty.lattice` and :meth:`SmoothnessPenalty.lattice`):
    the ``"jedt"`` barrier on forward differences, and the bending prior or none."""
    assert sample.spacing is not None
    central = folding.stencil == "central" and tuple(sample.spacing) == (1, 1, 1)  # adds central differences
    return (
        folding.kind == "jedt" and not central and min(phi_vox.shape[1:4]) >= 2
        and (smoothness is None or smoothness.kind == "bending")
    )


def _inverse_similarity(
    inverse: Callable[[Tensor], Tensor],
    inverse_lattice: Callable[[tuple[Tensor, Tensor, Tensor]], Tensor] | None,
    fixed: Tensor,
    moving: Tensor,
    sample: CoordinateSample,
    similarity: Similarity,
    *,
    fixed_mask: Tensor | None,
    moving_mask: Tensor | None,
    moving_chain: Tensor | None,
    moving_fov: bool,
) -> Tensor:
    """``similarity(moving(x), fixed(phi^-1(x)))`` at the sample's points ``x``: the moving image
    (affinely aligned) read where it lies, the fixed one pulled back through the inverse."""
    pts = sample.points
    axes = sample.axes if sample.is_grid else None
    psi = inverse_lattice(axes) if inverse_lattice is not None and axes is not None else inverse(pts)
    fixed_back = sample_image(fixed, psi)
    at = None if moving_chain is None else apply_matrix(pts, moving_chain)
    moving_s = sample.read(moving) if at is None else sample_image(moving, at)
    weight = _product(  # each mask read where its image is read; moving_mask is on the fixed grid
        None if fixed_mask is None else sample_image(fixed_mask, psi.detach(), mode="nearest"),
        None if moving_mask is None else sample.read(moving_mask, mode="nearest"),
        inside_grid(at).unsqueeze(1).to(moving_s.dtype) if moving_fov and at is not None else None,
    )
    return similarity(moving_s, fixed_back, is_grid=sample.is_grid, weight=weight)


def _product(*weights: Tensor | None) -> Tensor | None:
    """The product of the sample weights given, left to right (``None`` entries skipped; ``None`` if all are)."""
    out = None
    for w in weights:
        if w is not None:
            out = w if out is None else out * w
    return out
