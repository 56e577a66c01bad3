"""The rigid -> affine alignment stage that runs before the deformable registration.

It finds the world matrix ``W`` (4x4 float64, fixed RAS mm -> moving RAS mm, so that
``moving(W p) ~ fixed(p)``; identity = "aligned by the headers", see
:mod:`nir_lightning.coords`) by stochastic optimisation on an image pyramid:

1. Initialise (:func:`~nir_lightning.alignment.moments.initial_world_matrix`): headers,
   centres of mass, or principal axes. For ``"moments"`` every candidate (headers, centres of
   mass, the 4 principal-axes rotations) gets a short refinement on the coarsest level (rigid
   for ``kind="rigid"``, affine for ``kind="affine"``) and the one with the best similarity
   afterwards wins. Scored as they come, a candidate on the wrong side of a near-symmetry can
   beat a good one that is still 20 degrees off; and after a rigid refinement a sheared or
   scaled anatomy can still score like a wrong pose (seen on the phantom in ~10 % of seeds).
2. Rigid: 6 parameters (:class:`~nir_lightning.alignment.parameters.RigidParameters`), every
   pyramid level from coarse to fine.
3. Affine (``kind="affine"``): 12 parameters started from the rigid result, every level again.

Each step draws ``num_points`` random points in the fixed foreground grown by ``margin`` mm
(or in a user's fixed mask as given), jittered within their voxel, so the fixed and moving grids
never line up exactly, which would give mutual information its interpolation artefacts; maps
them through the chain matrix ``N_m V_m^-1 W V_f N_f^-1``
(:func:`~nir_lightning.coords.normalized_chain_matrix`, built in torch so it is differentiable
in ``W``), samples the moving image there and compares
intensities with Parzen mutual information or global NCC. Points that land outside the moving
image (or outside the moving mask) get weight 0. The cost per step is fixed by
``num_points``, whatever the image size; only building the pyramid touches every voxel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from nir_lightning.alignment.adam import StageAdam
from nir_lightning.alignment.cpu import stage_arithmetic
from nir_lightning.alignment.moments import image_moments, initial_world_matrix
from nir_lightning.alignment.parameters import AffineParameters, RigidParameters
from nir_lightning.alignment.pyramid import MIN_LEVEL_VOXELS, Level, build_level, torch64
from nir_lightning.alignment.validation import check_inputs, check_stage_options
from nir_lightning.coords import inside_grid, voxel_to_normalized
from nir_lightning.core.resample import sample_image
from nir_lightning.losses.mutual_information import mutual_information
from nir_lightning.losses.similarity import global_ncc

__all__ = ["AffineResult", "AffineStage", "LevelHistory"]

_PROBE_STEPS = 30
"""Rigid steps on the coarsest level that each ``init="moments"`` candidate gets before they are compared."""
_PROBE_LR_FACTOR = 2.0
"""The probes' learning rate relative to ``lr``: they must travel some 20 degrees in few steps."""
_FINAL_LR_FRACTION = 0.1
"""The learning rate decays (cosine) to this fraction of its start within every level."""
_PLATEAU_WINDOW = 10
"""With ``early_stop``: every this many steps the mean loss of the last window is compared with
the window before; per-step losses scatter by ~0.008 (MI, 8192 points, the shared 2 mm pair),
so a window's mean is good to ~0.003."""
_SETTLED_SEED_OFFSET = 3
"""With ``early_stop``: the check after a level's first window draws its points from a generator of
its own (seeded ``seed + 3``), so the steps' draws are those of a run without the check."""


@dataclass(frozen=True)
class LevelHistory:
    """One pyramid level of one stage: the loss at its first and last step."""

    stage: str
    shrink: int
    iterations: int
    loss_start: float
    loss_end: float
    settled: bool = False
    """With ``early_stop``: the level's first window did not improve on its start (on one sample of
    points, both evaluated), so the level ended there and its parameters went back to the start."""


@dataclass(frozen=True)
class AffineResult:
    """The outcome of :meth:`AffineStage.fit`.

    Attributes:
        world: the world matrix ``W`` (4x4 float64, fixed RAS mm -> moving RAS mm).
        kind: the stage's ``kind`` (``"none"``, ``"rigid"`` or ``"affine"``).
        seconds: wall time of the fit.
        similarity_before: the loss at ``W = I`` (headers only) on fixed points of the finest
            level (NaN for ``kind="none"``, which evaluates nothing).
        similarity_after: the loss at ``world`` on the same points (lower is better).
        history: per stage and level, the loss at the first and last step.
        initial: the starting matrix of the optimisation (from ``init``).
        waited: ``None`` when the stage ran in this process; when another process ran it
            (``nir register``'s early stage, :mod:`nir_lightning.app.early_affine`), how long
            this one waited for its result (``seconds`` is still the stage's own time).
    """

    world: np.ndarray
    kind: str
    seconds: float
    similarity_before: float
    similarity_after: float
    history: tuple[LevelHistory, ...] = ()
    initial: np.ndarray = field(default_factory=lambda: np.eye(4))
    waited: float | None = None


@dataclass(frozen=True)
class AffineStage:
    """Rigid, then affine, alignment of the moving image to the fixed one (before the deformable part).

    Args:
        kind: ``"none"`` (return the identity: trust the headers), ``"rigid"`` (6 parameters)
            or ``"affine"`` (rigid, then 12 parameters started from the rigid result).
        init: starting point, see :func:`~nir_lightning.alignment.moments.initial_world_matrix`:
            ``"none"`` (headers), ``"com"`` (centres of mass) or ``"moments"`` (principal axes,
            chosen by the similarity after a short refinement of each candidate; the
            headers and ``"com"`` are candidates too).
        similarity: ``"mi"`` (Parzen mutual information: any contrasts) or ``"ncc"`` (global
            normalized cross-correlation: same contrast, linear intensity relation).
        num_bins: histogram bins of ``"mi"``.
        shrink_factors: pyramid levels, coarse to fine: the level's voxel size in units of the
            fixed image's finest voxel size (both images are block-averaged towards it).
        rigid_iterations: optimiser steps per level of the rigid stage (one per shrink factor).
        affine_iterations: optimiser steps per level of the affine stage.
        num_points: random fixed-foreground points per step (the cost per step is fixed by it;
            8192 fills the 32x32 joint histogram of ``"mi"`` well: on 6 dev pairs the stage took
            2.2 s instead of 4.0 s with 16384 and the Dice after the whole chain did not fall).
        margin: millimetres by which the fixed foreground is grown to make the sampling region
            when no fixed mask is given, so that points fall on both sides of the anatomy's
            edge. With points inside the anatomy only, mutual information prefers to shrink the
            moving anatomy where its edge is bright (CSF in a T2): the fixed edge then meets the
            moving background, a purer pairing (on the T2-like shared pair the scales came out
            5-10 % too large, Dice after the stage 0.470; with 10 mm, 0.518; benchmarks/README.md,
            0.2.2). A user's fixed mask is used as given.
        lr: Adam learning rate; a step of ``lr`` moves the anatomy by about ``lr`` times its
            radius (see :mod:`~nir_lightning.alignment.parameters`). It decays (cosine) to a
            tenth within each level and halves from one level to the next.
        seed: seeds the point draws; a fit is deterministic for a given seed (and device).
        early_stop: end a level once its loss has stopped falling: when the mean loss of the
            last ``_PLATEAU_WINDOW`` (10) steps is no lower than that of the 10 before, the
            level runs 10 more steps with the learning rate decaying (cosine) from where it
            is to its final value, and ends. Before that, after the first 10 steps of every
            level but a stage's first (which makes the stage's large moves, and whose first
            steps may overshoot before they descend), the loss at the parameters reached and
            at those the level started from are compared on one fresh sample of points (the
            same points for both, so the difference is not drowned by the ~0.008 scatter of
            the per-step losses); when the steps have not lowered it, the level has nothing
            to do (the coarser level already found its optimum; the steps only jitter about
            it): its parameters go back to the start and it ends (``LevelHistory.settled``).
            A level that lowers its loss in its first steps runs as without the check (the
            same steps: the check's points come from a generator of their own). A pair the
            headers already align costs well under its budget.
            ``False``: every level runs its full budget (the results of 0.2.3, bit for bit).

    >>> AffineStage(kind="rigid").kind
    'rigid'
    >>> AffineStage(num_bins=1)
    Traceback (most recent call last):
    ...
    nir_lightning.errors.InputError: AffineStage.num_bins must be an integer >= 4, got 1; 32 bins suit images scaled to [0, 1].
    """

    kind: Literal["none", "rigid", "affine"] = "affine"
    init: Literal["none", "com", "moments"] = "moments"
    similarity: Literal["mi", "ncc"] = "mi"
    num_bins: int = 32
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    rigid_iterations: tuple[int, ...] = (100, 50, 25)
    affine_iterations: tuple[int, ...] = (100, 50, 25)
    num_points: int = 2**13
    margin: float = 10.0
    lr: float = 0.02
    seed: int = 0
    early_stop: bool = True

    def __post_init__(self) -> None:
        check_stage_options(self)  # InputError naming the option; lists become tuples

    # -- the loss -------------------------------------------------------------------------------
    def _similarity(self, fixed_values: Tensor, moving_values: Tensor, weight: Tensor) -> Tensor:
        if self.similarity == "mi":
            return mutual_information(fixed_values, moving_values, num_bins=self.num_bins, weight=weight)
        w = None if weight is None else weight.reshape(1, -1)
        return global_ncc(fixed_values.reshape(1, -1), moving_values.reshape(1, -1), weight=w)

    def _loss(self, level: Level, world: Tensor, points: Tensor, fixed_values: Tensor) -> Tensor:
        """Similarity of fixed values at level-normalized ``points`` ``(N, 3)`` and the moving image at ``W``."""
        return self._losses(level, [world], points, fixed_values)[0]

    def _losses(self, level: Level, worlds: Sequence[Tensor], points: Tensor, fixed_values: Tensor) -> list[Tensor]:
        """:meth:`_loss` for each of several world matrices on the same points, the moving image
        read once for all (each point's read is independent of the others: the same numbers)."""
        moved = []
        for world in worlds:
            chain = level.left @ world @ level.right
            lin = chain[:3, :3].to(points.dtype)
            moved.append(points @ lin.T + chain[:3, 3].to(points.dtype))
        every = torch.cat(moved) if len(moved) > 1 else moved[0]
        grid = every.reshape(1, -1, 1, 1, 3)
        moving_values = sample_image(level.moving, grid).reshape(len(moved), -1)
        weight = inside_grid(every.detach()).to(moving_values.dtype).reshape(len(moved), -1)
        if level.moving_mask is not None:
            weight = weight * sample_image(level.moving_mask, grid.detach()).reshape(len(moved), -1)
        return [self._similarity(fixed_values, v, w) for v, w in zip(moving_values, weight, strict=True)]

    def _draw(self, level: Level, generator: torch.Generator, num_points: int | None = None) -> tuple[Tensor, Tensor]:
        """Random fixed points (level-normalized, ``(N, 3)``) in the sampling region and their values."""
        device = level.region.device
        n = self.num_points if num_points is None else num_points
        pick = torch.randint(0, level.region.numel(), (n,), generator=generator, device=device)
        flat = level.region[pick]
        d0, d1, d2 = level.fixed_shape
        vox = torch.stack([flat // (d1 * d2), (flat // d2) % d1, flat % d2], dim=-1).to(torch.float32)
        vox = vox + torch.rand(vox.shape, generator=generator, device=device) - 0.5
        high = torch.tensor([d0 - 1, d1 - 1, d2 - 1], dtype=torch.float32, device=device)
        vox = torch.minimum(vox.clamp(min=0.0), high)
        points = voxel_to_normalized(vox, level.fixed_shape)
        values = sample_image(level.fixed, points.reshape(1, -1, 1, 1, 3)).reshape(-1)
        return points, values

    # -- fitting --------------------------------------------------------------------------------
    def fit(
        self,
        fixed: Tensor,
        fixed_affine: np.ndarray,
        moving: Tensor,
        moving_affine: np.ndarray,
        *,
        fixed_mask: Tensor | None = None,
        moving_mask: Tensor | None = None,
        foreground: Tensor | None = None,
    ) -> AffineResult:
        """Find the world matrix that aligns ``moving`` to ``fixed``.

        Args:
            fixed: float tensor ``(1, 1, D0, D1, D2)`` scaled to ``[0, 1]``, on its own grid.
            fixed_affine: its 4x4 NIfTI affine (voxel -> RAS mm).
            moving: float tensor ``(1, 1, E0, E1, E2)`` scaled to ``[0, 1]``, on its own grid
                (shape, spacing, orientation and field of view may differ from the fixed one).
            moving_affine: its 4x4 NIfTI affine.
            fixed_mask: bool ``(D0, D1, D2)``, a user's mask: points are drawn inside it
                exactly, and it is the support of the moments.
            moving_mask: bool ``(E0, E1, E2)``: moving points outside it do not count.
            foreground: bool ``(D0, D1, D2)``, without ``fixed_mask``: the fixed anatomy
                (support of the moments); points are drawn in it grown by ``margin`` mm.
                Default: ``fixed > 0``, right for skull-stripped images; pass a foreground
                mask for raw scans, whose noisy background would otherwise take most of the
                points (a 256x256x160 scan with a 1.3 M voxel brain: ~88 %).

        Returns:
            :class:`AffineResult`; ``world`` maps fixed RAS mm to moving RAS mm. Runs on
            ``fixed``'s device; on the CPU on one thread with subnormal floats flushed to zero
            (:mod:`~nir_lightning.alignment.cpu`: 4x quicker, the same numbers), whatever
            ``torch.get_num_threads()`` is.
        """
        start = time.perf_counter()
        with stage_arithmetic(fixed.device):  # one thread, subnormals flushed: MI steps 4x quicker (alignment/cpu.py)
            return self._fit(start, fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask, foreground)

    def _fit(
        self, start: float, fixed: Tensor, fixed_affine: np.ndarray, moving: Tensor, moving_affine: np.ndarray,
        fixed_mask: Tensor | None, moving_mask: Tensor | None, foreground: Tensor | None,
    ) -> AffineResult:
        fixed_affine, moving_affine = check_inputs(fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask)
        if foreground is not None and tuple(foreground.shape) != tuple(fixed.shape[2:]):
            raise ValueError(f"foreground must have the fixed image's shape {tuple(fixed.shape[2:])}, got {tuple(foreground.shape)}")
        if self.kind == "none":
            return AffineResult(world=np.eye(4), kind=self.kind, seconds=time.perf_counter() - start, similarity_before=float("nan"), similarity_after=float("nan"))
        device = fixed.device
        moving = moving.to(device=device, dtype=fixed.dtype)
        if fixed_mask is None and foreground is None:
            foreground = fixed[0, 0] > 0
        levels = [build_level(s, fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask, foreground, self.margin) for s in self.shrink_factors]
        # A level whose fixed image is smaller than MIN_LEVEL_VOXELS along an axis holds too little
        # anatomy to steer 12 parameters (on small images the fit drifts there); skip it, keep the finest.
        usable = [i for i, lv in enumerate(levels) if min(lv.fixed_shape) >= MIN_LEVEL_VOXELS or i == len(levels) - 1]
        generator = torch.Generator(device=device).manual_seed(int(self.seed))
        settle_generator = torch.Generator(device=device).manual_seed(int(self.seed) + _SETTLED_SEED_OFFSET)
        eval_generator = torch.Generator(device=device).manual_seed(int(self.seed) + 1)
        fine_eval = self._draw(levels[-1], eval_generator)

        @torch.no_grad()
        def evaluate(level: Level, sample: tuple[Tensor, Tensor], world: np.ndarray) -> float:
            return float(self._loss(level, torch64(world, device), *sample))

        f3 = fixed[0, 0]
        support = fixed_mask if fixed_mask is not None else foreground
        assert support is not None
        fmask = support.to(device)
        mmask = moving_mask.to(device) if moving_mask is not None else None
        moments = image_moments(f3, fixed_affine, fmask)  # once: the candidates of init use them too
        centre = moments.centre
        radius = float(np.sqrt(max(float(moments.values.sum()), 1e-6)))

        def probe(candidates: list[np.ndarray]) -> list[float]:
            """Each candidate's loss after a short refinement from it (multi-start for ``init="moments"``)."""
            params: list[RigidParameters | AffineParameters] = [
                AffineParameters(centre, scale=radius, base=w, device=device) if self.kind == "affine"
                else RigidParameters(centre, scale=radius, base=w, device=device)
                for w in candidates
            ]
            probe_generator = torch.Generator(device=device).manual_seed(int(self.seed) + 2)
            self._refine_together(levels[0], params, _PROBE_STEPS, _PROBE_LR_FACTOR * self.lr, probe_generator, max(64, self.num_points // 4))
            return [evaluate(levels[-1], fine_eval, p.numpy()) for p in params]

        initial = initial_world_matrix(
            fixed, fixed_affine, moving, moving_affine, mode=self.init, similarity_fn=probe,
            fixed_mask=fmask, moving_mask=mmask, fixed_moments=moments,
        )

        history: list[LevelHistory] = []
        world = initial
        best = evaluate(levels[-1], fine_eval, world)
        stages: list[tuple[str, tuple[int, ...]]] = [("rigid", self.rigid_iterations)]
        if self.kind == "affine":
            stages.append(("affine", self.affine_iterations))
        for name, iterations in stages:
            params: RigidParameters | AffineParameters
            if name == "rigid":
                params = RigidParameters(centre, scale=radius, base=world, device=device)
            else:
                params = AffineParameters(centre, scale=radius, base=world, device=device)
            carried = 0  # iterations of skipped levels run at the next usable one
            for index, (level, steps) in enumerate(zip(levels, iterations, strict=True)):
                if index not in usable:
                    carried += steps
                    continue
                steps, carried = steps + carried, 0
                if steps == 0:
                    continue
                lr = self.lr * 0.5 ** (index - usable[0])
                # the check after the first window: not on a stage's first level, which makes the
                # stage's large moves (its first steps may overshoot before they descend)
                settle = settle_generator if index != usable[0] else None
                history.append(self._optimise(
                    name, level, params, steps, lr, generator, early_stop=self.early_stop, settle_generator=settle,
                ))
            # keep a stage only if it improves the full-resolution similarity on a fixed
            # evaluation sample: a stage never leaves the pair worse than it found it
            candidate = params.numpy()
            score = evaluate(levels[-1], fine_eval, candidate)
            if score <= best:
                world, best = candidate, score
        return AffineResult(
            world=world,
            kind=self.kind,
            seconds=time.perf_counter() - start,
            similarity_before=evaluate(levels[-1], fine_eval, np.eye(4)),
            similarity_after=evaluate(levels[-1], fine_eval, world),
            history=tuple(history),
            initial=initial,
        )

    def _refine_together(
        self, level: Level, params: Sequence[RigidParameters | AffineParameters], steps: int, lr: float,
        generator: torch.Generator, num_points: int,
    ) -> None:
        """:meth:`_optimise` (full budget, no early stop) of several starts at once: each step draws
        one sample for all of them and reads the moving image once, and their losses are summed
        for one backward pass (no loss depends on another's parameters, so each start's steps are
        those it would take alone, from a generator seeded as ``generator``)."""
        optimiser = StageAdam([p for start in params for p in start.parameters()], lr=lr)
        for step in range(steps):
            _set_lr(optimiser, lr, _cosine(step, 0, steps, 1.0))
            points, values = self._draw(level, generator, num_points)
            optimiser.zero_grad()
            losses = self._losses(level, [start.matrix() for start in params], points, values)
            torch.stack(losses).sum().backward()
            optimiser.step()

    def _optimise(
        self,
        name: str,
        level: Level,
        params: RigidParameters | AffineParameters,
        steps: int,
        lr: float,
        generator: torch.Generator,
        *,
        num_points: int | None = None,
        early_stop: bool = False,
        settle_generator: torch.Generator | None = None,
    ) -> LevelHistory:
        optimiser = StageAdam(params.parameters(), lr=lr)
        losses: list[float] = []
        # with early_stop and a settle_generator: the level's start, for the check after the first window
        check = early_stop and settle_generator is not None
        start_values = [p.detach().clone() for p in params.parameters()] if check else []
        start_matrix = params.matrix().detach() if check else None
        # the cosine runs from `start` (at `scale` of the learning rate's range) to the final value at step `end`
        start, end, scale = 0, steps, 1.0
        w = _PLATEAU_WINDOW
        step = 0
        while step < end:
            cosine = _cosine(step, start, end, scale)
            _set_lr(optimiser, lr, cosine)
            points, values = self._draw(level, generator, num_points)
            optimiser.zero_grad()
            loss = self._loss(level, params.matrix(), points, values)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            step += 1
            if check and step == w and end - step > w:
                assert settle_generator is not None and start_matrix is not None
                if self._settled(level, params, start_matrix, settle_generator, num_points):
                    with torch.no_grad():
                        for p, v in zip(params.parameters(), start_values, strict=True):
                            p.copy_(v)
                    return LevelHistory(stage=name, shrink=level.shrink, iterations=step, loss_start=losses[0], loss_end=losses[0], settled=True)
            flat = early_stop and start == 0 and step % w == 0 and step >= 2 * w and end - step > w
            if flat and float(np.mean(losses[-w:])) >= float(np.mean(losses[-2 * w : -w])):
                start, end, scale = step, step + w, cosine  # no lower than the window before: decay and end
        tail = max(1, len(losses) // 10)  # average the last steps: single losses are noisy
        return LevelHistory(
            stage=name,
            shrink=level.shrink,
            iterations=len(losses),
            loss_start=losses[0],
            loss_end=float(np.mean(losses[-tail:])),
        )

    @torch.no_grad()
    def _settled(
        self, level: Level, params: RigidParameters | AffineParameters, start: Tensor, generator: torch.Generator, num_points: int | None,
    ) -> bool:
        """Whether the parameters reached are no better than ``start`` (a world matrix) on one fresh sample of ``level``."""
        sample = self._draw(level, generator, num_points)
        now = float(self._loss(level, params.matrix(), *sample))
        return now >= float(self._loss(level, start, *sample))


def _cosine(step: int, start: int, end: int, scale: float) -> float:
    """Where a level's learning rate is in its range at ``step``: ``scale`` at ``start``, 0 at ``end - 1`` (cosine)."""
    return scale * 0.5 * (1.0 + math.cos(math.pi * (step - start) / max(1, end - start - 1)))


def _set_lr(optimiser: StageAdam, lr: float, cosine: float) -> None:
    """The learning rate ``cosine`` of the way from its final value (``_FINAL_LR_FRACTION`` of ``lr``) to ``lr``."""
    optimiser.lr = lr * (_FINAL_LR_FRACTION + (1.0 - _FINAL_LR_FRACTION) * cosine)
