"""``core.smoothing``: the pyramid's Gaussian is MONAI's ``GaussianFilter``, bit for bit, without importing MONAI."""

from __future__ import annotations

import pytest
import torch

from nir_lightning.core.smoothing import gaussian_smooth


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.7, 3.0, (1.0, 2.0, 0.6), (0.0, 1.5, 1.5)])
@pytest.mark.parametrize("channels", [1, 2])
def test_gaussian_smooth_is_monai_gaussian_filter_bit_for_bit(sigma: float | tuple[float, float, float], channels: int) -> None:
    from monai.networks.layers import GaussianFilter

    image = torch.rand(1, channels, 13, 17, 11, generator=torch.Generator().manual_seed(5))
    sigmas = [float(sigma)] * 3 if isinstance(sigma, float) else list(sigma)
    expected = GaussianFilter(spatial_dims=3, sigma=sigmas if len(set(sigmas)) > 1 else sigmas[0], truncated=4.0)(image)
    out = gaussian_smooth(image, sigma)
    assert out.shape == image.shape and torch.equal(out, expected)


def test_importing_and_smoothing_loads_no_monai() -> None:
    import subprocess
    import sys

    code = "import sys, torch\nfrom nir_lightning.core.smoothing import gaussian_smooth\ngaussian_smooth(torch.rand(1, 1, 8, 8, 8), 1.0)\nprint('monai' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
