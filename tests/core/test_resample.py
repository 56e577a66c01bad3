"""``core/resample``: sampling an image on all threads gives grid_sample's values and the points' gradients bit for bit (an image's own gradient up to rounding)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from nir_lightning.core.resample import grid_sample_threads, sample_image
from nir_lightning.fields.grid_reads import _take


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [8192, 8191])  # split into one batch item per thread / not divisible: grid_sample itself
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_grid_sample_threads_is_grid_sample_bit_for_bit_with_its_gradient(two_threads: None, n: int, padding_mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 9, 10, 11, generator=g)
    pts = (torch.rand(1, n, 1, 1, 3, generator=g) * 2.4 - 1.2)  # some outside [-1, 1]: padding
    a = pts.clone().requires_grad_()
    b = pts.clone().requires_grad_()
    ref = F.grid_sample(image, a, padding_mode=padding_mode, align_corners=True)
    out = grid_sample_threads(image, b, padding_mode=padding_mode)
    assert out.shape == ref.shape == (1, 3, n, 1, 1)
    assert torch.equal(out, ref)
    w = torch.rand(ref.shape, generator=g)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    assert a.grad is not None and b.grad is not None
    assert torch.equal(a.grad, b.grad)


def test_an_image_that_needs_its_gradient_gets_it_summed_over_the_thread_batches(two_threads: None) -> None:
    """A feature grid read off its lattice during a fit: values and the points' gradient bit for
    bit, the image's gradient that of grid_sample up to the order of the sum over the items."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 4, 9, 10, 11, generator=g, requires_grad=True)
    ref_image = image.detach().clone().requires_grad_()
    pts = (torch.rand(1, 8192, 1, 1, 3, generator=g) * 2 - 1).requires_grad_()
    ref_pts = pts.detach().clone().requires_grad_()
    out = grid_sample_threads(image, pts, padding_mode="border")
    ref = F.grid_sample(ref_image, ref_pts, padding_mode="border", align_corners=True)
    assert torch.equal(out, ref)
    w = torch.rand(ref.shape, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert pts.grad is not None and ref_pts.grad is not None and image.grad is not None and ref_image.grad is not None
    assert torch.equal(pts.grad, ref_pts.grad)
    torch.testing.assert_close(image.grad, ref_image.grad, rtol=1e-5, atol=1e-5)
    assert image.grad.abs().sum() > 100  # a gradient that could be wrong


def test_a_large_image_that_needs_its_gradient_is_sampled_by_grid_sample_itself(two_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from nir_lightning.core import resample

    monkeypatch.setattr(resample, "_GRAD_SPLIT_MAX", 1000)  # 2 x 2*6*7*8 gradient elements: above the cap
    image = torch.rand(1, 2, 6, 7, 8, requires_grad=True)
    pts = torch.rand(1, 8192, 1, 1, 3) * 2 - 1
    grid_sample_threads(image, pts).sum().backward()
    ref = image.detach().clone().requires_grad_()
    F.grid_sample(ref, pts, align_corners=True).sum().backward()
    assert image.grad is not None and ref.grad is not None
    assert torch.equal(image.grad, ref.grad)  # no sum over thread batches: the same accumulation order


def test_sample_image_on_a_lattice_is_unchanged_by_the_flattening(two_threads: None) -> None:
    image = torch.rand(1, 1, 12, 13, 14)
    pts = torch.rand(2, 16, 16, 16, 3) * 2 - 1
    ref = F.grid_sample(image, pts.flip(-1).reshape(1, 32, 16, 16, 3), align_corners=True).reshape(1, 2, 16, 16, 16).transpose(0, 1)
    assert torch.equal(sample_image(image, pts), ref)


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_take_is_index_select(dim: int) -> None:
    x = torch.rand(4, 9, 10, 11)
    index = torch.randint(0, x.shape[dim], (7,))
    assert torch.equal(_take(x, dim, index), x.index_select(dim, index))
