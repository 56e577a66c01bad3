"""What metrics.json says about the run: the device the fit ran on, also after Lightning's teardown."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from nir_lightning.alignment import AffineResult
from nir_lightning.app.run_record import run_record


def test_device_is_the_strategys_not_the_module_moved_back_to_the_cpu() -> None:
    # after trainer.predict, Lightning's teardown has moved the module to the CPU: a GPU run
    # recorded "cpu" while it read the module's device
    trainer = SimpleNamespace(
        global_step=250, strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
        lightning_module=SimpleNamespace(device=torch.device("cpu")),
    )
    res = AffineResult(world=np.eye(4), kind="affine", seconds=1.5, similarity_before=-0.2, similarity_after=-0.5, waited=0.25)
    dm = SimpleNamespace(fixed="f.nii.gz", moving="m.nii.gz", affine_result=res)
    cli = SimpleNamespace(config=SimpleNamespace(as_dict=lambda: {"model": {"lam": 5.0}}))
    extra = run_record(trainer=trainer, dm=dm, cli=cli, seed=0, seconds_fit=9.0, resumed_step=None)
    assert extra["device"] == "cuda:0"
    assert extra["steps"] == 250 and extra["seconds_affine"] == 1.5 and extra["seconds_affine_wait"] == 0.25
    assert extra["affine"]["world"] == np.eye(4).tolist() and extra["config"] == {"model": {"lam": 5.0}}
