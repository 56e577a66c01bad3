"""Command line: ``nir fit|validate|test|predict`` (LightningCLI) and ``nir register``."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from nir_lightning import __version__
from nir_lightning.errors import InputError, NIRError, config_error, known_config_keys
from nir_lightning.evaluate import OUTPUT_FILES, write_outputs
from nir_lightning.io import remove_stale_temporaries
from nir_lightning.logging_callbacks import (
    ConfigToLoggers,
    finish_run,
    progress_bar_callbacks,
)
from nir_lightning.pair_datamodule import PairDataModule
from nir_lightning.registration_module import RegistrationModule
from nir_lightning.resume import AtomicCheckpointIO, checkpoint_callback, run_signature
from nir_lightning.resume import finish as finish_checkpoints
from nir_lightning.resume import prepare as prepare_checkpoints

log = logging.getLogger("nir_lightning")

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 400,
    "devices": 1,  # one pair is one small problem; several GPUs are for register-many
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    "default_root_dir": "runs",
    "logger": {
        "class_path": "pytorch_lightning.loggers.CSVLogger",
        "init_args": {"save_dir": "runs", "name": "nir"},
    },
}


class NIRCLI(LightningCLI):
    """LightningCLI over :class:`RegistrationModule` and :class:`PairDataModule`."""

    def __init__(self, args: list[str] | None = None, *, run: bool = True, trainer_defaults: dict[str, Any] | None = None) -> None:
        # Parse errors raise (main() turns them into one line naming the key) instead of printing the usage.
        no_exit = {"exit_on_error": False}
        super().__init__(
            RegistrationModule,
            PairDataModule,
            trainer_defaults={**TRAINER_DEFAULTS, **(trainer_defaults or {})},
            seed_everything_default=0,
            save_config_callback=ConfigToLoggers,  # config.yaml in the log folder + the W&B run config
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            parser_kwargs={**no_exit, **{c: no_exit for c in ("fit", "validate", "test", "predict")}} if run else no_exit,
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # A bar that refreshes every step floods non-TTY logs (CI): add a throttled one unless
        # the config disables the bar or brings its own.
        return super()._instantiate_trainer(config, [*callbacks, *progress_bar_callbacks(config, callbacks)])


def _register_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nir register",
        description="Fit a neural field to one pair and write warped image/labels, an ITK/ANTs displacement field, det J and metrics.json.",
        epilog="Any other --model.*/--data.*/--trainer.* option is passed to the LightningCLI config (e.g. --trainer.max_steps=800).",
    )
    p.add_argument("--fixed", help="fixed image (NIfTI)")
    p.add_argument("--moving", help="moving image (NIfTI)")
    p.add_argument("--fixed-labels", help="fixed label map (NIfTI), for Dice/HD95")
    p.add_argument("--moving-labels", help="moving label map (NIfTI)")
    p.add_argument("--labels", help="labels to average Dice over: a TSV whose first column is the label, or '2,3,41'")
    p.add_argument("-c", "--config", action="append", default=[], help="config YAML (repeatable; later files override earlier ones)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--demo", action="store_true", help="register the built-in synthetic phantom pair (no data needed)")
    p.add_argument("--overwrite", action="store_true", help="replace results of an earlier run in --output")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and sampling (default 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <output>/checkpoints/last.ckpt (same options)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="save <output>/checkpoints/last.ckpt every N steps for --resume (0: never; default 50)")
    return p


def register(argv: list[str]) -> dict[str, Any]:
    """``nir register``: fit and predict in one process; returns the metrics written."""
    t0 = time.perf_counter()
    args, extra = _register_parser().parse_known_args(argv)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output '{out}' exists and is not a folder; give the path of a folder (it is created if missing).")
    if args.resume and args.overwrite:
        raise InputError("--resume continues an interrupted run and --overwrite starts a new one; pass only one of them.")
    if args.checkpoint_every < 0:
        raise InputError(f"--checkpoint-every must be >= 0 (0 disables checkpoints), got {args.checkpoint_every}.")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    # --resume may replace outputs that a run killed while writing left (metrics.json comes last)
    resumable = args.resume and not (out / "metrics.json").exists()
    if existing and not args.overwrite and not resumable:
        raise InputError(f"--output '{out}' already holds results of an earlier run ({', '.join(existing)}); they were left untouched. Choose another folder or pass --overwrite.")
    cli_args: list[str] = []
    for cfg in args.config:
        if not Path(cfg).is_file():
            raise InputError(f"config file not found: '{cfg}'. Check the -c path (relative paths start from {Path.cwd()}).")
        cli_args += ["-c", cfg]
    if args.demo:
        if args.fixed or args.moving:
            raise InputError("--demo registers the built-in phantom; do not also give --fixed/--moving.")
        cli_args += ["--data.demo=true", f"--data.demo_dir={out / 'demo_inputs'}"]
    else:
        if not args.fixed or not args.moving:
            raise InputError("nir register needs --fixed and --moving (or --demo).")
        cli_args += [f"--data.fixed={args.fixed}", f"--data.moving={args.moving}"]
        if args.fixed_labels or args.moving_labels:
            cli_args += [f"--data.fixed_labels={args.fixed_labels}", f"--data.moving_labels={args.moving_labels}"]
    if args.labels:
        cli_args += [f"--data.labels={args.labels}"]
    cli_args += [f"--seed_everything={args.seed}", f"--model.seed={args.seed}"]
    cli_args += extra
    defaults = {
        "default_root_dir": str(out),
        "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "logs"}},
        "enable_checkpointing": args.checkpoint_every > 0,
        "callbacks": [checkpoint_callback(out, args.checkpoint_every)] if args.checkpoint_every > 0 else [],
        "enable_progress_bar": sys.stderr.isatty(),
        "enable_model_summary": False,
    }
    argv0, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when args and sys.argv both hold options
    try:
        cli = NIRCLI(cli_args, run=False, trainer_defaults=defaults)
    except argparse.ArgumentError as exc:
        raise config_error(exc, configs=args.config, known=known_config_keys(RegistrationModule, PairDataModule, pl.Trainer)) from exc
    except ValueError as exc:  # a constructor's range check without an InputError of its own
        if isinstance(exc, InputError):
            raise
        raise InputError(f"invalid configuration: {exc}. Run `nir fit --print_config` (with the same -c files) to see every value.") from exc
    except MisconfigurationException as exc:
        hint = " To run nir register without checkpoints, pass --checkpoint-every 0." if "enable_checkpointing" in str(exc) else ""
        raise InputError(f"invalid trainer configuration: {exc}{hint}") from exc
    finally:
        sys.argv = argv0
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, OUTPUT_FILES)  # left by a run killed mid-write
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # a kill mid-save leaves the previous last.ckpt
    ckpt_path, resumed_step = prepare_checkpoints(out, resume=args.resume, signature=run_signature(cli.config.as_dict()))
    t_fit = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    seconds_fit = time.perf_counter() - t_fit
    preds = trainer.predict(model, datamodule=dm, return_predictions=True)
    assert preds is not None
    reg = preds[0]
    extra_metrics = {
        "seconds_fit": seconds_fit,
        "steps": int(trainer.global_step),
        "device": str(model.device),
        "seed": args.seed,
        "fixed": dm.fixed,
        "moving": dm.moving,
        "version": __version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),  # CPU results are bitwise reproducible at a fixed thread count
        "python": platform.python_version(),
        "config": _plain(cli.config.as_dict()),
    }
    if resumed_step is not None:
        extra_metrics["resumed_from_step"] = resumed_step
    extra_metrics["seconds_total"] = time.perf_counter() - t0
    assert dm.pair is not None
    # metrics.json last: while it is absent the folder is not complete (--resume may redo it)
    metrics = write_outputs(reg, dm.pair, out, extra=extra_metrics, qc_title=f"{out.name}: {int(trainer.global_step)} steps")
    finish_run(trainer, metrics, output_dir=out)  # W&B summary/artifact when a WandbLogger is configured
    finish_checkpoints(out)  # complete: the checkpoint is no longer needed
    _summary(metrics, out)
    return metrics


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _summary(m: dict[str, Any], out: Path) -> None:
    parts = [f"steps={m['steps']}", f"fit {m['seconds_fit']:.1f}s", f"folding {m['folding_percent']:.4f}% ({m['folding_count']} voxels)"]
    if "dice_after" in m:
        parts.insert(0, f"Dice {m['dice_before']:.3f} -> {m['dice_after']:.3f}")
    if "hd95_after" in m:
        parts.append(f"HD95 {m['hd95_before']:.2f} -> {m['hd95_after']:.2f} mm")
    if "epe_after_vox" in m:
        parts.append(f"EPE {m['epe_before_vox']:.2f} -> {m['epe_after_vox']:.2f} vox")
    print(f"nir register: {', '.join(parts)}; outputs in {out}/", flush=True)


def _quiet_third_party() -> None:
    # Known-harmless warnings from dependencies that would bury our own messages.
    warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
    warnings.filterwarnings("ignore", message=".*Setting affine, but the applied meta contains an affine.*")
    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    # Batches are step indices and sampling depends on the global step only, so resuming
    # mid-epoch is exact (tests/test_faults.py) despite this warning.
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    _quiet_third_party()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] == "register-many":
            from nir_lightning.many import main as register_many

            return register_many(argv[1:])
        if argv and argv[0] == "register":
            register(argv[1:])
        elif argv and argv[0] == "compare":
            from nir_lightning.compare import main as compare

            return compare(argv[1:])
        else:
            NIRCLI(argv)
    except argparse.ArgumentError as exc:
        print(f"nir: error: {config_error(exc, known=known_config_keys(RegistrationModule, PairDataModule, pl.Trainer))}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"nir: error: {exc}", file=sys.stderr)
        return 2
    except (NIRError, FloatingPointError) as exc:  # disk full, diverged fit: a message, not a traceback
        print(f"nir: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
