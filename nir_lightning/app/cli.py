"""The ``nir`` command line: argv in, one call of the layer below out.

Only the standard library is imported at module level: a typo'd option or a missing file is
reported before Lightning, MONAI or W&B are loaded (seconds, not a minute on a busy machine).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from nir_lightning.errors import InputError, NIRError

COMMANDS: dict[str, str] = {
    "register": "fit a neural field to one pair and write warped images, an ITK/ANTs displacement, det J, QC and metrics",
    "register-many": "register every pair of a CSV (resumable; sharded over torchrun ranks)",
    "apply": "apply a result's transform to another image or label map (like antsApplyTransforms)",
    "compare": "compare finished runs: a table of final metrics and the training curves",
    "report": "one HTML report of a register-many folder: flagged pairs first, plots, a sortable table with QC figures",
    "fit": "LightningCLI: fit the model of a config (-c files), e.g. with a W&B logger",
    "validate": "LightningCLI: validation metrics of a config/checkpoint",
    "test": "LightningCLI: test metrics of a config/checkpoint",
    "predict": "LightningCLI: dense evaluation and outputs (with -c configs/trainer/predict.yaml)",
}

HELP = "usage: nir <command> [options]   (nir <command> --help for its options)\n\ncommands:\n" + "".join(
    f"  {name:<14} {text}\n" for name, text in COMMANDS.items()
) + "\nAlso: python -m nir_lightning.cli <command> ...; the Python API is nir_lightning.register_pair.\n"


def register_parser() -> argparse.ArgumentParser:
    """Options of ``nir register`` (each maps onto an argument of :func:`nir_lightning.register_pair`)."""
    p = argparse.ArgumentParser(
        prog="nir register",
        description="Align a pair (affine stage), fit a neural field on top and write warped image/labels, the transform in ANTs' "
        "convention (displacement.nii.gz, affine.mat), det J, qc.png and metrics.json.",
        epilog="Any other --model.*/--data.*/--trainer.* option is passed to the LightningCLI config (e.g. --trainer.max_steps=800). "
        "Exit status: 0 done, 2 bad input (nothing written), 1 failure during the run.",
    )
    p.add_argument("--fixed", help="fixed image (NIfTI)")
    p.add_argument("--moving", help="moving image (NIfTI)")
    p.add_argument("--fixed-labels", help="fixed label map (NIfTI), for Dice/HD95; needs --moving-labels")
    p.add_argument("--moving-labels", help="moving label map (NIfTI); needs --fixed-labels")
    p.add_argument("--labels", help="labels to average Dice over: a TSV whose first column is the label, or '2,3,41'")
    p.add_argument("--fixed-mask", help="binary mask (NIfTI) on the fixed grid: the similarity counts only inside, samples are drawn inside")
    p.add_argument("--moving-mask", help="binary mask (NIfTI) on the moving grid: the similarity ignores what the transform maps outside it")
    p.add_argument("--affine", choices=("none", "rigid", "affine"), default=None,
                   help="stage before the neural field: none (the headers align the pair), rigid, or affine (default: rigid, then affine)")
    p.add_argument("--similarity", choices=("lncc", "ncc", "mse", "mi"), default=None,
                   help="similarity of the neural field (default lncc); mi for different contrasts (T1 against T2/FLAIR)")
    p.add_argument("--composed", action="store_true",
                   help="also write the whole transform (affine and deformable) as one field, composed_displacement.nii.gz")
    p.add_argument("-c", "--config", action="append", default=[], help="config YAML (repeatable; later files override earlier ones)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--demo", action="store_true", help="register the built-in synthetic phantom pair (no data needed; no affine stage unless --affine is given: the pair differs by a deformation only)")
    p.add_argument("--overwrite", action="store_true", help="replace results (and logs) of an earlier run in --output")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over --output's lock (<output>/.nir.lock) even from another host; only when that process is known to be gone")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and sampling (default 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: OMP_NUM_THREADS if set, else the cores this process may use less the current load)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <output>/checkpoints/last.ckpt (same options)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="save <output>/checkpoints/last.ckpt every N steps for --resume (0: never; default 50)")
    p.add_argument("--progress", choices=("auto", "line", "bar"), default="auto",
                   help="progress display: a line every 5%% (line), the bar (bar), or the bar on a terminal and lines otherwise (auto)")
    return p


def register(argv: list[str]) -> dict:
    """``nir register``: parse ``argv`` and run :func:`nir_lightning.register_pair`; returns the metrics."""
    args, extra = register_parser().parse_known_args(argv)
    from nir_lightning.app.register import register_pair

    result = register_pair(
        args.fixed, args.moving, fixed_labels=args.fixed_labels, moving_labels=args.moving_labels, labels=args.labels,
        fixed_mask=args.fixed_mask, moving_mask=args.moving_mask, affine=args.affine, similarity=args.similarity, composed=args.composed,
        config=args.config, output=args.output, overrides=extra, seed=args.seed, threads=args.threads, demo=args.demo,
        overwrite=args.overwrite, resume=args.resume, checkpoint_every=args.checkpoint_every, force_unlock=args.force_unlock,
        progress={"auto": None, "line": True, "bar": False}[args.progress],
    )
    return result.metrics


def _lightning_cli(argv: list[str]) -> None:
    from nir_lightning.training.lightning_cli import NIRCLI, quiet_third_party

    quiet_third_party()
    NIRCLI(argv)


def _config_message(exc: argparse.ArgumentError) -> str:
    import pytorch_lightning as pl

    from nir_lightning.app.config_errors import config_error, known_config_keys
    from nir_lightning.training.datamodule import PairDataModule
    from nir_lightning.training.module import RegistrationModule

    return str(config_error(exc, known=known_config_keys(RegistrationModule, PairDataModule, pl.Trainer)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nir``; returns the exit status (0 done, 2 bad input, 1 failure)."""
    if argv is None:  # the process's own command line (`nir`, `python -m nir_lightning.cli`): it ends after this call
        from nir_lightning.app.allocator import keep_freed_memory
        from nir_lightning.app.startup import end_rank_process, freeze_at_exit

        freeze_at_exit()  # no collector passes over every object at exit (1.3 s after the imports of a registration)
        keep_freed_memory()  # a step's large blocks reused, not page-faulted in again (app/allocator.py)
        args = list(sys.argv[1:])
        code = _main(args)
        return end_rank_process(code) if args[:1] == ["register-many"] else code
    return _main(list(argv))


def _main(argv: list[str]) -> int:
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP, end="")
        return 0 if argv else 2
    command = argv[0]
    try:
        if command == "register":
            register(argv[1:])
        elif command == "register-many":
            from nir_lightning.app.local_workers import main_or_none

            launched = main_or_none(argv[1:])  # several worker processes, each a rank running this same branch
            if launched is not None:
                return launched
            from nir_lightning.app.startup import collector_off

            with collector_off():  # torch, imported once for every pair (app/startup.py)
                from nir_lightning.app.batch import main as register_many

            return register_many(argv[1:])
        elif command == "apply":
            from nir_lightning.app.apply import main as apply

            return apply(argv[1:])
        elif command == "compare":
            from nir_lightning.app.compare import main as compare

            return compare(argv[1:])
        elif command == "report":
            from nir_lightning.app.report import main as report

            return report(argv[1:])
        elif command in ("fit", "validate", "test", "predict") or command.startswith("-"):
            _lightning_cli(argv)
        else:
            import difflib

            close = difflib.get_close_matches(command, list(COMMANDS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise InputError(f"unknown command {command!r}; use one of: {', '.join(COMMANDS)}.{hint} (`nir --help` lists them.)")
    except argparse.ArgumentError as exc:
        print(f"nir: error: {_config_message(exc)}", file=sys.stderr)
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
