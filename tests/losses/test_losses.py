"""Similarity losses, folding penalties and finite-difference Jacobians."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nir_lightning.coords import identity_grid, normalized_to_voxel
from nir_lightning.core.jacobian import determinant, jacobian_central, jacobian_forward
from nir_lightning.losses.folding import jacobian_penalty
from nir_lightning.losses.similarity import Similarity, global_ncc, local_ncc, mse


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def brute_force_lncc(f: np.ndarray, m: np.ndarray, w: int, min_variance: float = 1e-6, eps: float = 1e-8) -> float:
    """-mean over valid windows (fixed variance > min_variance) of the squared window NCC."""
    vals = []
    n0, n1, n2 = f.shape
    for i, j, k in itertools.product(range(n0 - w + 1), range(n1 - w + 1), range(n2 - w + 1)):
        a = f[i : i + w, j : j + w, k : k + w].ravel()
        b = m[i : i + w, j : j + w, k : k + w].ravel()
        va, vb = a.var(), b.var()
        cov = ((a - a.mean()) * (b - b.mean())).mean()
        if va > min_variance:
            vals.append(cov * cov / (va * vb + eps))
    return -float(np.mean(vals))


# -- local NCC ----------------------------------------------------------------------------------
def test_local_ncc_of_identical_images_is_minus_one():
    x = noise(1, 1, 14, 12, 10)
    assert float(local_ncc(x, x, window=5)) == pytest.approx(-1.0, abs=1e-4)


def test_local_ncc_is_squared_and_affine_invariant():
    x = noise(1, 1, 14, 12, 10)
    assert float(local_ncc(x, -x, window=5)) == pytest.approx(-1.0, abs=1e-4)
    assert float(local_ncc(x, 3.0 * x + 2.0, window=5)) == pytest.approx(-1.0, abs=1e-4)
    assert float(local_ncc(x, 1.0 - 0.5 * x, window=5)) == pytest.approx(-1.0, abs=1e-4)


def test_local_ncc_of_independent_noise_is_near_zero():
    a, b = noise(1, 1, 20, 20, 20, seed=1), noise(1, 1, 20, 20, 20, seed=2)
    val = float(local_ncc(a, b, window=5))
    # E[r^2] ~ 1 / (n - 1) = 1/124 for n = 125 samples per window
    assert -0.02 < val <= 0.0, val


def test_local_ncc_matches_a_brute_force_computation():
    f = noise(1, 1, 7, 6, 8, seed=3)
    m = 0.6 * f + 0.4 * noise(1, 1, 7, 6, 8, seed=4)
    got = float(local_ncc(f, m, window=3))
    want = brute_force_lncc(f[0, 0].numpy(), m[0, 0].numpy(), 3)
    assert got == pytest.approx(want, abs=1e-8)
    assert -0.95 < got < -0.3  # correlated, not identical


def test_local_ncc_excludes_constant_background_windows():
    f = torch.zeros(1, 1, 20, 20, 20, dtype=torch.float64)
    f[..., 4:10, 4:10, 4:10] = 0.5 + 0.5 * noise(6, 6, 6, seed=5)  # 27/1000 of the volume
    m = f.clone()
    m[..., 12:, 12:, 12:] = noise(8, 8, 8, seed=6)  # garbage where the fixed image is background
    val = float(local_ncc(f, m, window=3))
    # averaging in the background windows (cc = 0) would give about -0.03
    assert val == pytest.approx(-1.0, abs=1e-4)
    assert float(local_ncc(f, m, window=3, min_variance=-1.0)) > -0.2  # with them included


def test_local_ncc_of_a_constant_fixed_image_is_zero_and_differentiable():
    f = torch.full((1, 1, 8, 8, 8), 0.3)
    m = torch.rand(1, 1, 8, 8, 8, requires_grad=True)
    val = local_ncc(f, m, window=3)
    assert float(val.detach()) == 0.0
    val.backward()
    assert m.grad is not None and bool(torch.isfinite(m.grad).all())


def test_local_ncc_shrinks_windows_to_small_sides():
    x = noise(2, 1, 4, 3, 9, seed=7)
    assert float(local_ncc(x, x, window=9)) == pytest.approx(-1.0, abs=1e-4)
    f, m = noise(1, 1, 4, 3, 9, seed=8), noise(1, 1, 4, 3, 9, seed=9)
    got = float(local_ncc(f, m, window=9))
    # windows become 4 x 3 x 9, i.e. the whole image
    want = -float(np.corrcoef(f.ravel().numpy(), m.ravel().numpy())[0, 1] ** 2)
    assert got == pytest.approx(want, abs=1e-6)


def test_local_ncc_gradient_improves_alignment():
    f = noise(1, 1, 10, 10, 10, seed=10)
    m = (f + 0.5 * noise(1, 1, 10, 10, 10, seed=11)).requires_grad_(True)
    loss = local_ncc(f, m, window=5)
    loss.backward()
    with torch.no_grad():
        better = local_ncc(f, m - 1e-2 * m.grad / m.grad.abs().max(), window=5)
    assert float(better) < float(loss.detach())


# -- global NCC, MSE ------------------------------------------------------------------------------
def test_global_ncc_values():
    x = noise(1, 1, 500, 1, 1)
    assert float(global_ncc(x, x)) == pytest.approx(-1.0, abs=1e-6)
    assert float(global_ncc(x, 2 * x + 1)) == pytest.approx(-1.0, abs=1e-6)
    assert float(global_ncc(x, -x)) == pytest.approx(1.0, abs=1e-6)  # signed, not squared
    y = noise(1, 1, 500, 1, 1, seed=1)
    assert abs(float(global_ncc(x, y))) < 0.15
    want = -np.corrcoef(x.ravel().numpy(), (x + y).ravel().numpy())[0, 1]
    assert float(global_ncc(x, x + y)) == pytest.approx(want, abs=1e-6)


def test_global_ncc_averages_over_the_batch():
    x = noise(2, 1, 100, 1, 1)
    w = x.clone()
    w[1] = -w[1]
    assert float(global_ncc(x, w)) == pytest.approx(0.0, abs=1e-6)  # (-1 + 1) / 2


def test_mse():
    a = torch.zeros(1, 1, 2, 2, 2)
    b = torch.full((1, 1, 2, 2, 2), 3.0)
    assert float(mse(a, b)) == 9.0


def test_similarity_dispatch():
    f = noise(1, 1, 10, 10, 10)
    m = noise(1, 1, 10, 10, 10, seed=1)
    assert float(Similarity("lncc", window=5)(f, m)) == float(local_ncc(f, m, window=5))
    assert float(Similarity("lncc", window=5)(f, m, is_grid=False)) == float(global_ncc(f, m))
    assert float(Similarity("ncc")(f, m)) == float(global_ncc(f, m))
    assert float(Similarity("mse")(f, m)) == float(mse(f, m))
    with pytest.raises(ValueError):
        Similarity("cosine")
    with pytest.raises(ValueError):
        Similarity("lncc", window=1)


# -- Jacobians ---------------------------------------------------------------------------------------
def lattice(n: int = 9) -> torch.Tensor:
    """Voxel positions of an n^3 lattice, (1, n, n, n, 3), float64."""
    return normalized_to_voxel(identity_grid((n, n, n), dtype=torch.float64), (n, n, n))[None]


def folded(n: int = 9) -> torch.Tensor:
    """Identity except that rows x0 = 3, 4, 5 are mirrored (3 <-> 5): a local flip of axis 0."""
    phi = lattice(n).clone()
    phi[:, 3:6, ..., 0] = 8.0 - phi[:, 3:6, ..., 0]
    return phi


def test_jacobian_forward_of_a_linear_map(rng):
    a = torch.as_tensor(rng.normal(size=(3, 3)))
    b = torch.as_tensor(rng.normal(size=3))
    phi = lattice(6) @ a.T + b
    jac = jacobian_forward(phi, (1.0, 1.0, 1.0))
    assert jac.shape == (1, 5, 5, 5, 3, 3)
    assert torch.allclose(jac, a.expand_as(jac), atol=1e-10)  # J[..., i, a] = d phi_i / d x_a
    # on a stride-2 lattice the step is 2 voxels
    sub = phi[:, ::2, ::2, ::2]
    assert torch.allclose(jacobian_forward(sub, (2.0, 2.0, 2.0)), a.expand(1, 2, 2, 2, 3, 3), atol=1e-10)
    jc = jacobian_central(phi[0])
    assert torch.allclose(jc, a.expand_as(jc), atol=1e-10)


def test_determinant_matches_linalg(rng):
    m = torch.as_tensor(rng.normal(size=(50, 3, 3)))
    assert torch.allclose(determinant(m), torch.linalg.det(m), atol=1e-10)


def test_jedt_and_unit_penalties_on_identity_are_zero():
    det = determinant(jacobian_forward(lattice(), (1.0, 1.0, 1.0)))
    assert torch.allclose(det, torch.ones_like(det))
    assert float(jacobian_penalty(det, kind="jedt")) == 0.0
    assert float(jacobian_penalty(det, kind="unit")) == 0.0


def test_penalties_on_a_folded_field():
    det = determinant(jacobian_forward(folded(), (1.0, 1.0, 1.0)))
    assert det.shape == (1, 8, 8, 8)
    # forward differences along axis 0: rows 3 and 4 step by -1 (det -1), rows 2 and 5 by +3
    assert torch.equal(det[0, :, 0, 0], torch.tensor([1.0, 1.0, 3.0, -1.0, -1.0, 3.0, 1.0, 1.0], dtype=det.dtype))
    assert int((det <= 0).sum()) == 2 * 8 * 8
    assert float(jacobian_penalty(det, kind="jedt")) == pytest.approx(128 / 512)
    assert float(jacobian_penalty(det, kind="unit")) == pytest.approx((128 * 2 + 128 * 2) / 512)


def test_jedt_is_zero_for_volume_change_without_folding():
    det = determinant(jacobian_forward(lattice() * 1.5, (1.0, 1.0, 1.0)))
    assert float(jacobian_penalty(det, kind="jedt")) == 0.0
    assert float(jacobian_penalty(det, kind="unit")) == pytest.approx(1.5**3 - 1)


def test_jacobian_penalty_unknown_kind():
    with pytest.raises(ValueError, match="jedt"):
        jacobian_penalty(torch.ones(3), kind="l2")  # type: ignore[arg-type]
