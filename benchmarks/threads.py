"""Threads trade-off: seconds per fit with 1..N torch threads, on an idle machine and under load.

Each row is one ``register_pair`` fit (same pair, seed and steps) in a fresh process. "Under
load" starts ``--load`` busy processes (pure-Python spin loops, one core each) for the duration
of the fit, as another job on a shared machine would. Prints a markdown table; the README's
default (usable cores less the 1-minute load average) is chosen from it.

    python benchmarks/threads.py --steps 50                  # demo phantom
    python benchmarks/threads.py --steps 50 --pair ../shared/data/brain-pair/2mm
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
import torch
from nir_lightning import register_pair
threads, steps, pair, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
kw = dict(demo=True) if pair == "demo" else dict(fixed=f"{pair}/subjA_t1.nii.gz", moving=f"{pair}/subjB_t1.nii.gz")
t = time.perf_counter()
r = register_pair(**kw, output=out, overwrite=True, threads=threads, overrides={"trainer.max_steps": steps},
                  checkpoint_every=0, progress=False, quiet=True)
print(json.dumps({"seconds_fit": r.metrics["seconds_fit"], "threads": torch.get_num_threads()}))
"""


def _spin() -> None:
    while True:
        pass


def fit_seconds(threads: int, steps: int, pair: str, out: Path) -> float:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("OMP_NUM_THREADS", None)  # --threads decides
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), pair, str(out)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds_fit"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--pair", default="demo", help="'demo' or a folder with subjA_t1.nii.gz / subjB_t1.nii.gz")
    p.add_argument("--load", type=int, default=len(os.sched_getaffinity(0)), help="busy processes in the loaded rows")
    p.add_argument("--out", default="/tmp/nir_threads")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    rows = []
    for loaded in (False, True):
        spinners = [mp.Process(target=_spin, daemon=True) for _ in range(args.load if loaded else 0)]
        for s in spinners:
            s.start()
        time.sleep(1.0 if loaded else 0.0)
        try:
            for threads in range(1, cores + 1):
                secs = fit_seconds(threads, args.steps, args.pair, Path(args.out) / f"t{threads}_{int(loaded)}")
                rows.append((f"{args.load} busy processes" if loaded else "idle", threads, secs))
                print(f"{rows[-1][0]:>18}  threads={threads}  fit {secs:.1f} s", file=sys.stderr, flush=True)
        finally:
            for s in spinners:
                s.terminate()
    print(f"| machine load | threads | fit s ({args.steps} steps, {args.pair}) | ratio to 1 thread |")
    print("|---|---|---|---|")
    for load, threads, secs in rows:
        base = next(s for lo, t, s in rows if lo == load and t == 1)
        print(f"| {load} | {threads} | {secs:.1f} | {secs / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
