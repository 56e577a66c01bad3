"""Parzen-window mutual information: ordering, invariances, weights, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from nir_lightning.losses.mutual_information import mutual_information


def rand(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_self_information_beats_shuffled_and_is_bounded_by_log_bins():
    a = rand(8192)
    shuffled = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(1))]
    self_mi = float(mutual_information(a, a, num_bins=16))
    assert self_mi < -1.5
    assert self_mi >= -math.log(16) - 1e-6
    assert abs(float(mutual_information(a, shuffled, num_bins=16))) < 0.1


def test_invariant_to_monotonic_and_non_monotonic_remaps():
    a = rand(8192)
    self_mi = float(mutual_information(a, a))
    assert float(mutual_information(a, 1.0 - a)) == pytest.approx(self_mi, rel=1e-6)
    # Two intensities map to one: information about b given a stays complete, so MI stays high.
    folded = float(mutual_information(a, 1.0 - (2.0 * a - 1.0) ** 2))
    assert folded < 0.7 * self_mi
    assert float(mutual_information(1.0 - (2.0 * a - 1.0) ** 2, a)) == pytest.approx(folded, rel=1e-6)


def test_normalized_is_mi_over_the_joint_entropy_in_minus_one_to_zero():
    a = rand(8192)
    shuffled = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(1))]
    for b in (a, 1.0 - (2.0 * a - 1.0) ** 2, shuffled):
        nmi = float(mutual_information(a, b, normalized=True))
        assert -1.0 <= nmi <= 0.0
    assert float(mutual_information(a, a, normalized=True)) < float(mutual_information(a, 1.0 - (2.0 * a - 1.0) ** 2, normalized=True)) - 0.1
    assert abs(float(mutual_information(a, shuffled, normalized=True))) < 0.02
    # doubling the samples (the overlap) leaves it alone
    twice = torch.cat([a, a])
    assert float(mutual_information(twice, twice, normalized=True)) == pytest.approx(float(mutual_information(a, a, normalized=True)), rel=1e-9)


def test_any_shape_and_symmetric():
    a = rand(2 * 3 * 4 * 5).reshape(1, 1, 2, 3, 4, 5)
    b = rand(a.numel(), seed=3).reshape(a.shape)
    assert mutual_information(a, b).shape == ()
    assert float(mutual_information(a, b)) == pytest.approx(float(mutual_information(b, a)), rel=1e-9)


def test_weights_exclude_samples():
    a = rand(4000)
    b = a.clone()
    noise = rand(4000, seed=5)
    b[2000:] = noise[2000:]  # second half unrelated
    weight = torch.zeros(4000, dtype=torch.float64)
    weight[:2000] = 1.0
    # Garbage in the excluded half (even far outside [0, 1]) must not change the loss.
    b2 = b.clone()
    b2[2000:] = 7.0
    ref = mutual_information(a[:2000], b[:2000])
    assert float(mutual_information(a, b, weight=weight)) == pytest.approx(float(ref), rel=1e-9)
    assert float(mutual_information(a, b2, weight=weight)) == pytest.approx(float(ref), rel=1e-9)
    assert float(mutual_information(a, b, weight=weight)) < float(mutual_information(a, b)) - 0.3
    assert float(mutual_information(a, b, weight=torch.zeros_like(a))) == 0.0


def test_gradient_finite_and_values_outside_unit_range_contribute():
    a = rand(2048)
    b0 = a + 0.05 * rand(2048, seed=9) - 0.02  # some values outside [0, 1]
    assert float(b0.min()) < 0.0 and float(b0.max()) > 1.0
    b = b0.clone().requires_grad_(True)
    loss = mutual_information(a, b)
    loss.backward()
    assert b.grad is not None and bool(torch.isfinite(b.grad).all())
    outside = (b0 < 0) | (b0 > 1)
    assert float(b.grad[outside].abs().sum()) > 0.0  # not clamped away


@pytest.mark.parametrize("normalized", [False, True])
def test_gradient_matches_finite_differences(normalized):
    a = rand(64)
    b = rand(64, seed=2)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: mutual_information(a, y, num_bins=8, sigma_ratio=1.0, normalized=normalized), (b,))


def test_bad_arguments():
    a = rand(10)
    with pytest.raises(ValueError, match="same shape"):
        mutual_information(a, rand(11))
    with pytest.raises(ValueError, match="num_bins"):
        mutual_information(a, a, num_bins=1)
    with pytest.raises(ValueError, match="weight"):
        mutual_information(a, a, weight=torch.ones(3))
