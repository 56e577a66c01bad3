"""The pyramid's Gaussian smoothing: MONAI's GaussianFilter, computed by shifted sums."""

from __future__ import annotations

import pytest
import torch
from monai.networks.layers import GaussianFilter

from nir_lightning.core.smoothing import filter_axis, gaussian_smooth


@pytest.mark.parametrize(
    ("shape", "sigma"),
    [
        ((1, 1, 17, 20, 23), 1.0),
        ((1, 2, 12, 9, 31), [0.5, 1.3, 2.0]),
        ((1, 1, 10, 11, 12), [1.0, 0.0, 0.7]),  # 0 on an axis: MONAI's [0, 1, 0] kernel there
        ((1, 1, 6, 40, 7), 3.0),  # a kernel longer than the first axis
    ],
)
def test_equals_monai_gaussian_filter(shape: tuple[int, ...], sigma: float | list[float]) -> None:
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 100
    expected = GaussianFilter(spatial_dims=3, sigma=sigma, truncated=4.0)(image)
    out = gaussian_smooth(image, sigma)
    assert out.shape == image.shape
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)


def test_impulse_response_is_the_normalised_kernel() -> None:
    image = torch.zeros(1, 1, 21, 21, 21)
    image[0, 0, 10, 10, 10] = 1.0
    out = gaussian_smooth(image, 2.0)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-4)
    profile = out[0, 0, :, 10, 10]
    assert torch.allclose(profile, profile.flip(0))  # symmetric about the impulse
    ratio = float(profile[12] / profile[10])  # exp(-2^2 / (2 * 2^2)) for a sampled Gaussian
    assert ratio == pytest.approx(0.6065, abs=0.01)
    assert float(out[0, 0, 10, 10, 0]) == 0.0  # beyond 4 sigma: truncated


def test_filter_axis_shifts_and_pads_with_zeros() -> None:
    x = torch.arange(1.0, 6.0).reshape(1, 1, 1, 1, 5)
    assert filter_axis(x, torch.tensor([0.0, 0.0, 1.0]), 2).flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 0.0]
    assert filter_axis(x, torch.tensor([1.0]), 2) is x
    with pytest.raises(ValueError, match="odd-length"):
        filter_axis(x, torch.tensor([0.5, 0.5]), 2)


def test_wrong_number_of_sigmas_is_refused() -> None:
    with pytest.raises(ValueError, match="one sigma or three"):
        gaussian_smooth(torch.zeros(1, 1, 4, 4, 4), [1.0, 1.0])
