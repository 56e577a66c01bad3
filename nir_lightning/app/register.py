"""Register one pair: :func:`register_pair`, the API behind ``nir register``, ``register-many``,
the benchmarks and the notebooks.

One registration flows through the layers like this: the inputs are checked from their headers
(:mod:`nir_lightning.data.checks`, before anything heavy is imported or any output exists),
LightningCLI builds the module, data module and trainer from the config files
(:mod:`nir_lightning.training.lightning_cli`), the pair is loaded onto the fixed grid
(:func:`nir_lightning.data.load_pair`), the trainer fits the field (each step: sampler ->
field -> warp -> :func:`nir_lightning.losses.registration_objective`), the predict step
evaluates it densely (:func:`nir_lightning.evaluation.evaluate`) and
:func:`nir_lightning.evaluation.write_outputs` writes the folder, ``metrics.json`` last.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nir_lightning.app import early_affine
from nir_lightning.app.early_affine import EarlyStart
from nir_lightning.app.host_load import cpu_times, stolen_seconds
from nir_lightning.app.lock import lock_folder
from nir_lightning.app.run_record import run_record, summary_line
from nir_lightning.app.startup import StartupCollector
from nir_lightning.app.threads import resolve_threads
from nir_lightning.data.checks import check_image_file, parse_labels
from nir_lightning.errors import InputError
from nir_lightning.evaluation.output_files import LOG_DIR, refuse_inputs_among_outputs

if TYPE_CHECKING:  # heavy: imported when a registration really runs

    from nir_lightning.data.pair import ImagePair
    from nir_lightning.evaluation.evaluate import RegistrationResult

PathLike = str | os.PathLike[str]


@dataclass
class PairRegistration:
    """What :func:`register_pair` returns.

    Attributes:
        output: the output folder (see the README's table of files).
        metrics: the contents of ``metrics.json``.
        result: dense tensors on the fixed grid (transform, displacement, det J, warped images).
        pair: the loaded pair (scaled images and label maps on the fixed grid).
    """

    output: Path
    metrics: dict[str, Any]
    result: RegistrationResult = field(repr=False)
    pair: ImagePair = field(repr=False)

    @property
    def dice_after(self) -> float | None:
        """Mean Dice after registration (``None`` without label maps)."""
        value = self.metrics.get("dice_after")
        return None if value is None else float(value)


def _as_path(image: Any, role: str, folder: Path | None) -> tuple[str, Path | None]:
    """A path for ``image`` (a path, or an in-memory nibabel image written to ``folder``)."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image), folder
    if hasattr(image, "affine") and hasattr(image, "dataobj"):
        import nibabel as nib

        folder = folder or Path(tempfile.mkdtemp(prefix="nir_inputs_"))
        path = folder / f"{role.replace(' ', '_')}.nii.gz"
        nib.save(image, str(path))
        return str(path), folder
    raise InputError(f"{role}: expected a NIfTI path or a nibabel image, got {type(image).__name__}.")


def _config_files(config: PathLike | Sequence[PathLike] | None) -> list[str]:
    files = [config] if isinstance(config, (str, os.PathLike)) else list(config or [])
    for cfg in files:
        if not Path(cfg).is_file():
            raise InputError(f"config file not found: '{cfg}'. Check the -c path (relative paths start from {Path.cwd()}).")
    return [os.fspath(c) for c in files]


def _override_args(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """Config overrides as LightningCLI arguments: ``{"trainer.max_steps": 800}`` or ``["--trainer.max_steps=800"]``."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        import json

        out = []
        for key, value in overrides.items():
            text = value if isinstance(value, str) else json.dumps(value)
            out.append(f"--{key.removeprefix('--')}={text}")
        return out
    return [str(a) for a in overrides]


def check_output_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that would mix runs; creates nothing."""
    from nir_lightning.evaluation.output_files import OUTPUT_FILES

    if out.exists() and not out.is_dir():
        raise InputError(f"--output '{out}' exists and is not a folder; give the path of a folder (it is created if missing).")
    if resume and overwrite:
        raise InputError("--resume continues an interrupted run and --overwrite starts a new one; pass only one of them.")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    # --resume may replace outputs that a run killed while writing left (metrics.json comes last)
    resumable = resume and not (out / "metrics.json").exists()
    if existing and not overwrite and not resumable:
        raise InputError(
            f"--output '{out}' already holds results of an earlier run ({', '.join(existing)}); they were left untouched. "
            "Choose another folder or pass --overwrite."
        )


def register_pair(
    fixed: Any = None,
    moving: Any = None,
    *,
    fixed_labels: Any = None,
    moving_labels: Any = None,
    labels: str | Sequence[int] | None = None,
    fixed_mask: Any = None,
    moving_mask: Any = None,
    affine: str | None = None,
    similarity: str | None = None,
    composed: bool = False,
    config: PathLike | Sequence[PathLike] | None = None,
    output: PathLike | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    seed: int = 0,
    threads: int | None = None,
    demo: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_every: int = 50,
    progress: bool | None = None,
    quiet: bool = False,
    force_unlock: bool = False,
) -> PairRegistration:
    """Fit a neural field to one pair and write the outputs (warped image/labels, ITK displacement,
    det J, ``qc.png``, ``metrics.json``) into ``output``.

    Args:
        fixed, moving: NIfTI paths or nibabel images (in-memory images are saved to
            a temporary folder first; metrics.json names those files). Not with ``demo``.
        fixed_labels, moving_labels: label maps for Dice/HD95; both or neither.
        labels: labels to average Dice over: a TSV path, ``"2,3,41"`` or a list of ints.
        fixed_mask, moving_mask: binary masks (NIfTI on their image's grid): the similarity
            counts only inside them; the samplers draw inside the fixed mask.
        affine: the stage before the neural field, ``"none"``, ``"rigid"`` or ``"affine"``
            (``None``: the config's ``data.affine``, by default affine after rigid).
        similarity: ``"lncc"``, ``"ncc"``, ``"mse"`` or ``"mi"`` for the neural field
            (``None``: the config's ``model.similarity``); ``"mi"`` for different contrasts.
        composed: also write the whole transform as ``composed_displacement.nii.gz``.
        config: config YAML file(s), layered in order like ``-c`` (e.g. ``configs/model/diffeomorphic.yaml``).
        output: output folder (created; a temporary folder when ``None``).
        overrides: config values by dotted key, ``{"trainer.max_steps": 800, "model.lam": 20}``
            (or LightningCLI arguments ``["--trainer.max_steps=800"]``).
        seed: seed of the initialisation and of the coordinate sampling.
        threads: torch CPU threads; ``None`` chooses from the usable cores and the load
            (:func:`nir_lightning.app.threads.resolve_threads`).
        demo: register the built-in synthetic phantom pair instead.
        overwrite: replace the results of an earlier run in ``output`` (its logs too).
        resume: continue an interrupted run from ``output/checkpoints/last.ckpt``.
        checkpoint_every: save that checkpoint every this many steps (0: never).
        progress: print a progress line every few percent (``None``: when stderr is not a
            terminal, where the progress bar is not shown).
        quiet: no summary line at the end.
        force_unlock: take over the lock of ``output`` even when another process (or another
            host) holds it; only when that process is known to be gone.

    Returns:
        :class:`PairRegistration` (output folder, metrics, dense result, loaded pair).

    Raises:
        InputError: a bad file, option or config value, before any output is created.
        LockedError: another process is writing ``output`` (an ``InputError``: exit status 2).

    >>> from nir_lightning import register_pair
    >>> r = register_pair(demo=True, overrides={"trainer.max_steps": 2}, quiet=True)  # doctest: +SKIP
    >>> sorted(r.metrics)[:3]  # doctest: +SKIP
    ['config', 'device', 'dice_after']
    """
    t0, cpu0 = time.perf_counter(), cpu_times()  # cpu0: the host's steal so far (metrics.json's seconds_cpu_stolen)
    # -- everything that can be checked without Lightning, MONAI or W&B, before any output exists
    if checkpoint_every < 0:
        raise InputError(f"--checkpoint-every must be >= 0 (0 disables checkpoints), got {checkpoint_every}.")
    n_threads = resolve_threads(threads)
    configs = _config_files(config)
    if demo and (fixed is not None or moving is not None):
        raise InputError("--demo registers the built-in phantom; do not also give --fixed/--moving.")
    if not demo and (fixed is None or moving is None):
        raise InputError("nir register needs --fixed and --moving (or --demo).")
    if (fixed_labels is None) != (moving_labels is None):
        given, missing = ("--fixed-labels", "--moving-labels") if fixed_labels is not None else ("--moving-labels", "--fixed-labels")
        raise InputError(f"{given} was given without {missing}: Dice needs both label maps (the fixed image's and the moving image's); give both, or neither.")
    if labels is not None and fixed_labels is None and not demo:
        raise InputError("--labels was given without --fixed-labels/--moving-labels; give the label maps too.")
    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="nir_register_"))
    if out.exists() and not out.is_dir():
        check_output_folder(out, resume=resume, overwrite=overwrite)  # the message for a file given as --output
    # one writer per result: taken before the look for earlier results, held to the end
    lock = lock_folder(out, what=f"--output '{out}'", force=force_unlock, fix=" (or pass --force-unlock)")
    collector: StartupCollector | None = None
    early: EarlyStart | None = None
    try:
        # before the look for earlier results: an input named like one of them is not one
        refuse_inputs_among_outputs(out, {
            "fixed image": fixed, "moving image": moving, "fixed label map": fixed_labels, "moving label map": moving_labels,
            "fixed mask": fixed_mask, "moving mask": moving_mask, "--labels file": labels,
        })
        check_output_folder(out, resume=resume, overwrite=overwrite)
        inputs: Path | None = None
        if not demo:
            fixed, inputs = _as_path(fixed, "fixed", inputs)
            moving, inputs = _as_path(moving, "moving", inputs)
            check_image_file(fixed, "fixed")
            check_image_file(moving, "moving")
            if fixed_labels is not None:
                fixed_labels, inputs = _as_path(fixed_labels, "fixed label", inputs)
                moving_labels, inputs = _as_path(moving_labels, "moving label", inputs)
                check_image_file(fixed_labels, "fixed label")
                check_image_file(moving_labels, "moving label")
        parse_labels(labels)  # the loader's own parser: a bad list or a missing file fails before any output exists
        if affine is not None and affine not in ("none", "rigid", "affine"):
            raise InputError(f"--affine {affine!r} is not a stage; use none (the headers align the pair), rigid or affine (rigid, then affine).")
        if similarity is not None and similarity not in ("lncc", "ncc", "mse", "mi"):
            raise InputError(f"--similarity {similarity!r} is not known; use lncc (one contrast), ncc, mse, or mi (different contrasts, e.g. T1 and T2).")
        masks: dict[str, str] = {}
        for role, mask in (("fixed", fixed_mask), ("moving", moving_mask)):
            if mask is not None:
                if demo:
                    raise InputError(f"--{role}-mask is not used with --demo; give --fixed/--moving too, without --demo.")
                path, inputs = _as_path(mask, f"{role} mask", inputs)
                check_image_file(path, f"{role} mask")
                masks[role] = str(path)
        cli_extra: list[str] = [f"--data.{role}_mask={path}" for role, path in masks.items()]
        if affine is not None:
            cli_extra.append(f"--data.affine.kind={affine}")
        if similarity is not None:
            cli_extra.append(f"--model.similarity={similarity}")

        user_overrides = _override_args(overrides)
        # the affine stage on the idle core while this process imports Lightning (app/early_affine.py)
        early = early_affine.start(demo=demo, affine=affine, resume=resume, configs=configs, overrides=user_overrides, threads=n_threads)

        # -- now the heavy part, without cyclic garbage collection until the fit (app/startup.py)
        collector = StartupCollector.begin()
        import torch

        torch.set_num_threads(n_threads)
        if early is not None:  # the pair loaded now (what the data module would load, by default)
            early.load(early_affine.default_source(
                fixed=fixed, moving=moving, fixed_labels=fixed_labels, moving_labels=moving_labels, labels=_labels_text(labels), masks=masks,
            ))
        return _run(
            out=out, configs=configs, overrides=cli_extra + user_overrides, seed=seed, demo=demo, composed=composed,
            fixed=fixed, moving=moving, fixed_labels=fixed_labels, moving_labels=moving_labels, labels=labels,
            overwrite=overwrite, resume=resume, checkpoint_every=checkpoint_every,
            progress=progress, quiet=quiet, t0=t0, collector=collector, early=early, cpu0=cpu0,
        )
    finally:
        if early is not None:
            early.close()
        if collector is not None:
            collector.close()
        lock.release()


def _run(
    *, out: Path, configs: list[str], overrides: list[str], seed: int, demo: bool, fixed: Any, moving: Any,
    fixed_labels: Any, moving_labels: Any, labels: Any, overwrite: bool, resume: bool,
    checkpoint_every: int, progress: bool | None, quiet: bool, t0: float, composed: bool = False,
    collector: StartupCollector | None = None, early: EarlyStart | None = None, cpu0: tuple[int, int] | None = None,
) -> PairRegistration:
    import argparse

    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from nir_lightning.app.config_errors import config_error, known_config_keys, union_error_detail
    from nir_lightning.evaluation.evaluate import RegistrationResult, when_dense
    from nir_lightning.evaluation.output_files import OUTPUT_FILES
    from nir_lightning.evaluation.outputs import TransformWriter, write_outputs
    from nir_lightning.io import remove_stale_temporaries
    from nir_lightning.training.callbacks import ProgressLine
    from nir_lightning.training.checkpoints import (
        AtomicCheckpointIO,
        checkpoint_callback,
        run_signature,
        save_after_failure,
    )
    from nir_lightning.training.checkpoints import finish as finish_checkpoints
    from nir_lightning.training.checkpoints import prepare as prepare_checkpoints
    from nir_lightning.training.datamodule import PairDataModule
    from nir_lightning.training.label_watch import DiceWatch, dice_fell_message
    from nir_lightning.training.lightning_cli import NIRCLI, quiet_third_party
    from nir_lightning.training.module import RegistrationModule
    from nir_lightning.training.tracking import finish_run

    quiet_third_party()
    # The phantom pair differs by a deformation only, and its near-spherical head leaves an affine
    # stage free to turn it (intensities match, anatomy does not): no stage unless configs or
    # --affine ask for one (they come later and win).
    cli_args: list[str] = ["--data.affine.kind=none"] if demo else []
    for cfg in configs:
        cli_args += ["-c", cfg]
    if demo:
        cli_args += ["--data.demo=true", f"--data.demo_dir={out / 'demo_inputs'}"]
    else:
        cli_args += [f"--data.fixed={fixed}", f"--data.moving={moving}"]
        if fixed_labels is not None:
            cli_args += [f"--data.fixed_labels={fixed_labels}", f"--data.moving_labels={moving_labels}"]
    if labels is not None:
        cli_args += [f"--data.labels={_labels_text(labels)}"]
    cli_args += [f"--seed_everything={seed}", f"--model.seed={seed}", *overrides]
    show_line = progress if progress is not None else not sys.stderr.isatty()
    callbacks: list[Any] = [checkpoint_callback(out, checkpoint_every)] if checkpoint_every > 0 else []
    callbacks.append(DiceWatch())  # warns when val/dice falls below its value before registration
    if show_line:
        callbacks.append(ProgressLine())
    defaults = {
        "default_root_dir": str(out),
        "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": LOG_DIR}},
        "enable_checkpointing": checkpoint_every > 0,
        "callbacks": callbacks,
        "enable_progress_bar": sys.stderr.isatty() and not show_line,
        "enable_model_summary": False,
    }
    argv0, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when args and sys.argv both hold options
    try:
        cli = NIRCLI(cli_args, run=False, trainer_defaults=defaults)
    except argparse.ArgumentError as exc:
        raise config_error(exc, configs=configs, known=known_config_keys(RegistrationModule, PairDataModule, pl.Trainer)) from exc
    except ValueError as exc:  # a constructor's range check without an InputError of its own
        if isinstance(exc, InputError):
            raise
        detail = union_error_detail(str(exc))
        raise InputError(f"invalid configuration: {detail}. Run `nir fit --print_config` (with the same -c files) to see every value.") from exc
    except MisconfigurationException as exc:
        hint = " To run nir register without checkpoints, pass --checkpoint-every 0." if "enable_checkpointing" in str(exc) else ""
        raise InputError(f"invalid trainer configuration: {exc}{hint}") from exc
    finally:
        sys.argv = argv0
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    dm.early = early  # used only if the parsed config asks for the loading and the stage it did
    if not demo:
        dm.setup("fit")  # load and check every voxel before the output folder is touched
    if overwrite:
        shutil.rmtree(out / LOG_DIR, ignore_errors=True)  # --overwrite replaces the run's logs
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, OUTPUT_FILES)  # left by a run killed mid-write
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # a kill mid-save leaves the previous last.ckpt
    ckpt_path, resumed_step = prepare_checkpoints(out, resume=resume, signature=run_signature(cli.config.as_dict()))
    if demo:
        dm.setup("fit")  # the phantom, into the output folder (trainer.fit would make it; setup runs once): part of the start-up
    if collector is not None:
        collector.end()  # the start-up's objects frozen, the collector on for the fit
    t_fit = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    seconds_fit = time.perf_counter() - t_fit
    try:
        # the transform files are compressed on a thread while the predict step warps and scores the labels
        with TransformWriter(dm.pair, out, composed=composed) as transform_files:
            with when_dense(transform_files):
                preds = trainer.predict(model, datamodule=dm, return_predictions=True)
            assert preds is not None
            reg = preds[0]
            assert isinstance(reg, RegistrationResult)
            assert dm.pair is not None
            note = dice_fell_message(reg.metrics.get("dice_before"), reg.metrics.get("dice_after"))
            if note is not None:  # into metrics.json's notes, as load_pair's warnings
                logging.getLogger("nir_lightning").warning(note)
                dm.pair.notes.append(note)
            extra = run_record(trainer=trainer, dm=dm, cli=cli, seed=seed, seconds_fit=seconds_fit, resumed_step=resumed_step)
            stolen = stolen_seconds(cpu0, cpu_times())  # a busy host's share, to read the seconds by (app/host_load.py)
            if stolen is not None:
                extra["seconds_cpu_stolen"] = stolen
            # metrics.json last: while it is absent the folder is not complete (--resume may redo it); seconds_total up to it
            metrics = write_outputs(
                reg, dm.pair, out, extra=extra, qc_title=f"{out.name}: {int(trainer.global_step)} steps", composed=composed, started=t0,
                transform_files=transform_files,
            )
    except BaseException:
        save_after_failure(trainer, out)  # the fit's end, which a complete run does not save: --resume need not redo it
        raise
    finish_run(trainer, metrics, output_dir=out)  # W&B summary/artifact when a WandbLogger is configured
    finish_checkpoints(out)  # complete: the checkpoint is no longer needed
    if not quiet:
        print(summary_line(metrics, out), flush=True)
    return PairRegistration(output=out, metrics=metrics, result=reg, pair=dm.pair)


def _labels_text(labels: str | Sequence[int] | None) -> str | None:
    """``--labels`` as the ``data.labels`` value: a TSV path or ``"2,3,41"``."""
    if labels is None or isinstance(labels, str):
        return labels
    return ",".join(str(int(v)) for v in labels)
