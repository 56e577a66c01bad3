#!/usr/bin/env python
"""Benchmark nir_lightning against ANTs SyN and FireANTs on the same pair(s), scored one way.

    python benchmarks/run_benchmark.py                      # 2 mm brain pair, CPU, all methods
    python benchmarks/run_benchmark.py --full --device cuda # 1 mm brain pair on a GPU
    python benchmarks/run_benchmark.py --demo --quick       # smoke run: phantom, few iterations
    python benchmarks/run_benchmark.py --pairs pairs.csv --methods nir,ants

Each method runs in its own subprocess (``python -m harness.worker``), one after the other,
so peak RSS and CUDA memory are per method. Every method's result becomes a displacement field
in nir_lightning's ITK/ANTs convention and is scored by nir_lightning's own metrics
(``harness/score.py``). See benchmarks/README.md for the settings of each method.

Writes results.csv (one row per pair and method), summary.csv (per method: means over the pairs
every method finished, and leads over each peer), per_structure.csv, results.md and a plot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

DEFAULT_METHODS = "nir,ants,fireants-greedy,fireants-syn"
AGREEMENT_WARN = 0.99


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run_benchmark.py",
        description="Register the same pair(s) with nir_lightning, ANTs SyN and FireANTs; score all with nir_lightning's metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pairs", help="CSV with columns fixed,moving,fixed_labels,moving_labels[,labels][,name]; relative paths are relative to the CSV")
    src.add_argument("--demo", action="store_true", help="the synthetic phantom pair of nir_lightning.data.phantom (no data needed)")
    p.add_argument("--full", action="store_true", help="the 1 mm brain pair instead of 2 mm")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "brain-pair"), help="folder of the shared brain pair")
    p.add_argument("--labels", help="label list (TSV, first column) for every pair; default: labels30.tsv for the brain pair, all common labels otherwise")
    p.add_argument("--demo-shape", default="40,44,38", help="phantom grid for --demo (every axis >= 37: see the report)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated: nir, nir:NAME (see --nir-config), ants, fireants-greedy, fireants-syn, and for raw/misaligned pairs ants-chain (rigid+affine+SyN), fireants-chain (moments+affine+greedy)")
    p.add_argument("--nir-config", action="append", default=[], metavar="NAME=A.yaml[+B.yaml]", help="extra nir_lightning run 'nir:NAME' with these config files (repeatable)")
    p.add_argument("--nir-args", default="", help="config overrides for every nir run (register_pair's overrides), e.g. '--trainer.max_steps=300 --model.lam=20'")
    p.add_argument("--device", default="cpu", help="cpu or cuda (nir: --trainer.accelerator=gpu; FireANTs: device='cuda'; ANTs is CPU-only)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads for every method (torch and ITK)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few iterations for every method (smoke test; numbers meaningless)")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds per method run, 0 = none")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster scoring)")
    p.add_argument("--no-onehot", action="store_true", help="skip the linear-interpolation-of-one-hot Dice")
    p.add_argument("--out", help="output folder (default benchmarks/results/DATE[_quick])")
    p.add_argument("--readme", action="store_true", help="also point README.md's benchmark block at this run's results.md (date, commit, command; no figures)")
    return p.parse_args(argv)


# -- pairs --------------------------------------------------------------------------------


def resolve_pairs(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from harness.pairs import FILE_KEYS, read_pairs_csv

    if args.demo:
        from nir_lightning.data.phantom import write_demo_pair

        shape = tuple(int(s) for s in args.demo_shape.split(","))
        files = write_demo_pair(out / "inputs", shape=shape)
        return [{"name": "demo-" + "x".join(map(str, shape)), **{k: str(files[k].resolve()) for k in FILE_KEYS}, "labels": args.labels}]
    if args.pairs:
        return read_pairs_csv(args.pairs, args.labels)
    data = Path(args.data_dir).resolve()
    folder = data if args.full else data / "2mm"
    pair = {
        "name": "brain-1mm" if args.full else "brain-2mm",
        "fixed": str(folder / "subjA_t1.nii.gz"),
        "moving": str(folder / "subjB_t1.nii.gz"),
        "fixed_labels": str(folder / "subjA_aseg.nii.gz"),
        "moving_labels": str(folder / "subjB_aseg.nii.gz"),
        "labels": args.labels or str(data / "labels30.tsv"),
    }
    return [pair]


def check_pair(pair: dict[str, Any]) -> None:
    for k in ("fixed", "moving", "fixed_labels", "moving_labels"):
        if not Path(pair[k]).is_file():
            sys.exit(f"run_benchmark: {k} of pair '{pair['name']}' not found: {pair[k]} (use --data-dir, --pairs or --demo)")


# -- methods ------------------------------------------------------------------------------


def resolve_methods(args: argparse.Namespace) -> tuple[list[str], dict[str, list[str]]]:
    configs: dict[str, list[str]] = {}
    for item in args.nir_config:
        name, _, files = item.partition("=")
        if not name or not files:
            sys.exit(f"run_benchmark: --nir-config {item!r}: expected NAME=a.yaml[+b.yaml]")
        paths = [str(Path(f).resolve()) for f in files.split("+")]
        for f in paths:
            if not Path(f).is_file():
                sys.exit(f"run_benchmark: --nir-config {name}: config file not found: {f}")
        configs[f"nir:{name}"] = paths
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods += [m for m in configs if m not in methods]
    from harness.methods import method_settings, overrides_from_args, runner_for

    try:
        overrides_from_args(shlex.split(args.nir_args))
    except ValueError as exc:
        sys.exit(f"run_benchmark: --nir-args: {exc}")
    for m in methods:
        try:
            base = method_settings(m)[0]
            runner_for(m)
        except (KeyError, ValueError) as exc:
            sys.exit(f"run_benchmark: {exc.args[0]}")
        if base.startswith("nir:") and base not in configs:
            sys.exit(f"run_benchmark: method {base} needs --nir-config {base[4:]}=FILE.yaml")
    return methods, configs


def available(method: str) -> str | None:
    """None if the method can run here, else the reason (one line)."""
    from harness.methods import PEER_MODULES, method_settings

    method = method_settings(method)[0]
    if method in PEER_MODULES:
        mod, dist = PEER_MODULES[method]
        if importlib.util.find_spec(mod) is None:
            return f"{dist} not installed (pip install -e .[bench])"
    return None


# -- running ------------------------------------------------------------------------------


def child_env(threads: int, seed: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[var] = str(threads)
    env["ANTS_RANDOM_SEED"] = str(seed)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("WANDB_MODE", "disabled")
    return env


def run_worker(spec: dict[str, Any], folder: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one method in a subprocess; returns its ``worker.json`` plus wall seconds and exit status."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    from nir_lightning.app.host_load import StealMeter

    with (folder / "worker.log").open("w") as log, StealMeter() as steal:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "harness.worker", str(folder / "spec.json")],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout and time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    info: dict[str, Any] = {}
    if (folder / "worker.json").is_file():
        info = json.loads((folder / "worker.json").read_text())
    # The worker measures its own peak (VmHWM). ru_maxrss from wait4 is only a fallback: on Linux
    # it includes this (large) parent's RSS at fork time, carried over the exec.
    info.setdefault("peak_rss_mb", usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10))
    info.update(returncode=proc.returncode, seconds_wall=wall, timed_out=timed_out, cpu_steal_pct=steal.percent)
    return info


def log_tail(folder: Path, n: int = 15) -> str:
    path = folder / "worker.log"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in lines[-n:])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {platform.system()} {platform.release()}"


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        return head + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def quiet_warnings() -> None:
    """Known-harmless dependency warnings that would bury the result lines."""
    for msg in (".*Setting affine, but the applied meta contains an affine.*", ".*always_return_as_numpy.*",
                ".*Using PyTorch native grid_sample.*"):
        warnings.filterwarnings("ignore", message=msg)


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        sys.exit(f"run_benchmark: --device must be cpu or cuda, got {args.device!r}")
    if args.threads < 1:
        sys.exit("run_benchmark: --threads must be >= 1")
    # torch.set_num_threads in the parent too: scoring uses it; the methods get it via the worker.
    os.environ.setdefault("WANDB_MODE", "disabled")
    quiet_warnings()
    import torch

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("run_benchmark: --device cuda but torch.cuda.is_available() is False (CPU build of torch, or no GPU)")

    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    out = Path(args.out) if args.out else BENCH / "results" / (stamp + ("_quick" if args.quick else ""))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    methods, nir_configs = resolve_methods(args)
    pairs = resolve_pairs(args, out)
    for pair in pairs:
        check_pair(pair)

    print(f"run_benchmark: {len(pairs)} pair(s) x {len(methods)} method(s) on {args.device}; results in {out}")
    print(f"threads: torch.set_num_threads({args.threads}), OMP_NUM_THREADS={args.threads}, MKL_NUM_THREADS={args.threads}, "
          f"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={args.threads} (set before ants is imported), ANTS_RANDOM_SEED={args.seed}")
    print("labels: warped with nearest neighbour for Dice/HD95 (every method)"
          + ("" if args.no_onehot else "; also linear interpolation of one-hot maps (column 'Dice (lin. one-hot)')"))
    if args.quick:
        print("QUICK run: few iterations for every method; the numbers only show that the pipeline works")
    runnable = []
    for m in methods:
        reason = available(m)
        if reason:
            print(f"SKIP {m}: {reason}", flush=True)
        else:
            runnable.append(m)

    from harness.methods import method_settings
    from harness.report import (
        add_ratios,
        label_names,
        markdown,
        pareto,
        plot,
        plot_pareto,
        summarize,
        write_csv,
        write_pareto,
        write_per_structure,
        write_summary,
    )
    from harness.score import load_eval_pair, load_field, load_labels, score_field

    from nir_lightning.io import write_json_atomic

    env = child_env(args.threads, args.seed)
    rows: list[dict[str, Any]] = []
    names: dict[int, str] = {}
    for pair in pairs:
        names.update(label_names(pair.get("labels")))
        print(f"\n== {pair['name']}: fixed {pair['fixed']}\n   moving {pair['moving']}", flush=True)
        eval_pair = load_eval_pair(pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"], pair.get("labels"))
        for m in methods:
            row: dict[str, Any] = {"pair": pair["name"], "method": m, "device": args.device, "threads": args.threads}
            if m not in runnable:
                row.update(status="skipped", note=available(m))
                rows.append(row)
                continue
            folder = out / pair["name"] / "".join(c if c.isalnum() or c in "-_." else "_" for c in m)
            base, settings = method_settings(m)
            spec = {**{k: pair[k] for k in ("fixed", "moving", "fixed_labels", "moving_labels", "labels")},
                    "method": base, "settings": settings, "out": str(folder), "device": args.device, "threads": args.threads,
                    "seed": args.seed, "quick": args.quick, "nir_configs": nir_configs.get(base, []),
                    "nir_args": shlex.split(args.nir_args), "multimodal": bool(pair.get("multimodal"))}
            print(f"-- {m} ...", end=" ", flush=True)
            info = run_worker(spec, folder, env, args.timeout)
            row.update(seconds_wall=info["seconds_wall"], cpu_steal_pct=info.get("cpu_steal_pct"), peak_rss_mb=info["peak_rss_mb"], peak_cuda_mb=info.get("peak_cuda_mb"),
                       seconds_reg=info.get("seconds_reg"), steps=info.get("steps"), dice_self_reported=info.get("dice_self_reported"))
            if base == "ants" or not args.device.startswith("cuda"):
                row["device"] = "cpu"
            if info["timed_out"] or not info.get("ok"):
                row.update(status="timeout" if info["timed_out"] else "failed", note=info.get("error", f"exit code {info['returncode']}"))
                print(f"{row['status'].upper()} ({row['note']}); log {folder / 'worker.log'}:\n{log_tail(folder)}", flush=True)
                rows.append(row)
                continue
            try:
                disp, aff = load_field(str(folder / "displacement.nii.gz"))
                native = folder / "native_warped_labels.nii.gz"
                scored = score_field(disp, aff, eval_pair, hd95=not args.no_hd95, onehot=not args.no_onehot,
                                     native_labels=load_labels(str(native)) if native.is_file() else None)
            except Exception as exc:  # noqa: BLE001 - a field we cannot score is reported, never guessed
                row.update(status="score-error", note=f"{type(exc).__name__}: {exc}")
                print(f"SCORE ERROR {row['note']}", flush=True)
                rows.append(row)
                continue
            row.update(status="ok", **scored.metrics)
            write_json_atomic(folder / "metrics.json", {**row, "worker": info})
            agree = row.get("native_label_agreement")
            print(f"Dice {row['dice_after']:.3f}" + (f" (lin. one-hot {row['dice_onehot_linear']:.3f})" if "dice_onehot_linear" in row else "")
                  + (f", HD95 {row['hd95_after']:.2f} mm" if "hd95_after" in row else "")
                  + f", det J<=0 {row['folding_percent']:.4f}% ({row['folding_count']}), SDlogJ {row['sdlogj']:.3f}, reg {row['seconds_reg']:.1f} s, "
                  f"wall {row['seconds_wall']:.1f} s" + (f" (CPU steal {row['cpu_steal_pct']:.0f} %)" if row.get("cpu_steal_pct") is not None else "")
                  + f", RSS {row['peak_rss_mb']:.0f} MB"
                  + (f", CUDA {row['peak_cuda_mb']:.0f} MB" if row.get("peak_cuda_mb") is not None else "")
                  + (f", own-warp agreement {100 * agree:.2f}%" if agree is not None else ""), flush=True)
            if agree is not None and agree < AGREEMENT_WARN:
                print(f"WARNING {m}: our warp of its converted field matches its own warped labels on only {100 * agree:.2f}% "
                      "of the foreground: the conversion is suspect, do not trust this row.", flush=True)
            rows.append(row)

    add_ratios(rows)
    header = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/run_benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "",
        "threads": f"{args.threads} (torch, OMP, MKL, ITK)",
        "git": git_describe(),
        "data": "; ".join(f"{p['name']}: {p['fixed']} / {p['moving']}" for p in pairs),
        "label interpolation": "nearest neighbour for Dice/HD95 (all methods)",
        "quick": "yes (few iterations: smoke test only)" if args.quick else "",
    }
    write_csv(out / "results.csv", rows)
    write_per_structure(out / "per_structure.csv", rows, names)
    write_summary(out / "summary.csv", summarize(rows))
    write_pareto(out / "pareto.csv", pareto(rows))
    md = markdown(rows, header, names)
    (out / "results.md").write_text(md)
    plot(out / "dice_vs_seconds.png", rows)
    drew_pareto = plot_pareto(out / "pareto.png", pareto(rows))
    write_json_atomic(out / "run.json", {"header": header, "args": vars(args), "methods": methods})
    if args.readme:
        update_readme(REPO / "README.md", header, out / "results.md")
    print(f"\nwrote {out / 'results.csv'}, {out / 'summary.csv'}, {out / 'per_structure.csv'}, {out / 'results.md'}, {out / 'dice_vs_seconds.png'}, "
          f"{out / 'pareto.csv'}" + (f", {out / 'pareto.png'}" if drew_pareto else " (no pareto.png: no SDlogJ and Dice to plot)") + "\n")
    print(md)
    failed = [r for r in rows if r["status"] in ("failed", "timeout", "score-error")]
    return 1 if failed else 0


README_START = "<!-- benchmark:start (written by benchmarks/run_benchmark.py --readme) -->"
README_END = "<!-- benchmark:end -->"


def readme_pointer(header: dict[str, Any], results: Path) -> str:
    """What README.md shows between its markers: where the last run's table is, with its date,
    commit and command; no figures (those live in benchmarks/README.md, each with its conditions).

    >>> print(readme_pointer({"date": "2026-12-04 15:00", "git": "abc1234", "command": "python benchmarks/run_benchmark.py"}, Path("out/results.md")))
    Last harness run: 2026-12-04 15:00, commit abc1234 (`python benchmarks/run_benchmark.py`); its table is in `out/results.md`. The figures quoted for the current version, with their commands and conditions, are in [`benchmarks/README.md`](benchmarks/README.md).
    """
    return (f"Last harness run: {header.get('date', '?')}, commit {header.get('git', '?')} (`{header.get('command', '?')}`); "
            f"its table is in `{results}`. The figures quoted for the current version, with their commands and conditions, "
            "are in [`benchmarks/README.md`](benchmarks/README.md).")


def update_readme(readme: Path, header: dict[str, Any], results: Path) -> None:
    """Point README.md's benchmark block at this run's table (:func:`readme_pointer`): the README
    keeps no table of its own that a later version could leave stale."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no benchmark markers ({README_START} ... {README_END})")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_START + "\n" + readme_pointer(header, results) + "\n" + README_END + tail)


if __name__ == "__main__":
    sys.exit(main())
