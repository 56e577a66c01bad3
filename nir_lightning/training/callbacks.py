"""Lightning callbacks: writing prediction outputs, a progress bar that suits logs.

The tracking callbacks (QC images, W&B) are in :mod:`nir_lightning.training.tracking`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, Callback, TQDMProgressBar

from nir_lightning.errors import InputError
from nir_lightning.evaluation.evaluate import RegistrationResult
from nir_lightning.evaluation.output_files import refuse_inputs_among_outputs
from nir_lightning.evaluation.outputs import write_outputs


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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the fit or prediction: refuse an ``output_dir`` where writing would replace an input."""
        super().setup(trainer, pl_module, stage)
        dm = getattr(trainer, "datamodule", None)
        roles = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
        refuse_inputs_among_outputs(self.output_dir, {f"data.{r}": getattr(dm, r, None) for r in roles}, writer="NiftiWriter's output_dir")

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
        if not isinstance(prediction, RegistrationResult):
            raise TypeError(f"NiftiWriter expects a RegistrationResult from predict_step, got {type(prediction).__name__}")
        pair = getattr(pl_module, "pair", None)
        if pair is None:
            raise TypeError("NiftiWriter needs a module with its pair attached (a RegistrationModule after setup)")
        steps = int(trainer.global_step)
        write_outputs(prediction, pair, self.output_dir, extra={"steps": steps}, qc_title=f"{steps} steps" if self.qc else None)


class ThrottledProgressBar(TQDMProgressBar):
    """TQDM bar (step, ``train/loss``, it/s): every step on a terminal, ~``updates`` times per fit otherwise.

    Args:
        refresh_rate: refresh every this many steps; ``None`` chooses by whether stdout is a
            terminal (1) or not (``max_steps // updates``).
        updates: refreshes per fit when stdout is not a terminal (CI logs, notebooks).
    """

    def __init__(self, *, refresh_rate: int | None = None, updates: int = 20) -> None:
        super().__init__(refresh_rate=refresh_rate if refresh_rate is not None else 1)
        if updates < 1:
            raise InputError(f"ThrottledProgressBar.updates must be >= 1, got {updates}")
        self._auto = refresh_rate is None
        self.updates = updates

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._auto and not _isatty(sys.stdout):
            total = trainer.max_steps if trainer.max_steps > 0 else 1000
            self._refresh_rate = max(1, total // self.updates)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress_bar_callbacks(trainer_config: Mapping[str, Any], callbacks: list[Callback]) -> list[Callback]:
    """The :class:`ThrottledProgressBar` to add to a trainer config, if it gets a bar but has none.

    ``trainer_config`` is LightningCLI's instantiated trainer kwargs; ``callbacks`` the extra
    callbacks it adds.
    """
    if trainer_config.get("enable_progress_bar") is False:
        return []
    given = trainer_config.get("callbacks") or []
    given = given if isinstance(given, list) else [given]
    from pytorch_lightning.callbacks.progress import ProgressBar

    if any(isinstance(cb, ProgressBar) for cb in [*given, *callbacks]):
        return []
    return [ThrottledProgressBar()]



class ProgressLine(Callback):
    """Prints one line every ``every_percent`` % of the fit: step, loss, elapsed, estimated time
    left and threads. For logs and pipes, where a progress bar shows nothing until the end.

    Args:
        every_percent: percent of ``max_steps`` between lines (the last step always prints).
        stream: where to print (default ``sys.stderr``).
    """

    def __init__(self, *, every_percent: float = 5.0, stream: Any = None) -> None:
        super().__init__()
        if not 0 < every_percent <= 100:
            raise InputError(f"ProgressLine.every_percent must be in (0, 100], got {every_percent}")
        self.every_percent = every_percent
        self.stream = stream
        self._t0 = 0.0
        self._step0 = 0
        self._next = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._step0 = int(trainer.global_step)
        self._next = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else 0
        step = int(trainer.global_step)
        if total <= 0 or (step < self._next and step < total):
            return
        self._next = step + max(1, round(total * self.every_percent / 100))
        elapsed = time.perf_counter() - self._t0
        done = max(1, step - self._step0)
        left = elapsed / done * max(0, total - step)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        loss_text = f"{float(loss):.4f}" if loss is not None else "-"
        threads = torch.get_num_threads()
        print(
            f"nir: step {step}/{total} ({100 * step / total:.0f}%), loss {loss_text}, "
            f"{_clock(elapsed)} elapsed, ~{_clock(left)} left, {threads} thread{'s' if threads != 1 else ''}",
            file=self.stream or sys.stderr,
            flush=True,
        )


def _clock(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``; ``3725`` -> ``"1:02:05"``."""
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
