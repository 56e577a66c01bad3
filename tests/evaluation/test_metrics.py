"""Dice, HD95, Jacobian determinants and folding counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nir_lightning.core.jacobian import jacobian_central, jacobian_determinant
from nir_lightning.evaluation.metrics import dice_per_label, folding, hd95_per_label, mean_dice


# -- Dice ---------------------------------------------------------------------------------------
def test_dice_per_label_hand_computed():
    a = np.array([[0, 1, 1, 2], [2, 2, 3, 0]])
    b = np.array([[0, 1, 2, 2], [2, 0, 0, 0]])
    d = dice_per_label(a, b, [1, 2, 3, 7])
    # label 1: |A|=2, |B|=1, overlap 1 -> 2/3; label 2: |A|=3, |B|=3, overlap 2 -> 4/6
    # label 3: |A|=1, |B|=0 -> 0; label 7: in neither -> NaN
    assert d[1] == pytest.approx(2 / 3)
    assert d[2] == pytest.approx(4 / 6)
    assert d[3] == 0.0
    assert math.isnan(d[7])
    assert list(d) == [1, 2, 3, 7]
    assert mean_dice(d) == pytest.approx((2 / 3 + 4 / 6 + 0.0) / 3)  # NaN left out


def test_dice_identical_and_disjoint_and_torch_input():
    a = torch.tensor([[[0, 5, 5], [6, 6, 0]]], dtype=torch.int32)
    assert dice_per_label(a, a, [5, 6]) == {5: 1.0, 6: 1.0}
    b = torch.tensor([[[5, 0, 0], [0, 0, 6]]], dtype=torch.int32)
    assert dice_per_label(a, b, [5, 6]) == {5: 0.0, 6: 0.0}
    assert math.isnan(mean_dice({1: float("nan")}))


def test_dice_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        dice_per_label(np.zeros(4), np.zeros(5), [1])


# -- HD95 ------------------------------------------------------------------------------------------
def cube(shift=(0, 0, 0), shape=(20, 20, 20)) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.int32)
    s0, s1, s2 = (slice(6 + d, 12 + d) for d in shift)
    lab[s0, s1, s2] = 4
    return lab


@pytest.mark.parametrize(
    ("shift", "spacing", "want"),
    [((0, 0, 0), (1.0, 1.0, 1.0), 0.0), ((2, 0, 0), (1.5, 1.0, 1.0), 3.0), ((0, 2, 0), (1.5, 1.0, 1.0), 2.0), ((0, 0, 3), (1.0, 1.0, 2.0), 6.0)],
)
def test_hd95_of_a_shifted_cube(shift, spacing, want):
    """A cube translated by k voxels along axis a is k * spacing[a] mm away (per-axis spacing)."""
    hd = hd95_per_label(cube(shift), cube(), [4], spacing=spacing)
    assert hd[4] == pytest.approx(want, abs=1e-4)


def test_hd95_missing_label_is_nan():
    hd = hd95_per_label(cube(), np.zeros((20, 20, 20), dtype=np.int32), [4, 9], spacing=(1, 1, 1))
    assert math.isnan(hd[4]) and math.isnan(hd[9])


def monai_hd95(prediction: np.ndarray, target: np.ndarray, labels, spacing) -> dict[int, float]:
    """The reference: MONAI's compute_hausdorff_distance on each label's whole-volume masks."""
    from monai.metrics import compute_hausdorff_distance

    out = {}
    for lab in labels:
        pm, tm = torch.as_tensor(prediction == lab), torch.as_tensor(target == lab)
        if not (bool(pm.any()) and bool(tm.any())):
            out[lab] = math.nan
            continue
        out[lab] = float(compute_hausdorff_distance(pm[None, None], tm[None, None], percentile=95, spacing=list(spacing)).item())
    return out


def assert_same_hd95(got: dict[int, float], want: dict[int, float]) -> None:
    assert got.keys() == want.keys()
    for lab, value in want.items():
        assert math.isnan(got[lab]) == math.isnan(value), lab
        if not math.isnan(value):
            assert got[lab] == pytest.approx(value, abs=1e-3), lab


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_equals_monai_on_random_blobs(seed):
    """Blobs of 6 labels touching each other and the volume's border (anisotropic spacing, one
    label only in one map): the per-box computation gives MONAI's numbers to 1e-3 mm."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    shape = (17, 13, 11)

    def blobs() -> np.ndarray:
        noise = gaussian_filter(rng.standard_normal((6, *shape)), sigma=(0, 2, 2, 2))
        return (np.argmax(noise, axis=0) + 1).astype(np.int32) * (rng.random(shape) > 0.05)

    a, b = blobs(), blobs()
    b[b == 6] = 0  # label 6 missing from the prediction: NaN
    labels, spacing = [1, 2, 3, 4, 5, 6, 9], (1.5, 1.0, 2.5)
    assert_same_hd95(hd95_per_label(b, a, labels, spacing=spacing), monai_hd95(b, a, labels, spacing))
    assert_same_hd95(hd95_per_label(torch.as_tensor(a), torch.as_tensor(b), labels, spacing=spacing), monai_hd95(a, b, labels, spacing))
    one, two, three = (hd95_per_label(b, a, labels, spacing=spacing, workers=w) for w in (1, 2, 3))  # labels over threads: exact
    assert list(one) == list(two) == list(three) == labels
    for other in (two, three):
        assert np.array_equal(np.array(list(one.values())), np.array(list(other.values())), equal_nan=True)
    alone = hd95_per_label(b, a, [3], spacing=spacing, workers=2)  # one label: its queries on the threads
    assert alone[3] == one[3]


@pytest.mark.parametrize("shift", [1, 3, 9])
def test_the_bounded_queries_give_the_numbers_of_unbounded_ones_bit_for_bit(monkeypatch, shift):
    """HD95's first KD-tree queries stop at 4 voxels: labels whose 95th percentile lies nearer
    (shift 1), at the bound (3) and far beyond it (9: every far voxel queried again) give the
    numbers of queries without a bound, to the last bit."""
    from scipy.ndimage import gaussian_filter

    from nir_lightning.evaluation import metrics

    rng = np.random.default_rng(shift)
    noise = gaussian_filter(rng.standard_normal((5, 30, 28, 26)), sigma=(0, 3, 3, 3))
    a = (np.argmax(noise, axis=0) + 1).astype(np.int32)
    b = np.roll(a, shift, axis=0)
    b[:, :, : 2 * shift] = np.roll(a, -shift, axis=1)[:, :, : 2 * shift]
    labels, spacing = [1, 2, 3, 4, 5], (1.2, 1.0, 0.9)
    bounded = hd95_per_label(b, a, labels, spacing=spacing, workers=1)
    monkeypatch.setattr(metrics, "_BOUND_VOXELS", float("inf"))
    exact = hd95_per_label(b, a, labels, spacing=spacing, workers=1)
    assert np.array(list(bounded.values())).tobytes() == np.array(list(exact.values())).tobytes()
    if shift == 9:
        assert max(exact.values()) > 4 * 1.2  # beyond the bound: the second queries were needed


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_hd95_equals_monai_on_the_shared_brain_pair(shared_pair):
    """The two subjects' aseg maps at 2 mm (every label of either map): MONAI's numbers to 1e-3 mm."""
    import nibabel as nib

    a = np.asarray(nib.load(shared_pair / "subjA_aseg.nii.gz").dataobj).astype(np.int32)
    b = np.asarray(nib.load(shared_pair / "subjB_aseg.nii.gz").dataobj).astype(np.int32)
    labels = [int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0]
    spacing = (2.0, 2.0, 2.0)
    assert_same_hd95(hd95_per_label(b, a, labels, spacing=spacing), monai_hd95(b, a, labels, spacing))


def test_dice_by_counts_equals_label_by_label(rng):
    """The bincount path, the label-by-label path (negative values) and a hand count agree."""
    a = rng.integers(0, 7, size=(9, 8, 7)).astype(np.int32)
    b = rng.integers(0, 7, size=(9, 8, 7)).astype(np.int32)
    labels = [1, 2, 3, 4, 5, 6, 40]
    want = {lab: 2 * int(((a == lab) & (b == lab)).sum()) / int((a == lab).sum() + (b == lab).sum()) for lab in labels[:-1]}
    got = dice_per_label(a, b, labels)
    assert math.isnan(got.pop(40)) and got == want
    shifted = dice_per_label(a - 1, b - 1, [lab - 1 for lab in labels])  # -1 present: no bincount
    assert math.isnan(shifted.pop(39)) and shifted == {lab - 1: v for lab, v in want.items()}


# -- det J and folding -------------------------------------------------------------------------------
def grid_vox(shape) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def test_jacobian_determinant_of_zero_displacement_is_one():
    det = jacobian_determinant(torch.zeros(5, 6, 7, 3))
    assert det.shape == (5, 6, 7)
    assert torch.equal(det, torch.ones(5, 6, 7))


def test_jacobian_determinant_of_a_linear_displacement():
    a = np.array([[0.1, 0.2, 0.0], [0.0, -0.3, 0.1], [0.05, 0.0, 0.2]])
    x = grid_vox((6, 7, 5))
    u = (x @ torch.as_tensor(a).T).float()  # u_i = sum_a A[i, a] x_a
    det = jacobian_determinant(u)
    want = np.linalg.det(np.eye(3) + a)
    assert float((det - want).abs().max()) < 1e-5  # central differences are exact, borders too
    # convention J[..., i, a] = d u_i / d x_a (distinguishes A from its transpose)
    jac = jacobian_central(u.double())
    assert torch.allclose(jac, torch.as_tensor(a).expand_as(jac), atol=1e-6)


def test_jacobian_determinant_of_a_mirror_is_negative():
    x = grid_vox((5, 5, 5))
    u = torch.zeros(5, 5, 5, 3)
    u[..., 1] = (-2 * x[..., 1]).float()  # phi_1 = -x_1
    det = jacobian_determinant(u)
    assert torch.allclose(det, -torch.ones_like(det))
    assert folding(det) == (125, 100.0)


def test_folding_counts():
    det = torch.tensor([[1.0, -0.5], [0.0, 2.0], [0.3, -1e-6]])
    assert folding(det) == (3, 50.0)
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    assert folding(det, mask) == (1, pytest.approx(100 / 3))
    assert folding(det, torch.zeros_like(mask)) == (0, 0.0)


def test_score_deformation_numbers_in_the_foreground_and_without_one() -> None:
    """Folding, det J and displacement figures over the fixed foreground, each from the one
    selection of det J (and the whole grid when the foreground is empty)."""
    from nir_lightning.data.pair import ImagePair
    from nir_lightning.evaluation.scoring import score_deformation

    fixed = torch.zeros(1, 1, 4, 5, 6)
    fixed[..., 1:3, 1:4, 1:5] = 1.0  # 2 * 3 * 4 = 24 foreground voxels
    pair = ImagePair(fixed=fixed, moving=fixed, moving_raw=fixed, fixed_affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    det = torch.full((4, 5, 6), 1.0)
    det[1, 1, 1], det[2, 3, 4], det[0, 0, 0] = -0.5, 0.0, -9.0  # two folds inside, one outside
    disp = torch.zeros(4, 5, 6, 3)
    disp[..., 0] = 1.5  # 1.5 voxels of 2 mm
    m = score_deformation(det, disp, pair)
    inside = det[1:3, 1:4, 1:5].reshape(-1)
    assert m["foreground_voxels"] == 24 and m["folding_count"] == 2 and m["folding_percent"] == pytest.approx(100 * 2 / 24)
    assert m["jacobian_det_min"] == -0.5 and m["jacobian_det_std"] == pytest.approx(float(inside.std()))
    assert m["sdlogj"] == pytest.approx(float(inside.double().clamp(min=1e-9).log().std()))
    assert m["displacement_mean_mm"] == pytest.approx(3.0)
    empty = ImagePair(fixed=torch.zeros_like(fixed), moving=fixed, moving_raw=fixed, fixed_affine=np.eye(4))
    e = score_deformation(det, disp, empty)
    assert (e["foreground_voxels"], e["folding_count"], e["folding_percent"], e["displacement_mean_mm"]) == (0, 0, 0.0, 0.0)
    assert e["jacobian_det_min"] == -9.0  # the whole grid
