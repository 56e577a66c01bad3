"""The affine stage's check after a level's first window (``early_stop``, issue 25): a level whose
first 10 steps do not lower its loss (on one sample of points, both evaluated) goes back to its
start and ends; a level that is still descending runs exactly as without the check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nir_lightning.alignment import AffineStage
from nir_lightning.alignment.parameters import RigidParameters
from nir_lightning.alignment.pyramid import build_level
from tests.alignment.test_affine_stage import (
    FAST,
    MAX_ENTRY,
    MAX_ROTATION_DEG,
    MAX_TRANSLATION_MM,
    moving_for,
    rotation_error_deg,
    tensor,
    translation_error_mm,
    true_affine,
    true_rigid,
)

BUDGET = sum(AffineStage().rigid_iterations) + sum(AffineStage().affine_iterations)


def test_an_aligned_pair_settles_in_few_steps_and_stays_put(phantom):
    """moving = fixed: the levels after each stage's first settle after their first window, so
    the stage runs under half its 350-step budget (measured, seeds 0/1/2: 150/145/165 steps;
    the shrink-4 level is too small here and carries its steps to shrink 2, each stage's first
    level, which has no check) and stays at the identity."""
    image, affine, centre = phantom
    result = AffineStage(kind="affine", init="none", **FAST).fit(tensor(image), affine, tensor(image), affine)
    steps = sum(h.iterations for h in result.history)
    first = {h.stage: h for h in reversed(result.history)}  # each stage's first level
    checked = [h for h in result.history if h is not first[h.stage]]
    settled = [h for h in checked if h.settled]
    assert not any(h.settled for h in first.values())
    assert len(settled) >= 1 and all(h.iterations == 10 for h in settled)
    assert steps < 0.5 * BUDGET
    assert translation_error_mm(result.world, np.eye(4), centre) < MAX_TRANSLATION_MM
    assert np.abs(result.world[:3, :3] - np.eye(3)).max() < MAX_ENTRY


@pytest.mark.parametrize("how", ["header", "resampled"])
def test_a_misaligned_pair_is_still_recovered(phantom, how):
    """17 degrees, 20 mm, scales 0.92-1.08 and a shear: recovered within the tolerances of the
    full budget (1 degree, 1 mm, 0.02 per matrix entry)."""
    image, affine, centre = phantom
    truth = true_affine()
    moving, moving_affine = moving_for(how, image, affine, truth)
    result = AffineStage(kind="affine", **FAST).fit(tensor(image), affine, moving, moving_affine)
    assert rotation_error_deg(result.world, truth) < MAX_ROTATION_DEG
    assert translation_error_mm(result.world, truth, centre) < MAX_TRANSLATION_MM
    assert np.abs(result.world[:3, :3] - truth[:3, :3]).max() < MAX_ENTRY
    assert not result.history[0].settled  # the first level has 17 degrees to turn: it runs


def _level_fit(phantom, start: np.ndarray, settle: bool, *, aligned: bool = False) -> tuple[np.ndarray, object]:
    """One rigid level (shrink 2, 60 steps) from ``start`` on the header-moved phantom (17 degrees
    and 20 mm off the identity), or with ``aligned`` on the phantom against itself."""
    image, affine, centre = phantom
    fixed = tensor(image)
    moving, moving_affine = (fixed, affine) if aligned else moving_for("header", image, affine, true_rigid())
    level = build_level(2, fixed, affine, moving, moving_affine, None, None, fixed[0, 0] > 0, 10.0)
    stage = AffineStage(kind="rigid", **FAST)
    params = RigidParameters(centre, scale=60.0, base=start, device="cpu")
    generator = torch.Generator().manual_seed(0)
    settle_generator = torch.Generator().manual_seed(3) if settle else None
    history = stage._optimise("rigid", level, params, 60, 0.02, generator, early_stop=True, settle_generator=settle_generator)
    return params.numpy(), history


def test_a_descending_level_runs_bit_for_bit_as_without_the_check(phantom):
    """From the identity (17 degrees off) the first window lowers the loss: the check draws its
    points from its own generator, so every step and the result are those of a run without it."""
    with_check, h1 = _level_fit(phantom, np.eye(4), settle=True)
    without, h2 = _level_fit(phantom, np.eye(4), settle=False)
    assert not h1.settled and h1.iterations == h2.iterations > 10  # type: ignore[attr-defined]
    np.testing.assert_array_equal(with_check, without)


def test_a_settled_level_goes_back_to_its_start(phantom, monkeypatch):
    """When the check finds the first window no better (here forced), the level ends after 10
    steps with its parameters, and so the matrix, exactly where it started; the same level
    without the check runs its 60 steps and ends elsewhere."""
    monkeypatch.setattr(AffineStage, "_settled", lambda self, *args: True)
    world, history = _level_fit(phantom, np.eye(4), settle=True)
    assert history.settled and history.iterations == 10  # type: ignore[attr-defined]
    np.testing.assert_array_equal(world, np.eye(4))
    moved, full = _level_fit(phantom, np.eye(4), settle=False)
    assert full.iterations > 10 and np.abs(moved - np.eye(4)).max() > 0.01  # type: ignore[attr-defined]


def test_no_better_than_the_start_is_settled(phantom):
    """The check itself: the start against itself is settled (equal losses on one sample); a
    matrix 17 degrees nearer the truth is not."""
    image, affine, centre = phantom
    fixed = tensor(image)
    moving, moving_affine = moving_for("header", image, affine, true_rigid())
    level = build_level(2, fixed, affine, moving, moving_affine, None, None, fixed[0, 0] > 0, 10.0)
    stage = AffineStage(kind="rigid", **FAST)
    at_start = RigidParameters(centre, scale=60.0, base=np.eye(4), device="cpu")
    eye = torch.eye(4, dtype=torch.float64)
    assert stage._settled(level, at_start, eye, torch.Generator().manual_seed(3), None)
    at_truth = RigidParameters(centre, scale=60.0, base=true_rigid(), device="cpu")
    assert not stage._settled(level, at_truth, eye, torch.Generator().manual_seed(3), None)
