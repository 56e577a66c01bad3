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

import contextlib
import gc
import os
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nir_lightning.app.batch_options import accelerator_requested, parse_command, trainer_sections
from nir_lightning.app.batch_summary import (
    ERROR_FILE,
    SUMMARY_FIELDS,
    aggregate_line,
    clear_pair,
    complete_metrics,
    disk_row,
    snapshot,
    summary_row,
    write_merged_summary,
    write_summary,
)
from nir_lightning.app.distributed import (
    barrier,
    dist_env,
    setup_distributed,
    single_process_lightning,
)
from nir_lightning.app.lock import LockedError, lock_folder
from nir_lightning.app.pairs_csv import CSV_COLUMNS, PairSpec, read_pairs, with_missing_files
from nir_lightning.app.register import register_pair
from nir_lightning.app.startup import RankCollector
from nir_lightning.app.threads import resolve_threads
from nir_lightning.errors import InputError, NIRError
from nir_lightning.evaluation.output_files import refuse_inputs_among_outputs
from nir_lightning.io import write_text_atomic

__all__ = ["CSV_COLUMNS", "ERROR_FILE", "SUMMARY_FIELDS", "PairSpec", "main", "read_pairs", "register_many", "run_pair", "wandb_project"]

MAX_EXIT = 100  # exit status = number of failed pairs, capped here


# ----------------------------------------------------------------------------- one pair


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
        return summary_row(spec, "running", seconds=None, error=f"being registered by {exc.holder.describe()}")
    try:
        if seen is not None and snapshot(pair_dir) != seen:
            row = disk_row(spec, output)  # finished by another process while this job ran
            if row["status"] in ("completed", "failed"):
                row["by_other"] = True
                return row
        try:  # before clear_pair: an input in the pair's folder named like an output is left as it is
            refuse_inputs_among_outputs(pair_dir, {
                "fixed image": spec.fixed, "moving image": spec.moving,
                "fixed label map": spec.fixed_labels, "moving label map": spec.moving_labels,
            }, writer=f"pair '{spec.id}' of --output", also=(ERROR_FILE,))
        except InputError as exc:
            return summary_row(spec, "failed", seconds=0.0, error=str(exc))
        clear_pair(pair_dir)
        if spec.problem:
            with contextlib.suppress(OSError):
                write_text_atomic(pair_dir / ERROR_FILE, spec.problem + "\n")
            return summary_row(spec, "failed", seconds=0.0, error=spec.problem)
        try:
            with single_process_lightning():
                result = register_pair(
                    spec.fixed, spec.moving, fixed_labels=spec.fixed_labels, moving_labels=spec.moving_labels,
                    output=pair_dir, **common,
                )
            return summary_row(spec, "completed", result.metrics)
        except Exception as exc:  # noqa: BLE001 -- isolate the failure: record it, go on with the others
            message = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                write_text_atomic(pair_dir / ERROR_FILE, traceback.format_exc())
            return summary_row(spec, "failed", seconds=time.perf_counter() - t0, error=message)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        lock.release()


# ----------------------------------------------------------------------------- command


def register_many(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``nir register-many``; returns ``{"rows", "failed", "skipped", "rank", "world"}``
    (``rows`` hold every pair on rank 0, only this rank's work on the others)."""
    args, extra = parse_command(argv)
    threads = resolve_threads(args.threads)
    out = Path(args.output)
    specs = read_pairs(args.pairs)
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")  # pairs are never synced across ranks

    d = dist_env()
    accel = accelerator_requested(args.config, extra)
    use_cuda = torch.cuda.is_available() and (accel or "auto").lower() in ("auto", "gpu", "cuda")
    setup_distributed(d, args.dist_backend, args.dist_timeout_hours, use_cuda)
    collector: RankCollector | None = None
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
            csv_folder = Path(args.pairs).expanduser().absolute().parent
            for i, spec in enumerate(specs):
                metrics = None if args.overwrite or spec.problem else complete_metrics(out / spec.id, spec)
                if metrics is not None:
                    done[i] = summary_row(spec, "completed", metrics)
                else:  # still to run: its files must exist (a finished pair whose inputs moved stays finished)
                    specs[i] = with_missing_files(spec, csv_folder)
        pending = [i for i in range(len(specs)) if i not in done]
        if d.world > 1:
            import torch.distributed as dist

            box: list[Any] = [pending, {i: seen[i] for i in pending}, {i: specs[i].problem for i in pending}] if d.rank == 0 else [None, None, None]
            dist.broadcast_object_list(box, src=0)
            pending, seen, problems = box
            specs = [replace(spec, problem=problems[i]) if problems.get(i) else spec for i, spec in enumerate(specs)]
        mine = pending[d.rank :: d.world]
        tag = f"[rank {d.rank}/{d.world}] " if d.world > 1 else ""
        if d.rank == 0:
            print(f"nir register-many: {len(specs)} pairs, {len(done)} already complete, {len(pending)} to do" + (f" over {d.world} ranks" if d.world > 1 else ""), flush=True)
            bad = [specs[i] for i in pending if specs[i].problem]
            if bad:  # before the first fit: a cohort's bad rows are known at once, not when their turn comes
                named = "; ".join(f"'{s.id}' ({str(s.problem).rstrip('.')})" for s in bad[:10])
                more = f"; and {len(bad) - 10} more (summary.csv names each)" if len(bad) > 10 else ""
                print(f"nir register-many: {len(bad)} of them cannot run and will be reported as failed: {named}{more}", file=sys.stderr, flush=True)

        partial = out / f".summary.rank{d.rank}-of-{d.world}.csv"
        results: dict[int, dict[str, Any]] = {}
        for n, i in enumerate(mine, 1):
            spec = specs[i]
            print(f"nir register-many: {tag}pair {n}/{len(mine)} '{spec.id}' ...", flush=True)
            row = run_pair(spec, out, common, seen=seen[i], force_unlock=args.force_unlock)
            results[i] = row
            if collector is None:  # run_pair collects after each pair it registers (or fails to)
                collector = RankCollector.after_first_pair(collected=row["status"] in ("completed", "failed") and not row.get("by_other"))
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
        if collector is not None:
            collector.close()
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


def main(argv: Sequence[str]) -> int:
    """Entry for ``nir register-many``; the exit status is the number of failed pairs (capped)."""
    result = register_many(argv)
    return min(int(result["failed"]), MAX_EXIT)
