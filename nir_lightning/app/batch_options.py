"""The options of ``nir register-many`` and what its configs ask of the trainer, without torch:
the command decides how many worker processes to start (:mod:`nir_lightning.app.local_workers`)
before anything heavy is imported."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nir_lightning.errors import InputError

# Per-pair options come from the CSV; these register options may not be passed through.
PER_PAIR_OPTIONS = ("--fixed", "--moving", "--fixed-labels", "--moving-labels", "--demo", "--overwrite", "--output")


def workers_option(value: str) -> int | None:
    """``--workers``: ``auto`` (``None``) or a count >= 1.

    >>> workers_option("auto"), workers_option("3")
    (None, 3)
    >>> workers_option("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: --workers must be 'auto' or a whole number >= 1, got '0'
    """
    if value.strip().lower() == "auto":
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--workers must be 'auto' or a whole number >= 1, got {value!r}")
    return int(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nir register-many",
        description="Register every pair of a CSV (columns fixed,moving[,fixed_labels,moving_labels,id]) like `nir register`, into DIR/<id>/, with DIR/summary.csv. "
        "Re-running skips complete pairs and redoes the rest. The pairs are shared out over worker processes (--workers) or the ranks of `torchrun --nproc-per-node N`.",
        epilog="Any other --model.*/--data.*/--trainer.* option is passed to every pair's LightningCLI config (e.g. --trainer.max_steps=800). "
        "Exit status: the number of failed pairs (capped at 100), 2 for a bad command line or CSV, 1 when a worker process died.",
        allow_abbrev=False,
    )
    p.add_argument("--pairs", required=True, help="CSV of pairs; relative paths in it start from its folder")
    p.add_argument("--output", required=True, help="output folder: DIR/<id>/ per pair and DIR/summary.csv")
    p.add_argument("-c", "--config", action="append", default=[], help="config YAML for every pair (repeatable)")
    p.add_argument("--labels", help="labels to average Dice over: a TSV whose first column is the label, or '2,3,41'")
    p.add_argument("--seed", type=int, default=0, help="seed of every pair's fit (default 0)")
    p.add_argument("--overwrite", action="store_true", help="redo every pair, also complete ones (not those another job completes meanwhile)")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over the lock of a pair even when another process (or host) holds it; only when that process is known to be gone")
    p.add_argument("--workers", type=workers_option, default=None, metavar="N|auto",
                   help="worker processes on this machine, each fitting its share of the pairs on --threads threads (default auto: on the CPU, "
                   "one single-thread worker per free core, as many as memory and the pairs allow; with a GPU, one). Each pair's outputs are what "
                   "`nir register --threads T` writes for it; a cohort finishes sooner, as one pair's affine stage and scoring no longer leave cores idle")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of each worker or rank (default: 1 with several workers, else the usable cores less the load; see `nir register --help`)")
    p.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto", help="torch.distributed backend of the workers or torchrun ranks (auto: nccl with CUDA, else gloo)")
    p.add_argument("--dist-timeout-hours", type=float, default=72.0, help="how long ranks wait for each other at the end (default 72)")
    return p


def parse_command(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """``register-many``'s options and the rest (passed to every pair's config), checked: no
    per-pair option among the rest, the config files exist, ``--output`` is not a file."""
    args, extra = parser().parse_known_args(list(argv))
    for arg in extra:
        if arg.split("=", 1)[0] in PER_PAIR_OPTIONS:
            raise InputError(f"{arg.split('=', 1)[0]} is per pair in register-many: put it in the --pairs CSV (columns fixed,moving,fixed_labels,moving_labels,id).")
    for cfg in args.config:
        if not Path(cfg).is_file():
            raise InputError(f"config file not found: '{cfg}'.")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output '{out}' exists and is not a folder.")
    return args, extra


def trainer_sections(configs: Sequence[str]) -> list[dict[str, Any]]:
    """The ``trainer`` mapping of each config file that has one, in order (unreadable files are
    skipped: LightningCLI reports them with its own message)."""
    import yaml

    out: list[dict[str, Any]] = []
    for cfg in configs:
        try:
            data = yaml.safe_load(Path(cfg).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        trainer = data.get("trainer") if isinstance(data, dict) else None
        if isinstance(trainer, dict):
            out.append(trainer)
    return out


def accelerator_requested(configs: Sequence[str], extra: Sequence[str]) -> str | None:
    """The ``trainer.accelerator`` the configs and overrides ask for (last one wins), if any."""
    found: str | None = None
    for trainer in trainer_sections(configs):
        if trainer.get("accelerator") is not None:
            found = str(trainer["accelerator"])
    for i, arg in enumerate(extra):
        if arg.startswith("--trainer.accelerator="):
            found = arg.split("=", 1)[1]
        elif arg == "--trainer.accelerator" and i + 1 < len(extra):
            found = extra[i + 1]
    return found
