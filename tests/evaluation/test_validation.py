"""The fit's validation metrics (``val/*``) on transforms whose answer is known."""

from __future__ import annotations

import pytest
import torch

from nir_lightning.evaluation.validation import validation_metrics


def _pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 12, 12, 12, generator=g) + 0.5  # all foreground
    labels = torch.zeros(1, 1, 12, 12, 12, dtype=torch.int32)
    labels[..., 2:6, 2:10, 2:10] = 1
    labels[..., 6:10, 2:10, 2:10] = 2
    return img, img.clone(), labels


def test_identity_is_a_perfect_match() -> None:
    img, moving, labels = _pair()
    out = validation_metrics(lambda x: x, img, moving, stride=1, window=3, generator=torch.Generator().manual_seed(0),
                             labels=(labels, labels, [1, 2]))
    assert float(out["lncc"]) == pytest.approx(-1.0, abs=1e-5)
    assert float(out["folding_percent"]) == 0.0
    assert out["dice"] == pytest.approx(1.0)


def test_a_mirror_folds_every_cell_and_swaps_the_labels() -> None:
    img, moving, labels = _pair()
    flip = torch.tensor([-1.0, 1.0, 1.0])  # x0 -> -x0: det J = -1 everywhere
    out = validation_metrics(lambda x: x * flip, img, moving, stride=1, window=3, generator=torch.Generator().manual_seed(0),
                             labels=(labels, labels, [1, 2]))
    assert float(out["folding_percent"]) == pytest.approx(100.0)
    assert out["dice"] == pytest.approx(0.0)  # label 1 (rows 2-5) lands on label 2 (rows 6-9) and back
    assert float(out["lncc"]) > -0.5  # a random image does not match its mirror


def test_without_labels_there_is_no_dice() -> None:
    img, moving, _ = _pair()
    out = validation_metrics(lambda x: x, img, moving, stride=4, window=2, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"lncc", "folding_percent"}
