"""The fold guard: its dense check reads the folding metric's own det J, its penalty holds the
barrier at the voxels found, and a fit whose det J never runs low is not touched."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from nir_lightning.coords import normalized_to_voxel_displacement
from nir_lightning.core.jacobian import jacobian_determinant
from nir_lightning.core.resample import dense_field
from nir_lightning.errors import InputError
from nir_lightning.fields import GridDisplacementField
from nir_lightning.losses.fold_guard import DEFAULT_FOLD_GUARD, FoldGuard, low_det_voxels, metric_det_in_box
from nir_lightning.training.module import RegistrationModule


def _rough_field(shape: tuple[int, int, int], scale: float, seed: int = 0) -> GridDisplacementField:
    """A grid field whose finest levels are random enough to fold in places."""
    torch.manual_seed(seed)
    field = GridDisplacementField(levels=3, coarsest=4)
    with torch.no_grad():
        for p in field.parameters():
            p.normal_(0.0, scale)
    return field


def _metric_det(field: GridDisplacementField, shape: tuple[int, int, int]) -> torch.Tensor:
    """What ``metrics.json`` counts folds on: central differences of the dense displacement."""
    with torch.no_grad():
        return jacobian_determinant(normalized_to_voxel_displacement(dense_field(field, shape), shape))


@pytest.mark.parametrize("box", [(slice(3, 11), slice(2, 9), slice(4, 10)), (slice(0, 14), slice(0, 5), slice(6, 12))])
@pytest.mark.parametrize("use_lattice", [True, False])
def test_the_check_reads_the_folding_metric_det_j_in_its_box(box, use_lattice: bool) -> None:
    """Interior faces get central differences (the box is read one voxel wider); a face on the image's
    border is one-sided, as the metric is there."""
    shape = (14, 12, 13)
    field = _rough_field(shape, 0.3)
    ref = _metric_det(field, shape)[box]
    det = metric_det_in_box(field, shape, box, lattice=field.on_lattice if use_lattice else None, max_points=50)
    assert det.shape == ref.shape
    assert float(ref.min()) < 0.15  # the comparison covers low and folded voxels
    torch.testing.assert_close(det, ref, atol=1e-4, rtol=1e-4)


def test_low_voxels_are_joined_with_earlier_ones_and_capped_at_the_lowest() -> None:
    det = torch.ones(4, 4, 4, dtype=torch.float64)
    det[0, 0, 1], det[1, 2, 3], det[3, 3, 3] = 0.1, -0.4, 0.0
    mask = torch.ones(4, 4, 4, dtype=torch.bool)
    mask[0, 0, 1] = False  # outside the foreground: never guarded
    found = low_det_voxels(det, mask, 0.15, previous=torch.tensor([[2, 2, 2]]))
    assert found.tolist() == [[1, 2, 3], [2, 2, 2], [3, 3, 3]]
    assert low_det_voxels(det, mask, 0.15, previous=torch.tensor([[2, 2, 2]]), max_voxels=2).tolist() == [[1, 2, 3], [3, 3, 3]]


def test_penalty_is_zero_on_a_translation_and_known_on_a_uniform_squeeze() -> None:
    shape = (9, 10, 11)
    voxels = torch.tensor([[2, 3, 4], [5, 5, 5], [7, 2, 9]])
    shift = FoldGuard.penalty(lambda x: x + 0.1, voxels, shape, margin=0.35, per=16)
    assert float(shift) == 0.0
    # phi(x) = diag(0.5, 0.5, 0.8) x: det J = 0.2 at every voxel, below the floor by 0.15
    scale = torch.tensor([0.5, 0.5, 0.8])
    squeeze = FoldGuard.penalty(lambda x: x * scale, voxels, shape, margin=0.35, per=16)
    assert float(squeeze) == pytest.approx(3 * 0.15 / 16, rel=1e-5)


def test_steps_on_the_penalty_unfold_the_guarded_voxels() -> None:
    """The check finds the metric's folds; Adam on the penalty alone lifts every guarded voxel's
    det J above 0 (the metric's, read again densely)."""
    shape = (14, 12, 13)
    field = _rough_field(shape, 0.35, seed=1)
    mask = torch.ones(shape, dtype=torch.bool)
    guard = FoldGuard(at=(1.0,), threshold=0.15)
    voxels, lowest = guard.check(field, mask, None, lattice=field.on_lattice)
    det0 = _metric_det(field, shape)
    assert lowest == pytest.approx(float(det0.min()), abs=1e-4) and lowest < 0
    assert len(voxels) == int((det0 < 0.15).sum())
    folded = det0[voxels[:, 0], voxels[:, 1], voxels[:, 2]] <= 0
    assert int(folded.sum()) > 0
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        FoldGuard.penalty(field, voxels, shape, margin=0.35, per=len(voxels)).backward()
        opt.step()
    after = _metric_det(field, shape)[voxels[:, 0], voxels[:, 1], voxels[:, 2]]
    assert float(after.min()) > 0


def test_check_steps_of_a_fit() -> None:
    assert FoldGuard().check_steps(250) == frozenset({225, 240})
    assert FoldGuard(at=(1.0,)).check_steps(12) == frozenset({11})  # the last step, not past it
    assert FoldGuard().check_steps(0) == frozenset()


@pytest.mark.parametrize("value", [[1.5], [], [0.0], [0.5, -0.1], "0.9", 0.9, [True]])
def test_a_bad_fold_guard_is_refused_with_the_option_named(value) -> None:
    with pytest.raises(InputError, match=r"model\.fold_guard must "):
        RegistrationModule(field=GridDisplacementField(levels=2), fold_guard=value)


def test_the_guarded_voxels_go_into_checkpoints() -> None:
    """A resumed fit holds the barrier at the voxels the killed one had found."""
    module = RegistrationModule(field=GridDisplacementField(levels=2))
    module._guard_voxels = torch.tensor([[1, 2, 3], [4, 5, 6]])
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    resumed = RegistrationModule(field=GridDisplacementField(levels=2))
    resumed.on_load_checkpoint(checkpoint)
    assert resumed._guard_voxels is not None and resumed._guard_voxels.tolist() == [[1, 2, 3], [4, 5, 6]]
    empty: dict = {}
    RegistrationModule(field=GridDisplacementField(levels=2)).on_save_checkpoint(empty)
    assert "nir_fold_guard" not in empty


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        ([], DEFAULT_FOLD_GUARD),
        (["model/displacement.yaml"], DEFAULT_FOLD_GUARD),
        (["model/diffeomorphic.yaml"], None),
        (["model/displacement.yaml", "model/diffeomorphic.yaml"], None),
        (["model/siren.yaml"], None),
        (["model/hybrid.yaml"], None),
    ],
)
def test_the_guard_is_on_in_the_default_and_off_in_the_configs_measured_without_it(configs, expected, configs_dir, tmp_path, monkeypatch) -> None:
    from nir_lightning.training.lightning_cli import NIRCLI

    args = [a for c in configs for a in ("-c", str(configs_dir / c))]
    args += ["-c", str(configs_dir / "logger" / "none.yaml"), "--data.demo=true", f"--trainer.default_root_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    guard = NIRCLI(args, run=False).model.fold_guard
    assert (guard.at if guard is not None else None) == expected


FIT = [
    "--trainer.max_steps=20", "--model.field.init_args.levels=3", "--model.jacobian_points=256", "--threads=1",
    "--affine", "none",
]


def _register(files: dict, out, *extra: str) -> bytes:
    from nir_lightning.cli import main

    argv = ["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--output", str(out), *FIT, *extra]
    assert main(argv) == 0
    return (out / "displacement.nii.gz").read_bytes()


def test_a_fit_whose_det_j_never_runs_low_is_unchanged_and_one_that_does_is_held(tiny_pair, tmp_path, monkeypatch) -> None:
    """The checks run at steps 18 and 19 of 20; where they find no voxel the fit is the one without
    the guard, byte for byte. With every voxel below the threshold (forced), the penalty joins
    each later step, and the fit changes."""
    checks: list[int] = []
    penalties: list[int] = []
    forced_threshold: list[float] = []
    check, penalty = FoldGuard.check, FoldGuard.penalty

    def spy_check(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if forced_threshold:
            self = dataclasses.replace(self, threshold=forced_threshold[0])
        voxels, lowest = check(self, *args, **kwargs)
        checks.append(len(voxels))
        return voxels, lowest

    def spy_penalty(*args, **kwargs):  # type: ignore[no-untyped-def]
        penalties.append(1)
        if forced_threshold:
            kwargs["margin"] = forced_threshold[0]  # the barrier acts on them too
        return penalty(*args, **kwargs)

    monkeypatch.setattr(FoldGuard, "check", spy_check)
    monkeypatch.setattr(FoldGuard, "penalty", staticmethod(spy_penalty))
    off = _register(tiny_pair, tmp_path / "off", "--model.fold_guard=null")
    assert checks == [] and penalties == []
    on = _register(tiny_pair, tmp_path / "on")
    assert checks == [0, 0] and penalties == []  # smooth: nothing below 0.15
    assert on == off
    forced_threshold.append(2.0)  # every foreground voxel is "low", and held above 2
    checks.clear()
    forced = _register(tiny_pair, tmp_path / "forced")
    assert len(checks) == 2 and checks[0] > 0 and len(penalties) == 2  # steps 18 and 19
    assert forced != off


def test_the_penalty_stencil_is_the_metrics_central_one_inside_and_one_sided_on_the_border() -> None:
    """Inside, bit for bit the barrier's central stencil; on a border face the metric's one-sided
    difference (the guarded voxel's det J is then the number ``metrics.json`` counts)."""
    from nir_lightning.coords import voxel_to_normalized
    from nir_lightning.losses.folding import central_stencil_det

    def metric_stencil_det(field, voxels, shape):  # type: ignore[no-untyped-def]
        pts = voxel_to_normalized(voxels.float(), shape).reshape(1, -1, 1, 1, 3)
        return central_stencil_det(field, pts, shape, voxels=voxels)

    shape = (14, 12, 13)
    field = _rough_field(shape, 0.3)
    inside = torch.tensor([[3, 4, 5], [7, 1, 11], [12, 10, 1]])
    pts = voxel_to_normalized(inside.float(), shape).reshape(1, -1, 1, 1, 3)
    with torch.no_grad():
        assert torch.equal(metric_stencil_det(field, inside, shape), central_stencil_det(field, pts, shape))
        border = torch.tensor([[0, 4, 5], [13, 11, 0], [6, 0, 12]])
        metric = _metric_det(field, shape)[border[:, 0], border[:, 1], border[:, 2]]
        torch.testing.assert_close(metric_stencil_det(field, border, shape).flatten().to(metric.dtype), metric, atol=1e-4, rtol=1e-4)
