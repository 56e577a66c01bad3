"""Lightning callbacks: writing prediction outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from nir_lightning.evaluate import Registration, write_outputs


class NiftiWriter(BasePredictionWriter):
    """Writes ``predict`` results (warped image/labels, ITK displacement, det J, metrics.json).

    Args:
        output_dir: folder for the outputs (created if missing).
        qc: also write ``qc.png``, the QC figure ``nir register`` writes.
    """

    def __init__(self, *, output_dir: str = "predictions", qc: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.qc = qc

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(prediction, Registration):
            raise TypeError(f"NiftiWriter expects a Registration from predict_step, got {type(prediction).__name__}")
        pair = getattr(pl_module, "pair", None)
        steps = int(trainer.global_step)
        write_outputs(prediction, pair, self.output_dir, extra={"steps": steps}, qc_title=f"{steps} steps" if self.qc else None)
