"""Checkpoints written before the package was split into layers (version 0.1, flat layout) still load.

``tests/data/legacy/*.ckpt`` were written by ``nir fit`` of the flat layout (commit f8fcb5d) on the
demo phantom with a 16-wide field (the hybrid one with the ``HybridSchedule`` callback of that
layout, stopped in phase 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nir_lightning.cli import main

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy"
SMALL = ["-c", "configs/model/siren.yaml", "--model.field.init_args.width=16", "--model.field.init_args.num_frequencies=4"]
SMALL2 = ["--model.field2.init_args.width=16", "--model.field2.init_args.num_frequencies=4"]


def _predict(tiny_pair: dict[str, Path], out: Path, ckpt: Path, *extra: str) -> int:
    return main([
        "predict", "-c", "configs/trainer/predict.yaml", f"--data.fixed={tiny_pair['fixed']}", f"--data.moving={tiny_pair['moving']}",
        f"--trainer.callbacks.init_args.output_dir={out}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out.parent}", f"--ckpt_path={ckpt}", *extra,
    ])


@pytest.mark.parametrize(
    ("name", "configs"),
    [("displacement_v0.1.ckpt", SMALL), ("hybrid_v0.1.ckpt", ["-c", "configs/model/hybrid.yaml", *SMALL, *SMALL2])],
)
def test_checkpoints_of_the_flat_layout_load_and_predict(tiny_pair, tmp_path, repo_root, monkeypatch, name, configs):
    monkeypatch.chdir(repo_root)
    ckpt = LEGACY / name
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    out = tmp_path / "pred"
    assert _predict(tiny_pair, out, ckpt, *configs) == 0
    assert (out / "metrics.json").is_file() and (out / "displacement.nii.gz").is_file()
    # the weights are the checkpoint's, key for key (the module kept its attribute names)
    from nir_lightning.training.module import RegistrationModule

    keys = set(RegistrationModule(**_module_kwargs(configs)).state_dict())
    assert keys == set(state), sorted(keys ^ set(state))


def _module_kwargs(configs: list[str]) -> dict:
    from nir_lightning.fields import DisplacementField
    from nir_lightning.training.schedule import HybridSchedule

    kwargs: dict = {"field": DisplacementField(width=16, num_frequencies=4)}
    if "configs/model/hybrid.yaml" in configs:
        kwargs.update(field2=DisplacementField(width=16, num_frequencies=4), schedule=HybridSchedule())
    return kwargs
