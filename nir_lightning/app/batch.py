"""``nir register-many``: register many pairs listed in a CSV; resumable, failure-isolated and
sharded over the ranks of ``torchrun`` (torch.distributed, ``gloo`` on CPU, ``nccl`` on GPUs).

Each pair is one in-process call of :func:`nir_lightning.register_pair`, so ``DIR/<id>/`` holds
exactly what ``nir register --output DIR/<id>`` writes. The pairs are independent (no gradient
sync); torch.distributed only agrees on who does which pair and collects the summary rows.

A pair is *complete* when ``DIR/<id>/metrics.json`` is valid JSON naming this pair's fixed and
moving images and the core NIfTI outputs exist. That is sound because
:func:`nir_lightning.evaluation.evaluate.write_outputs` writes every file atomically and ``metrics.json``
last, each flushed to disk with its folder entry before the next (also true after a power loss); before a pair is (re)done its old ``metrics.json`` is removed first, so a crash at any point
leaves it incomplete, never complete with mixed outputs.

One writer per pair: a pair is registered while holding its folder's lock
(:mod:`nir_lightning.app.lock`), and is looked at again under the lock. So two jobs on one
cohort (or the processes of a mistaken launch that all think they are rank 0) share the pairs:
a pair locked by another process is skipped (``running`` in this job's summary until it ends),
and one that another process completed or failed after this job started is not redone.
``summary.csv`` is written under its own lock from what is on disk plus this job's rows, so it
keeps one row per pair whatever the interleaving, and the job that ends last writes the full one.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import os
import re
import shutil
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nir_lightning.app.distributed import (
    accelerator_requested,
    barrier,
    dist_env,
    setup_distributed,
    single_process_lightning,
    trainer_sections,
)
from nir_lightning.app.lock import LockedError, folder_lock_path, holder_alive, lock_file, lock_folder, read_lock
from nir_lightning.app.register import register_pair
from nir_lightning.app.threads import resolve_threads
from nir_lightning.errors import InputError, NIRError
from nir_lightning.evaluation.output_files import CORE_FILES, OUTPUT_FILES
from nir_lightning.io import finite_or_none, remove_stale_temporaries, write_text_atomic

SUMMARY_FIELDS = ("id", "status", "dice_before", "dice_after", "folding_percent", "seconds", "error")
CSV_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "id")
# Written by every successful `nir register` (write_outputs), metrics.json last; optional
# outputs (e.g. inverse_displacement.nii.gz) are not required for completeness.
ERROR_FILE = "error.txt"
MAX_EXIT = 100  # exit status = number of failed pairs, capped here
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Per-pair options come from the CSV; these register options may not be passed through.
_PER_PAIR_OPTIONS = ("--fixed", "--moving", "--fixed-labels", "--moving-labels", "--demo", "--overwrite", "--output")
@dataclass(frozen=True)
class PairSpec:
    """One CSV row. Paths are absolute; ``problem`` is set for a row that cannot be run."""

    id: str
    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    line: int = 0
    problem: str | None = None

    @property
    def has_labels(self) -> bool:
        return bool(self.fixed_labels and self.moving_labels)


# ----------------------------------------------------------------------------- CSV


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return s or "pair"


def read_pairs(csv_path: str | os.PathLike[str]) -> list[PairSpec]:
    """Rows of a pairs CSV: ``fixed,moving`` and optional ``fixed_labels,moving_labels,id``.

    Relative paths are taken from the CSV's folder. A missing ``id`` becomes
    ``<fixed stem>__<moving stem>`` (sanitized; repeats get ``_2``, ``_3``, ... in row order, so
    appending rows never renames earlier pairs). Problems of the whole file (no such file, missing
    columns, bad or duplicate ids) raise :class:`InputError`; a row without a fixed/moving path or
    with only one label map is kept with ``problem`` set, to be reported as a failed pair.
    """
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise InputError(f"--pairs '{path}' not found (expected a CSV with columns fixed,moving[,fixed_labels,moving_labels,id]).")
    base = path.absolute().parent
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    for row in reader:
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            missing = [c for c in ("fixed", "moving") if c not in header]
            if missing:
                raise InputError(f"--pairs '{path}': the header row {row} lacks the column(s) {', '.join(missing)}; expected fixed,moving[,fixed_labels,moving_labels,id].")
            if len(set(header)) != len(header):
                raise InputError(f"--pairs '{path}': repeated column names in the header {row}.")
            unknown = [c for c in header if c and c not in CSV_COLUMNS]
            if unknown:
                print(f"nir register-many: ignoring column(s) {', '.join(unknown)} of {path} (known: {', '.join(CSV_COLUMNS)}).", file=sys.stderr)
            continue
        cells = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
        rows.append((reader.line_num, cells))
    if header is None or not rows:
        raise InputError(f"--pairs '{path}' lists no pairs (expected a header row fixed,moving[,...] and one row per pair).")

    def resolve(cell: str) -> str | None:
        if not cell:
            return None
        p = Path(cell).expanduser()
        return os.path.abspath(p if p.is_absolute() else base / p)

    taken: dict[str, int] = {}
    for line, cells in rows:
        rid = cells.get("id", "")
        if not rid:
            continue
        if not _SAFE_ID.match(rid) or rid.lower() == "summary.csv":
            raise InputError(f"--pairs '{path}' line {line}: id {rid!r} is not a safe folder name (use letters, digits, '.', '_' and '-', starting with a letter or digit).")
        if rid.lower() in taken:
            raise InputError(f"--pairs '{path}' line {line}: id {rid!r} repeats line {taken[rid.lower()]}; ids name the output folders and must be unique.")
        taken[rid.lower()] = line
    specs: list[PairSpec] = []
    for line, cells in rows:
        fixed, moving = resolve(cells.get("fixed", "")), resolve(cells.get("moving", ""))
        fixed_labels, moving_labels = resolve(cells.get("fixed_labels", "")), resolve(cells.get("moving_labels", ""))
        rid = cells.get("id", "")
        if not rid:
            stem = _sanitize(f"{_stem(fixed or 'none')}__{_stem(moving or 'none')}")
            rid, k = stem, 1
            while rid.lower() in taken:
                k += 1
                rid = f"{stem}_{k}"
            taken[rid.lower()] = line
        problem = None
        if not fixed or not moving:
            problem = f"line {line}: the fixed and moving columns must both name a NIfTI file."
        elif bool(fixed_labels) != bool(moving_labels):
            problem = f"line {line}: give both fixed_labels and moving_labels, or neither."
        specs.append(PairSpec(rid, fixed or "", moving or "", fixed_labels, moving_labels, line, problem))
    return specs


# ----------------------------------------------------------------------------- one pair


def complete_metrics(pair_dir: Path, spec: PairSpec) -> dict[str, Any] | None:
    """The pair's ``metrics.json`` if its results are complete (see module docstring), else ``None``."""
    try:
        metrics = json.loads((pair_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict):
        return None
    if metrics.get("fixed") != spec.fixed or metrics.get("moving") != spec.moving:
        return None  # results of another pair under this id (the CSV changed)
    required = CORE_FILES + (("warped_labels.nii.gz",) if spec.has_labels else ())
    if not all((pair_dir / name).is_file() for name in required):
        return None
    return metrics


def _identity(path: Path) -> tuple[int, int] | None:
    """Inode and mtime of ``path`` (an atomic rewrite changes both), ``None`` if absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def snapshot(pair_dir: Path) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """What this job saw of a pair's ``metrics.json`` and ``error.txt`` when it started."""
    return _identity(pair_dir / "metrics.json"), _identity(pair_dir / ERROR_FILE)


def _error_message(pair_dir: Path) -> str:
    """The last line of a failed pair's ``error.txt`` (the exception and its message)."""
    try:
        lines = [ln for ln in (pair_dir / ERROR_FILE).read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def disk_row(spec: PairSpec, output: Path) -> dict[str, Any]:
    """The row of a pair this process did not (yet) do, from its folder: ``completed``,
    ``running`` (locked by a live process), ``failed`` (``error.txt``) or ``pending``."""
    pair_dir = output / spec.id
    metrics = complete_metrics(pair_dir, spec)
    if metrics is not None:
        return _row(spec, "completed", metrics)
    holder = read_lock(folder_lock_path(pair_dir))
    if holder is not None and holder_alive(holder):  # a dead holder's pair is incomplete: pending
        return _row(spec, "running", seconds=None, error=f"being registered by {holder.describe()}")
    if (pair_dir / ERROR_FILE).is_file():
        return _row(spec, "failed", seconds=None, error=_error_message(pair_dir))
    return _row(spec, "pending", seconds=None)


def _clear(pair_dir: Path) -> None:
    """Remove an earlier attempt's outputs; ``metrics.json`` first so the folder is never complete meanwhile."""
    ordered = ["metrics.json"] + [n for n in OUTPUT_FILES if n != "metrics.json"] + [ERROR_FILE]
    for name in ordered:
        with contextlib.suppress(FileNotFoundError):
            (pair_dir / name).unlink()
    remove_stale_temporaries(pair_dir, OUTPUT_FILES)  # temporaries of atomic writes cut short
    shutil.rmtree(pair_dir / "logs", ignore_errors=True)


def _row(spec: PairSpec, status: str, metrics: dict[str, Any] | None = None, seconds: float | None = None, error: str = "") -> dict[str, Any]:
    m = metrics or {}
    return {
        "id": spec.id,
        "status": status,
        "dice_before": finite_or_none(m.get("dice_before")),
        "dice_after": finite_or_none(m.get("dice_after")),
        "folding_percent": finite_or_none(m.get("folding_percent")),
        "seconds": finite_or_none(m.get("seconds_total")) if seconds is None else seconds,
        "error": " ".join(error.split()),
    }


def run_pair(
    spec: PairSpec, output: Path, common: Mapping[str, Any], *,
    seen: tuple[tuple[int, int] | None, tuple[int, int] | None] | None = None, force_unlock: bool = False,
) -> dict[str, Any]:
    """Register one pair into ``output/<id>`` with :func:`register_pair` (keyword arguments
    ``common``) while holding the pair's lock; a summary row, never raises for a failed pair
    (``KeyboardInterrupt``/``SystemExit`` still propagate).

    A pair locked by another process gives a ``running`` row and is left alone. ``seen`` is the
    :func:`snapshot` of the pair when this job started: a pair whose ``metrics.json`` (complete) or
    ``error.txt`` changed since was done by another process and is not redone (its row is read back).
    """
    pair_dir = output / spec.id
    t0 = time.perf_counter()
    try:
        lock = lock_folder(pair_dir, what=f"pair '{spec.id}' ('{pair_dir}')", force=force_unlock, fix=" (or pass --force-unlock)")
    except LockedError as exc:
        return _row(spec, "running", seconds=None, error=f"being registered by {exc.holder.describe()}")
    try:
        if seen is not None and snapshot(pair_dir) != seen:
            row = disk_row(spec, output)  # finished by another process while this job ran
            if row["status"] in ("completed", "failed"):
                row["by_other"] = True
                return row
        _clear(pair_dir)
        if spec.problem:
            return _row(spec, "failed", seconds=0.0, error=spec.problem)
        try:
            with single_process_lightning():
                result = register_pair(
                    spec.fixed, spec.moving, fixed_labels=spec.fixed_labels, moving_labels=spec.moving_labels,
                    output=pair_dir, **common,
                )
            return _row(spec, "completed", result.metrics)
        except Exception as exc:  # noqa: BLE001 -- isolate the failure: record it, go on with the others
            message = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                write_text_atomic(pair_dir / ERROR_FILE, traceback.format_exc())
            return _row(spec, "failed", seconds=time.perf_counter() - t0, error=message)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        lock.release()


# ----------------------------------------------------------------------------- summary


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_summary(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as ``summary.csv`` (atomically)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUMMARY_FIELDS)
    for row in rows:
        writer.writerow([_cell(row.get(k)) for k in SUMMARY_FIELDS])
    write_text_atomic(path, buf.getvalue())


def write_merged_summary(path: Path, specs: Sequence[PairSpec], done: dict[int, dict[str, Any]], results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Write ``summary.csv`` under its lock: one row per CSV row, this job's rows where it has
    them, else what the pair's folder says (another job may have done it); returns the rows."""
    with lock_file(path, what=f"summary '{path}'", wait_s=120.0):
        rows = _merged(specs, done, results, path.parent)
        write_summary(path, rows)
    return rows


def aggregate_line(rows: Sequence[dict[str, Any]], skipped: int, summary: Path) -> str:
    done = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] == "failed"]
    running = [r for r in rows if r["status"] == "running"]
    others = sum(bool(r.get("by_other")) for r in rows)
    parts = [f"{len(done)}/{len(rows)} pairs completed ({skipped} already complete, skipped), {len(failed)} failed"]
    if others:
        parts[0] += f", {others} of them done by another job meanwhile"
    if running:
        parts[0] += f", {len(running)} still running in another process"
    for key in ("dice_after", "dice_before"):
        vals = [r[key] for r in done if r.get(key) is not None]
        if vals:
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            parts.append(f"{key.replace('_', ' ')} {statistics.fmean(vals):.3f} ± {sd:.3f} (n={len(vals)})")
    fold = [r["folding_percent"] for r in done if r.get("folding_percent") is not None]
    if fold:
        parts.append(f"folding {statistics.fmean(fold):.4f}% mean")
    if failed:
        parts.append("failed: " + ", ".join(r["id"] for r in failed[:10]) + (" ..." if len(failed) > 10 else ""))
    return f"nir register-many: {'; '.join(parts)}; summary in {summary}"


# ----------------------------------------------------------------------------- command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nir register-many",
        description="Register every pair of a CSV (columns fixed,moving[,fixed_labels,moving_labels,id]) like `nir register`, into DIR/<id>/, with DIR/summary.csv. "
        "Re-running skips complete pairs and redoes the rest. Under `torchrun --nproc-per-node N` the pairs are sharded over the ranks.",
        epilog="Any other --model.*/--data.*/--trainer.* option is passed to every pair's LightningCLI config (e.g. --trainer.max_steps=800). "
        "Exit status: the number of failed pairs (capped at 100), 2 for a bad command line or CSV.",
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of each rank (default: the usable cores less the load; see `nir register --help`)")
    p.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto", help="torch.distributed backend under torchrun (auto: nccl with CUDA, else gloo)")
    p.add_argument("--dist-timeout-hours", type=float, default=72.0, help="how long ranks wait for each other at the end (default 72)")
    return p


def register_many(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``nir register-many``; returns ``{"rows", "failed", "skipped", "rank", "world"}``
    (``rows`` hold every pair on rank 0, only this rank's work on the others)."""
    args, extra = parser().parse_known_args(list(argv))
    for arg in extra:
        if arg.split("=", 1)[0] in _PER_PAIR_OPTIONS:
            raise InputError(f"{arg.split('=', 1)[0]} is per pair in register-many: put it in the --pairs CSV (columns fixed,moving,fixed_labels,moving_labels,id).")
    for cfg in args.config:
        if not Path(cfg).is_file():
            raise InputError(f"config file not found: '{cfg}'.")
    threads = resolve_threads(args.threads)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output '{out}' exists and is not a folder.")
    specs = read_pairs(args.pairs)
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")  # pairs are never synced across ranks

    d = dist_env()
    accel = accelerator_requested(args.config, extra)
    use_cuda = torch.cuda.is_available() and (accel or "auto").lower() in ("auto", "gpu", "cuda")
    setup_distributed(d, args.dist_backend, args.dist_timeout_hours, use_cuda)
    try:
        # One Lightning process per rank, one device each: never DDP inside a rank.
        forced = ["--trainer.num_nodes=1", "--trainer.strategy=auto"]
        forced.append(f"--trainer.devices=[{d.device_index}]" if use_cuda else "--trainer.devices=1")
        common: dict[str, Any] = {
            "seed": args.seed, "config": args.config, "labels": args.labels, "overrides": [*extra, *forced],
            "threads": threads, "progress": False,
        }

        # Rank 0 decides what is left to do; everyone shards that list the same way.
        done: dict[int, dict[str, Any]] = {}
        seen: dict[int, Any] = {}
        if d.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            # what each pair's folder holds, taken before the look for complete pairs: a pair that
            # changes after it was done by another job meanwhile (see run_pair)
            seen = {i: snapshot(out / spec.id) for i, spec in enumerate(specs)}
            for i, spec in enumerate(specs):
                metrics = None if args.overwrite or spec.problem else complete_metrics(out / spec.id, spec)
                if metrics is not None:
                    done[i] = _row(spec, "completed", metrics)
        pending = [i for i in range(len(specs)) if i not in done]
        if d.world > 1:
            import torch.distributed as dist

            box: list[Any] = [pending, {i: seen[i] for i in pending}] if d.rank == 0 else [None, None]
            dist.broadcast_object_list(box, src=0)
            pending, seen = box
        mine = pending[d.rank :: d.world]
        tag = f"[rank {d.rank}/{d.world}] " if d.world > 1 else ""
        if d.rank == 0:
            print(f"nir register-many: {len(specs)} pairs, {len(done)} already complete, {len(pending)} to do" + (f" over {d.world} ranks" if d.world > 1 else ""), flush=True)

        partial = out / f".summary.rank{d.rank}-of-{d.world}.csv"
        results: dict[int, dict[str, Any]] = {}
        for n, i in enumerate(mine, 1):
            spec = specs[i]
            print(f"nir register-many: {tag}pair {n}/{len(mine)} '{spec.id}' ...", flush=True)
            row = run_pair(spec, out, common, seen=seen[i], force_unlock=args.force_unlock)
            results[i] = row
            if row["status"] == "running":
                status = f"skipped: {row['error']}"
            elif row.get("by_other"):
                status = f"skipped: {row['status']} by another process meanwhile"
            else:
                status = f"completed in {row['seconds']:.1f} s" if row["status"] == "completed" else f"FAILED: {row['error']}"
            print(f"nir register-many: {tag}pair '{spec.id}' {status}", file=sys.stderr if row["status"] == "failed" else sys.stdout, flush=True)
            if d.world > 1:  # this rank's progress, readable while the job runs
                write_summary(partial, [results[j] for j in sorted(results)])
            elif d.rank == 0:
                write_merged_summary(out / "summary.csv", specs, done, results)

        if d.world > 1:
            import torch.distributed as dist

            if not mine:
                write_summary(partial, [])
            barrier(d)  # every rank has finished its pairs (and its partial summary)
            gathered: list[dict[int, dict[str, Any]] | None] = [None] * d.world if d.rank == 0 else []
            dist.gather_object(results, gathered if d.rank == 0 else None, dst=0)
            if d.rank == 0:
                for part in gathered:
                    results.update(part or {})
    finally:
        if d.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    if d.rank != 0:
        return {"rows": [results[i] for i in sorted(results)], "failed": 0, "skipped": 0, "rank": d.rank, "world": d.world}
    missing = [specs[i].id for i in range(len(specs)) if i not in done and i not in results]
    if missing:  # cannot happen unless a rank lost its results; make it visible rather than silent
        raise RuntimeError(f"no result for pair(s) {', '.join(missing)}")
    summary = out / "summary.csv"
    rows = write_merged_summary(summary, specs, done, results)
    if d.world > 1:
        for stale in out.glob(".summary.rank*-of-*.csv"):
            with contextlib.suppress(OSError):
                stale.unlink()
    failed = sum(r["status"] == "failed" for r in rows)
    print(aggregate_line(rows, len(done), summary), flush=True)
    # summary.csv is final here: `rows` is what it holds; the report reads it (rewritten on resume)
    cohort_report(out, labels=args.labels, wandb_project=wandb_project(args.config, extra))
    return {"rows": rows, "failed": failed, "skipped": len(done), "rank": d.rank, "world": d.world}


def wandb_project(configs: Sequence[str], extra: Sequence[str]) -> str | None:
    """The W&B project when the configs or overrides ask for Lightning's ``WandbLogger``, else ``None``."""
    project: str | None = None
    for trainer in trainer_sections(configs):
        if "logger" not in trainer:
            continue  # a later file's logger replaces an earlier one's; no logger key changes nothing
        logger = trainer["logger"]
        wandb = isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger")
        project = str((logger.get("init_args") or {}).get("project") or "nir_lightning") if wandb else None
    for arg in extra:
        if arg.startswith("--trainer.logger.init_args.project=") and project is not None:
            project = arg.split("=", 1)[1]
    return project


def cohort_report(out: Path, *, labels: str | None, wandb_project: str | None) -> None:
    """``out/report.html`` (:func:`nir_lightning.app.report.write_report`) and, with a W&B
    logger configured, the same rows as one W&B Table. A report that cannot be written is a
    warning: the registrations are done and ``summary.csv`` holds them."""
    from nir_lightning.app.report import log_cohort_table, write_report

    tsv = labels if labels and Path(labels).is_file() else None
    try:
        page = write_report(out, labels_tsv=tsv)
        print(f"nir register-many: cohort report {page}", flush=True)
    except (NIRError, OSError, ValueError) as exc:
        print(f"nir register-many: warning: no cohort report ({exc}); run `nir report {out}` later", file=sys.stderr, flush=True)
        return
    if wandb_project is None or os.environ.get("WANDB_MODE") == "disabled":
        return
    import wandb

    run = wandb.init(project=wandb_project, job_type="register-many", dir=str(out), name=f"cohort-{out.name}")
    try:
        n = log_cohort_table(out, run)
        print(f"nir register-many: W&B table of {n} pairs in run {run.name}", flush=True)
    finally:
        run.finish()


def _merged(specs: Sequence[PairSpec], done: dict[int, dict[str, Any]], results: dict[int, dict[str, Any]], output: Path) -> list[dict[str, Any]]:
    """One row per CSV row, in CSV order: this job's row when it has a final one, else the
    pair's folder's (:func:`disk_row`: done by another job, running there, or pending)."""
    rows = []
    for i, spec in enumerate(specs):
        row = done.get(i) or results.get(i)
        if row is None or row["status"] not in ("completed", "failed"):
            row = disk_row(spec, output)
            row["by_other"] = row["status"] in ("completed", "failed")
        rows.append(row)
    return rows


def main(argv: Sequence[str]) -> int:
    """Entry for ``nir register-many``; the exit status is the number of failed pairs (capped)."""
    result = register_many(argv)
    return min(int(result["failed"]), MAX_EXIT)
