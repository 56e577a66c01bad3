"""Fourier features, coordinate MLPs and the displacement field."""

from __future__ import annotations

import math

import pytest
import torch

from nir_lightning.fields.displacement import DisplacementField
from nir_lightning.fields.encoding import FourierFeatures
from nir_lightning.fields.mlp import CoordinateMLP, SineLayer


def test_fourier_features_values():
    enc = FourierFeatures(num_frequencies=8, sigma=2.0, seed=3)
    x = torch.rand(20, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = enc(x)
    assert y.shape == (20, 16)
    assert enc.out_features == 16
    proj = math.pi * x @ enc.matrix.T
    # float32 matmul order differs from the reference product: allow a few ulps of the argument
    assert torch.allclose(y[:, :8], torch.sin(proj), atol=1e-5)
    assert torch.allclose(y[:, 8:], torch.cos(proj), atol=1e-5)
    assert torch.allclose(y[:, :8] ** 2 + y[:, 8:] ** 2, torch.ones(20, 8), atol=1e-5)


def test_fourier_matrix_is_seeded_buffer_with_sigma_scale():
    a = FourierFeatures(num_frequencies=4000, sigma=2.5, seed=7)
    b = FourierFeatures(num_frequencies=4000, sigma=2.5, seed=7)
    c = FourierFeatures(num_frequencies=4000, sigma=2.5, seed=8)
    assert torch.equal(a.matrix, b.matrix)
    assert not torch.equal(a.matrix, c.matrix)
    assert "matrix" in a.state_dict()  # saved in checkpoints
    assert float(a.matrix.std()) == pytest.approx(2.5, rel=0.03)
    # independent of the global RNG
    torch.manual_seed(0)
    d = FourierFeatures(num_frequencies=5, seed=1)
    torch.manual_seed(99)
    e = FourierFeatures(num_frequencies=5, seed=1)
    assert torch.equal(d.matrix, e.matrix)


def test_zero_frequencies_is_identity_encoding():
    enc = FourierFeatures(num_frequencies=0)
    x = torch.rand(4, 3)
    assert torch.equal(enc(x), x)
    assert enc.out_features == 3


@pytest.mark.parametrize("kwargs", [{"num_frequencies": -1}, {"num_frequencies": 4, "sigma": 0.0}])
def test_fourier_features_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        FourierFeatures(**kwargs)


@pytest.mark.parametrize("activation", ["sine", "relu", "silu"])
def test_coordinate_mlp_shape_and_small_initial_output(activation):
    torch.manual_seed(0)
    mlp = CoordinateMLP(in_features=6, out_features=3, width=32, depth=3, activation=activation).requires_grad_(False)
    out = mlp(torch.rand(100, 6) * 2 - 1)
    assert out.shape == (100, 3)
    # output layer starts at output_scale=1e-3 of the usual init: |out| <= width * bound * max|h|
    bound = 1e-3 * math.sqrt(6.0 / 32)
    assert float(mlp.output.bias.abs().max()) == 0.0
    assert float(mlp.output.weight.abs().max()) <= bound
    max_hidden = float(mlp.hidden(torch.rand(100, 6) * 2 - 1).abs().max())
    assert float(out.abs().max()) <= 32 * bound * max(max_hidden, 1.0)
    assert float(out.abs().max()) < 0.05


@pytest.mark.parametrize("activation", ["sine", "relu", "silu"])
def test_forward_mode_jacobian_equals_autograd(activation):
    """The hand-written forward mode (the folding penalty's exact det J) is autograd's Jacobian:
    for SiLU its derivative s (1 + x (1 - s)) at every hidden unit, to float64 rounding, also
    through two hidden layers and at negative inputs, where SiLU dips below 0."""
    torch.manual_seed(0)
    mlp = CoordinateMLP(in_features=5, out_features=3, width=16, depth=2, activation=activation, omega0=1.0, output_scale=1.0).double().requires_grad_(False)
    x = torch.randn(40, 5, dtype=torch.float64) * 3
    y, dy = mlp.forward_with_jacobian(x, torch.eye(5, dtype=torch.float64).expand(40, 5, 5))
    ref = torch.autograd.functional.jacobian(lambda z: mlp(z).sum(0), x).permute(1, 2, 0)  # (M, in, out)
    assert torch.allclose(y, mlp(x), atol=1e-12)
    assert float((dy - ref).abs().max()) < 1e-12
    assert float(ref.abs().max()) > 0.1


def test_siren_initialisation_bounds():
    torch.manual_seed(0)
    first = SineLayer(10, 64, omega0=30.0, first=True).requires_grad_(False)
    later = SineLayer(64, 64, omega0=30.0, first=False).requires_grad_(False)
    assert float(first.linear.weight.abs().max()) <= 1 / 10
    assert float(later.linear.weight.abs().max()) <= math.sqrt(6 / 64) / 30
    x = torch.rand(5, 10)
    assert torch.allclose(first(x), torch.sin(30.0 * first.linear(x)))


@pytest.mark.parametrize(
    "kwargs",
    [{"width": 0}, {"depth": 0}, {"activation": "tanh"}, {"activation": "sine", "omega0": 0.0}],
)
def test_coordinate_mlp_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CoordinateMLP(in_features=3, **kwargs)


def test_displacement_field_starts_near_identity_and_keeps_shape():
    torch.manual_seed(0)
    field = DisplacementField(num_frequencies=16, width=32, depth=2).requires_grad_(False)
    x = torch.rand(2, 4, 5, 6, 3) * 2 - 1
    phi = field(x)
    assert phi.shape == x.shape
    u = phi - x
    assert torch.allclose(field.displacement(x), u, atol=1e-6)
    # near the identity: well under a voxel of a 256-voxel axis (2 / 255 normalized)
    assert float(u.abs().max()) < 2 / 255
    # point-wise: a point's output does not depend on the batch it is in
    assert torch.allclose(field(x[:1, :2]), phi[:1, :2], atol=1e-6)


def test_displacement_field_is_trainable_towards_a_shift():
    torch.manual_seed(0)
    field = DisplacementField(num_frequencies=8, width=32, depth=2, sigma=1.0)
    target = torch.tensor([0.1, -0.05, 0.02])
    opt = torch.optim.Adam(field.parameters(), lr=1e-3)
    x = torch.rand(256, 3) * 2 - 1
    first = None
    for _ in range(150):
        loss = ((field(x) - x - target) ** 2).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05 * first, (first, float(loss.detach()))
    assert all(p.grad is not None for p in field.mlp.parameters())
    assert field.encoding.matrix.grad is None  # a buffer, not a parameter
