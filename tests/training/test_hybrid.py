"""Hybrid two-phase schedule: switch, freezing, checkpoint/resume across the switch, predict."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from nir_lightning.data.phantom import write_demo_pair
from nir_lightning.errors import InputError
from nir_lightning.fields.base import ComposedField
from nir_lightning.fields.displacement import DisplacementField
from nir_lightning.fields.velocity import VelocityField
from nir_lightning.sampling import DownsizeSampler, MinipatchSampler
from nir_lightning.training.callbacks import NiftiWriter
from nir_lightning.training.datamodule import PairDataModule
from nir_lightning.training.hybrid_callback import HybridPhases, apply_phase
from nir_lightning.training.module import RegistrationModule
from nir_lightning.training.schedule import HybridSchedule, two_phase_lr_lambdas

REPO = Path(__file__).resolve().parents[2]
PHANTOM_SHAPE = (38, 40, 38)  # smallest the demo generator supports
NET = {"num_frequencies": 8, "sigma": 1.0, "width": 32, "depth": 2, "omega0": 10.0}
TOTAL, SWITCH = 8, 4


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_pair(tmp_path_factory.mktemp("pair"), shape=PHANTOM_SHAPE, magnitude=3.0)


def _datamodule(files: dict[str, Path]) -> PairDataModule:
    return PairDataModule(
        fixed=str(files["fixed"]),
        moving=str(files["moving"]),
        fixed_labels=str(files["fixed_labels"]),
        moving_labels=str(files["moving_labels"]),
        steps_per_epoch=3,  # epochs end mid-phase, so resuming also crosses epoch boundaries
    )


def _module(velocity: bool = False) -> RegistrationModule:
    """The hybrid module; its schedule (``model.schedule``) switches at ``SWITCH``."""
    torch.manual_seed(0)
    if velocity:
        f1 = VelocityField(**NET, method="euler", step_size=0.1)
        f2 = VelocityField(**NET, method="euler", step_size=0.1, encoding_seed=1)
    else:
        f1, f2 = DisplacementField(**NET), DisplacementField(**NET, encoding_seed=1)
    return RegistrationModule(
        field=f1, field2=f2, schedule=_schedule(), sampler=DownsizeSampler(stride=3), window=3, lr=1e-3, jacobian_points=32, seed=0
    )


def _schedule() -> HybridSchedule:
    return HybridSchedule(switch_step=SWITCH, phase2_sampler=MinipatchSampler(num_patches=2, patch_size=8), phase2_window=5)


def _trainer(root: Path, callbacks: list[Callback], *, max_steps: int = TOTAL) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=str(root),
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _params(module: RegistrationModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


# -- pieces -----------------------------------------------------------------------------------
def test_composed_field_and_its_inverse() -> None:
    torch.manual_seed(0)
    a = VelocityField(**NET, method="rk4", step_size=0.05)
    b = VelocityField(**NET, method="rk4", step_size=0.05, encoding_seed=1)
    for f in (a, b):
        with torch.no_grad():
            f.velocity_net.mlp.output.weight.mul_(100)
    comp = ComposedField(a, b)
    x = torch.rand(200, 3) * 2 - 1
    with torch.no_grad():
        assert torch.equal(comp(x), b(a(x)))
        assert comp.invertible
        assert float((comp.inverse(comp(x)) - x).abs().max()) < 1e-4
    assert not ComposedField(a, DisplacementField(**NET)).invertible
    with pytest.raises(TypeError):
        ComposedField(a, DisplacementField(**NET)).inverse(x)


def test_two_phase_learning_rates() -> None:
    f1, f2 = two_phase_lr_lambdas(100, 40, 0.1)
    assert f1(0) == 1.0 and f1(40) == pytest.approx(0.1)
    assert f2(39) == 0.0 and f2(40) == 1.0 and f2(100) == pytest.approx(0.1)


def test_switch_step_from_fraction() -> None:
    assert HybridSchedule(switch_fraction=0.3).resolve_switch_step(10) == 3
    assert HybridSchedule(switch_step=7, switch_fraction=0.3).resolve_switch_step(10) == 7


def test_field2_without_schedule_and_schedule_without_field2_are_errors() -> None:
    with pytest.raises(InputError, match=r"model\.field2 and model\.schedule go together"):
        RegistrationModule(field=DisplacementField(**NET), field2=DisplacementField(**NET))
    with pytest.raises(InputError, match=r"model\.field2 and model\.schedule go together"):
        RegistrationModule(field=DisplacementField(**NET), schedule=_schedule())
    with pytest.raises(InputError, match="phase2_window"):
        HybridSchedule(phase2_sampler=MinipatchSampler(patch_size=8), phase2_window=9)


# -- the schedule -----------------------------------------------------------------------------
class _Recorder(Callback):
    """Phase, sampler and both fields' parameters before and after every step."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = (
            [p.detach().clone() for p in pl_module.field.parameters()],
            [p.detach().clone() for p in pl_module.field2.parameters()],
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        f1 = [p.detach().clone() for p in pl_module.field.parameters()]
        f2 = [p.detach().clone() for p in pl_module.field2.parameters()]
        self.rows.append(
            {
                "step": trainer.global_step - 1,
                "phase": int(pl_module.phase),
                "sampler": type(pl_module.sampler).__name__,
                "window": pl_module.similarity.window,
                "nf1_same": all(torch.equal(a, b) for a, b in zip(self._before[0], f1, strict=True)),
                "nf2_same": all(torch.equal(a, b) for a, b in zip(self._before[1], f2, strict=True)),
            }
        )


@pytest.mark.parametrize("velocity", [False, True], ids=["hybrid", "hybrid_diffeomorphic"])
def test_switch_at_the_configured_step_and_phase2_freezes_nf1(demo_files, tmp_path, velocity: bool) -> None:
    rec = _Recorder()
    module = _module(velocity)
    _trainer(tmp_path, [rec]).fit(module, datamodule=_datamodule(demo_files))
    assert [r["step"] for r in rec.rows] == list(range(TOTAL))
    assert [r["phase"] for r in rec.rows] == [1] * SWITCH + [2] * (TOTAL - SWITCH)
    for r in rec.rows:
        if r["phase"] == 1:
            assert r["sampler"] == "DownsizeSampler" and r["window"] == 3
            assert not r["nf1_same"] and r["nf2_same"], r  # NF1 learns, NF2 untouched (bitwise)
        else:
            assert r["sampler"] == "MinipatchSampler" and r["window"] == 5
            assert r["nf1_same"] and not r["nf2_same"], r  # NF1 frozen (bitwise), NF2 learns
    assert int(module.phase) == 2
    assert module.in_phase2 and isinstance(module.transform_field(), ComposedField)


def test_the_module_adds_the_schedule_callback_and_the_fit_ends_trainable(demo_files, tmp_path) -> None:
    """No config lists HybridPhases: the module returns it from configure_callbacks (once), and
    after the fit every parameter trains again with the phase-1 sampler and window."""
    module = _module()
    trainer = _trainer(tmp_path, [])
    trainer.fit(module, datamodule=_datamodule(demo_files))
    phases = [c for c in trainer.callbacks if isinstance(c, HybridPhases)]
    assert len(phases) == 1 and phases[0].schedule is module.schedule
    assert int(module.phase) == 2  # the buffer keeps the phase the fit ended in
    assert isinstance(module.sampler, DownsizeSampler) and module.similarity.window == 3
    assert all(p.requires_grad for p in module.parameters())
    assert module.configure_callbacks() == []  # the trainer holds it: predict does not add a second
    assert RegistrationModule(field=DisplacementField(**NET)).configure_callbacks() == []
    with pytest.raises(ValueError, match="phase must be 1 or 2, got 3"):
        apply_phase(module, 3, _schedule())
    with pytest.raises(TypeError, match="RegistrationModule's schedule, got LightningModule"):
        phases[0].on_fit_start(trainer, pl.LightningModule())


def test_resume_at_any_step_matches_an_uninterrupted_fit_and_predicts_the_same(demo_files, tmp_path) -> None:
    """Checkpoints of one uninterrupted fit at a step in phase 1 (2), at the switch (4) and in
    phase 2 (6); resuming each with ckpt_path ends with the same parameters, and predict from
    the resumed fit's last checkpoint writes the same files."""
    ref_dir = tmp_path / "ref"
    ckpt = ModelCheckpoint(dirpath=ref_dir / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    ref = _module()
    _trainer(ref_dir, [ckpt]).fit(ref, datamodule=_datamodule(demo_files))
    final = _params(ref)
    saved = sorted(p.name for p in (ref_dir / "ckpt").glob("*.ckpt"))
    assert saved == [f"step={s}.ckpt" for s in (2, 4, 6, 8)]

    for step in (2, 4, 6):
        state = torch.load(ref_dir / "ckpt" / f"step={step}.ckpt", weights_only=False)
        assert state["global_step"] == step
        assert int(state["state_dict"]["phase"]) == (1 if step <= SWITCH else 2)
        resumed = _module()
        resumed_dir = tmp_path / f"resume{step}"
        rec = _Recorder()
        trainer = _trainer(resumed_dir, [rec])
        trainer.fit(resumed, datamodule=_datamodule(demo_files), ckpt_path=ref_dir / "ckpt" / f"step={step}.ckpt")
        trainer.save_checkpoint(resumed_dir / "last.ckpt")
        assert [r["step"] for r in rec.rows] == list(range(step, TOTAL))
        assert [r["phase"] for r in rec.rows] == [1 if s < SWITCH else 2 for s in range(step, TOTAL)]
        got = _params(resumed)
        assert got.keys() == final.keys()
        for k in final:
            assert torch.allclose(got[k], final[k], rtol=1e-5, atol=1e-7), f"resumed at step {step}: {k} differs"

    # predict from the uninterrupted and from the resumed (at step 6) final checkpoints
    outputs = {}
    for name, path in (("ref", ref_dir / "ckpt" / f"step={TOTAL}.ckpt"), ("resumed", tmp_path / "resume6" / "last.ckpt")):
        out = tmp_path / f"pred_{name}"
        trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[NiftiWriter(output_dir=str(out))], enable_progress_bar=False, enable_model_summary=False)
        module = _module()
        trainer.predict(module, datamodule=_datamodule(demo_files), ckpt_path=path, return_predictions=False)
        assert int(module.phase) == 2
        outputs[name] = out
    for f in ("warped.nii.gz", "warped_labels.nii.gz", "displacement.nii.gz", "jacobian_det.nii.gz"):
        a = np.asarray(nib.load(str(outputs["ref"] / f)).dataobj)
        b = np.asarray(nib.load(str(outputs["resumed"] / f)).dataobj)
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5), f
    ma = json.loads((outputs["ref"] / "metrics.json").read_text())
    mb = json.loads((outputs["resumed"] / "metrics.json").read_text())
    assert ma["dice_after"] == pytest.approx(mb["dice_after"]) and ma["folding_count"] == mb["folding_count"]


def test_hybrid_diffeomorphic_predict_writes_the_inverse(demo_files, tmp_path) -> None:
    module = _module(velocity=True)
    trainer = _trainer(tmp_path, [NiftiWriter(output_dir=str(tmp_path / "pred"))], max_steps=SWITCH + 2)
    dm = _datamodule(demo_files)
    trainer.fit(module, datamodule=dm)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert (tmp_path / "pred" / "inverse_displacement.nii.gz").exists()
    qc = tmp_path / "pred" / "qc.png"  # the QC figure of nir register, written before metrics.json
    assert qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert qc.stat().st_mtime_ns <= (tmp_path / "pred" / "metrics.json").stat().st_mtime_ns
    assert metrics["folding_count"] == 0
    assert metrics["inverse_consistency_mm"] < 0.05  # phi2 o phi1 inverted as phi1^-1 o phi2^-1


# -- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_cfg", "field", "field2", "stencil", "lam"),
    [
        ("displacement", "GridDisplacementField", None, "analytic", 5.0),
        ("diffeomorphic", "GridVelocityField", None, "analytic", 17.0),
        ("siren", "DisplacementField", None, "forward", 10.0),
        ("siren_diffeomorphic", "VelocityField", None, "central", 20.0),
        ("hybrid", "DisplacementField", "DisplacementField", "forward", 10.0),
        ("hybrid_diffeomorphic", "VelocityField", "VelocityField", "central", 20.0),
    ],
)
def test_model_configs_build_and_compose(
    model_cfg: str, field: str, field2: str | None, stencil: str, lam: float, tmp_path, monkeypatch
) -> None:
    from nir_lightning.training.lightning_cli import NIRCLI

    args = [
        "-c", str(REPO / "configs" / "model" / f"{model_cfg}.yaml"),
        "-c", str(REPO / "configs" / "logger" / "none.yaml"),
        "--data.demo=true", f"--trainer.default_root_dir={tmp_path}",
    ]
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI warns when args and sys.argv both hold options
    cli = NIRCLI(args, run=False)
    assert type(cli.model.field).__name__ == field
    assert (type(cli.model.field2).__name__ if cli.model.field2 is not None else None) == field2
    assert isinstance(cli.model.schedule, HybridSchedule) == (field2 is not None)  # part of the model, not a callback
    assert not any(type(c).__name__ == "HybridSchedule" for c in cli.trainer.callbacks)
    # velocity configs penalise det J harder; SIREN configs keep their finite-difference stencils
    assert (cli.model.jacobian_stencil, cli.model.lam) == (stencil, lam)
    assert cli.model.lr == {"GridDisplacementField": 1e-2, "GridVelocityField": 5e-3}.get(field, 3e-4)


@pytest.mark.parametrize(
    ("model_cfg", "stencil", "field", "lam"),
    [("diffeomorphic", "analytic", "GridVelocityField", 17.0), ("hybrid_diffeomorphic", "central", "VelocityField", 20.0)],
)
def test_velocity_penalty_survives_layering_after_the_displacement_config(
    model_cfg: str, stencil: str, field: str, lam: float, tmp_path, monkeypatch
) -> None:
    """README and benchmarks layer a mode file after configs/model/displacement.yaml."""
    from nir_lightning.training.lightning_cli import NIRCLI

    args = [
        "-c", str(REPO / "configs" / "model" / "displacement.yaml"),
        "-c", str(REPO / "configs" / "model" / f"{model_cfg}.yaml"),
        "-c", str(REPO / "configs" / "logger" / "none.yaml"),
        "--data.demo=true", f"--trainer.default_root_dir={tmp_path}",
    ]
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    cli = NIRCLI(args, run=False)
    assert (cli.model.jacobian_stencil, cli.model.lam, type(cli.model.field).__name__) == (stencil, lam, field)


def test_check_fit_warns_when_phase_2_never_starts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nir_lightning"):
        HybridSchedule(switch_step=SWITCH).check_fit(SWITCH, window=5)  # the switch is the last step + 1
    assert any("phase 2 never starts" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nir_lightning"):
        HybridSchedule(switch_step=SWITCH).check_fit(TOTAL, window=5)
    assert not caplog.records


def test_check_fit_takes_the_phase_1_window_when_phase_2_has_none() -> None:
    schedule = HybridSchedule(switch_step=SWITCH, phase2_sampler=MinipatchSampler(patch_size=6))
    schedule.check_fit(TOTAL, window=5)  # 5 fits a 6-voxel patch
    with pytest.raises(InputError, match=r"model.window=7 is larger than the phase-2 mini-patch \(6\)"):
        schedule.check_fit(TOTAL, window=7)
