"""Experiment tracking: QC images, run summary, artifacts, config push (W&B and CSV loggers).

* :class:`QCLogger` renders the QC figure (:mod:`nir_lightning.evaluation.qc`) of the current transform
  during a fit and logs it as a W&B image (``WandbLogger.log_image``) and/or as a PNG in the
  log folder of any logger that has one (``CSVLogger``); it also logs ``time/seconds`` (fit
  time without its own rendering) and, at the end of the fit, writes the final metrics to the
  run summary (W&B) or ``summary.json`` (CSV). With ``log_outputs`` it attaches the
  ``nir register``/``predict`` output folder to the W&B run as an artifact.
* :class:`ConfigToLoggers` is the LightningCLI ``SaveConfigCallback`` that also pushes the
  fully resolved config to the W&B run.

W&B runs honour ``WANDB_MODE``: ``offline`` writes a run folder for ``wandb sync``,
``disabled`` writes nothing, and nothing here renders an image for a disabled run. Without an
API key (and no ``WANDB_MODE``), :func:`wandb_run` falls back to offline instead of failing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import BasePredictionWriter, Callback
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import Logger, WandbLogger

from nir_lightning.errors import InputError
from nir_lightning.io import write_text_atomic

log = logging.getLogger(__name__)

QC_KEY = "qc"
"""Key of the QC image in W&B, and folder of the PNGs in a logger's log folder."""

SUMMARY_FILE = "summary.json"
"""Final metrics written into the log folder of loggers that have one (CSV)."""

TIME_KEY = "time/seconds"
"""Seconds since the start of the fit, without the time spent rendering QC figures."""


# -- W&B helpers ---------------------------------------------------------------------------
def wandb_run(logger: Logger) -> Any | None:
    """The live W&B run of ``logger``, or ``None`` (not a ``WandbLogger``, or ``WANDB_MODE=disabled``).

    Creating the run without an API key raises in wandb; unless the user chose a mode with
    ``WANDB_MODE``, log offline instead (a run folder that ``wandb sync`` uploads later).
    """
    if not isinstance(logger, WandbLogger):
        return None
    try:
        run = logger.experiment
    except Exception as exc:  # wandb.errors.UsageError; wandb is imported lazily by Lightning
        if os.environ.get("WANDB_MODE") or type(exc).__name__ != "UsageError":
            raise
        log.warning("W&B: %s; logging offline instead (upload later with `wandb sync`).", exc)
        import wandb

        os.environ["WANDB_MODE"] = "offline"  # process-wide, as WandbLogger(offline=True) does
        wandb.teardown()  # wandb reads WANDB_MODE once per process set-up
        run = logger.experiment
    return None if getattr(run, "disabled", False) else run


def _live_runs(loggers: Iterable[Logger]) -> list[tuple[Logger, Any]]:
    out = []
    for lg in loggers:
        run = wandb_run(lg)
        if run is not None:
            out.append((lg, run))
    return out


def _file_log_dirs(loggers: Iterable[Logger]) -> list[Path]:
    """Log folders of the loggers that write files themselves (CSV, TensorBoard), not W&B."""
    dirs = []
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            continue
        d = getattr(lg, "log_dir", None)
        if d:
            dirs.append(Path(d))
    return dirs


def scalar_metrics(metrics: Mapping[str, Any], *, prefix: str = "") -> dict[str, float | int]:
    """Finite numbers of ``metrics`` (nested dicts flattened with ``/``; tensors of one element).

    >>> scalar_metrics({"a": 1, "b": {"c": 0.5, "d": "x"}, "e": float("nan"), "f": True})
    {'a': 1, 'b/c': 0.5}
    """
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalar_metrics(value, prefix=f"{name}/"))
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[name] = value
    return out


def write_summary(trainer: pl.Trainer, metrics: Mapping[str, Any]) -> None:
    """Merge final metrics into every W&B run summary and ``summary.json`` of every file logger.

    Merged, not replaced: ``nir register`` adds its dense ``metrics.json`` values to what
    :class:`QCLogger` wrote at the end of the fit.
    """
    flat = scalar_metrics(metrics)
    for _, run in _live_runs(trainer.loggers):
        run.summary.update(flat)
    for d in _file_log_dirs(trainer.loggers):
        path = d / SUMMARY_FILE
        old = json.loads(path.read_text()) if path.is_file() else {}
        write_text_atomic(path, json.dumps({**old, **flat}, indent=2, sort_keys=True) + "\n")


def log_output_folder(trainer: pl.Trainer, folder: str | Path, *, name: str = "registration") -> int:
    """Attach the files in ``folder`` to each live W&B run as one artifact; returns how many runs got it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"cannot attach outputs: '{folder}' is not a folder.")
    import wandb

    runs = _live_runs(trainer.loggers)
    for _, run in runs:
        art = wandb.Artifact(f"{name}-{run.id}", type="registration", description=f"nir_lightning outputs from {folder}")
        for path in sorted(folder.iterdir()):  # top-level files only: not logs/ or demo inputs
            if path.is_file() and not path.name.startswith("."):
                art.add_file(str(path), name=path.name)
        run.log_artifact(art)
    return len(runs)


def finish_run(
    trainer: pl.Trainer,
    metrics: Mapping[str, Any],
    *,
    output_dir: str | Path | None = None,
    finish: bool = True,
) -> None:
    """End of ``nir register``: final metrics to the summaries, outputs as an artifact if asked.

    The artifact is uploaded when a :class:`QCLogger` with ``log_outputs=True`` is among the
    trainer's callbacks. ``finish`` closes the W&B runs so that a later ``WandbLogger`` in the
    same process (a notebook, a test) starts a new run instead of reusing this one.
    """
    write_summary(trainer, metrics)
    wants = any(isinstance(cb, QCLogger) and cb.log_outputs for cb in trainer.callbacks)  # type: ignore[attr-defined]
    if wants and output_dir is not None:
        log_output_folder(trainer, output_dir)
    if finish:
        for _, run in _live_runs(trainer.loggers):
            run.finish()


def logging_step(trainer: pl.Trainer) -> bool:
    """Whether the loggers write at this training step (Lightning's ``log_every_n_steps`` rule),
    or it is the last step (the run's summary reads the last logged values)."""
    step = int(trainer.global_step) + 1
    every = int(getattr(trainer, "log_every_n_steps", 0) or 0)  # set in Trainer.__init__, not declared
    last = trainer.max_steps is not None and trainer.max_steps > 0 and step >= trainer.max_steps
    return last or step == 1 or (every > 0 and step % every == 0)


def log_objective(
    module: pl.LightningModule, out: Mapping[str, Any], *, similarity: str, regularizer: str, smoothness: str | None, symmetric: bool,
) -> None:
    """The objective's terms as ``train/`` curves at the steps the loggers write (``self.log`` costs
    ~1 ms a call): ``train/<similarity>`` (with ``symmetric`` also ``train/<similarity>_inverse``),
    ``train/<regularizer>``, ``train/<smoothness>`` when the prior is on, ``train/fold_guard`` once the fold guard holds voxels
    (:mod:`~nir_lightning.losses.fold_guard`), ``train/loss``."""
    if not logging_step(module.trainer):
        return
    module.log(f"train/{similarity}", out["sim"], prog_bar=False)
    module.log(f"train/{regularizer}", out["jedt"])
    if smoothness is not None:
        module.log(f"train/{smoothness}", out["smooth"])
    if symmetric:
        module.log(f"train/{similarity}_inverse", out["sim_inverse"])
    if "fold_guard" in out:
        module.log("train/fold_guard", out["fold_guard"])
    module.log("train/loss", out["loss"], prog_bar=True)


# -- callbacks -----------------------------------------------------------------------------
class QCLogger(Callback):
    """Logs QC figures, fit time, final metrics and (optionally) output files of a registration.

    Hooks: ``on_fit_start`` (start the clock), ``on_train_batch_end`` (``time/seconds``; the
    QC figure every ``every_n_steps``), ``on_validation_end`` (the QC figure after each
    validation when ``every_n_steps`` is ``None``), ``on_fit_end`` (final figure and
    summary), ``on_predict_end`` (prediction writers' folders as a W&B artifact if
    ``log_outputs``). Keyword arguments map one-to-one onto ``init_args`` in a config.

    The figure shows mid-slices only (see :func:`nir_lightning.evaluation.qc.qc_slices`), so it costs a
    few thousand field evaluations plus about 0.5 s of matplotlib; nothing is rendered when no
    logger wants images (no file logger, W&B disabled).

    Args:
        every_n_steps: log the figure every this many training steps; ``None`` logs it after
            every validation (cadence ``data.steps_per_epoch``, or ``trainer.val_check_interval``),
            next to the ``val/*`` metrics; ``0`` only at the end of the fit.
        log_outputs: attach the output files of ``nir register``/``predict`` to the W&B run
            as an artifact (like ``WandbLogger(log_model=...)`` does for checkpoints).
        log_time: log ``time/seconds`` (fit time without QC rendering) for curves against time.
        dpi: resolution of the figure (each panel is 1.8 inches).
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        log_outputs: bool = False,
        log_time: bool = True,
        dpi: int = 80,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 0:
            raise InputError(f"QCLogger.every_n_steps must be >= 0 or null, got {every_n_steps}")
        if dpi < 10:
            raise InputError(f"QCLogger.dpi must be >= 10, got {dpi}")
        self.every_n_steps = every_n_steps
        self.log_outputs = log_outputs
        self.log_time = log_time
        self.dpi = dpi
        self._t0 = 0.0
        self._qc_seconds = 0.0
        self._last_qc_step = -1
        self.logged_steps: list[int] = []

    def elapsed(self) -> float:
        """Seconds of fitting so far (QC rendering excluded)."""
        return time.perf_counter() - self._t0 - self._qc_seconds

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._qc_seconds = 0.0
        self._last_qc_step = -1
        self.logged_steps = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.log_time and logging_step(trainer):
            pl_module.log(TIME_KEY, self.elapsed(), on_step=True, on_epoch=False)
        n = self.every_n_steps
        if n and trainer.global_step % n == 0:
            self.log_qc(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is None and not trainer.sanity_checking:
            self.log_qc(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_qc(trainer, pl_module)  # the final state (no-op if already logged at this step)
        final: dict[str, Any] = dict(trainer.callback_metrics)
        final["steps"] = int(trainer.global_step)
        final["seconds_fit"] = self.elapsed()
        write_summary(trainer, final)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_outputs:
            return
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            folder = getattr(cb, "output_dir", None)
            if isinstance(cb, BasePredictionWriter) and folder is not None and Path(folder).is_dir():
                log_output_folder(trainer, folder)

    @torch.no_grad()
    def log_qc(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> np.ndarray | None:
        """Render and log the QC figure for the current step; returns the image (or ``None``)."""
        step = int(trainer.global_step)
        pair = getattr(pl_module, "pair", None)
        transform_field = getattr(pl_module, "transform_field", None)
        if step == self._last_qc_step or pair is None or transform_field is None or not trainer.is_global_zero:
            return None
        runs = _live_runs(trainer.loggers)
        dirs = _file_log_dirs(trainer.loggers)
        if not runs and not dirs:
            return None  # nobody wants the image: do not pay for it
        from nir_lightning.evaluation.qc import qc_slices
        from nir_lightning.evaluation.qc_figure import qc_image, save_png

        t = time.perf_counter()
        max_points = int(getattr(pl_module, "eval_max_points", 2**16))
        image = qc_image(qc_slices(pair, transform_field(), max_points=max_points), title=f"step {step}", dpi=self.dpi)
        for logger, _ in runs:
            assert isinstance(logger, WandbLogger)
            logger.log_image(key=QC_KEY, images=[image[..., :3]], step=step, caption=[f"step {step}"])
        for d in dirs:
            save_png(image, d / QC_KEY / f"step_{step:06d}.png")
        self._qc_seconds += time.perf_counter() - t
        self._last_qc_step = step
        self.logged_steps.append(step)
        return image


class ConfigToLoggers(SaveConfigCallback):
    """LightningCLI's config saver that also pushes the resolved config to W&B runs.

    ``config.yaml`` still lands in the log folder; each live W&B run gets the same nested
    config (``model``, ``data``, ``trainer``, ...) as its run config.
    """

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        runs = _live_runs(trainer.loggers)
        if not runs:
            return
        # dump -> YAML -> plain dict: class_path/init_args stay readable, paths become strings
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for _, run in runs:
            run.config.update(config, allow_val_change=True)
