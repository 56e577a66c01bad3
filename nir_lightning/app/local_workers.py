"""``nir register-many``'s worker processes on one machine (``--workers``).

One process fitting a cohort on every core leaves cores idle between fits: its start-up, the
affine stage (one thread, ``alignment/cpu.py``), the scoring and the writing of each pair are
mostly serial. Several processes, each fitting its share of the pairs on fewer threads, keep
every core busy: on the 2-core dev machine 6 pairs at 2 mm took 55-57 s with two single-thread
workers against 75-78 s with one two-thread process, with the same files (``benchmarks/cohort.py``;
``benchmarks/README.md``, 0.2.15).

The workers are the ranks of a ``torchrun`` launch, started here: each is a
``nir register-many`` process with ``RANK``/``WORLD_SIZE``/``MASTER_*`` set, so the sharding
(``pending[rank::world]``), the locks and the merged summary are the ones ``torchrun`` gets
(:mod:`nir_lightning.app.batch`). This module decides how many (:func:`plan_workers`),
starts them (:func:`launch`) and watches them (:func:`supervise`): a worker that dies stops the
others at once instead of leaving them waiting for it at the end (``--dist-timeout-hours``).
It imports neither torch nor Lightning unless an NVIDIA driver is present (to ask CUDA).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from nir_lightning.app.batch_options import accelerator_requested, parse_command
from nir_lightning.app.startup import package_python_path
from nir_lightning.app.threads import free_cores, usable_cores
from nir_lightning.errors import InputError

# Peak memory of one worker (measured: ~0.9 GB at 2 mm, 0.86 M voxels; ~2.3 GB at 1 mm, 6.9 M voxels)
BASE_BYTES = 0.6 * 2**30
BYTES_PER_VOXEL = 0.3 * 2**30 / 1e6
GRACE_S = 30.0  # how long the other workers may take to exit after rank 0 has (they end first)


@dataclass(frozen=True)
class WorkerPlan:
    """How ``register-many`` runs: ``workers`` processes of ``threads`` torch threads each
    (``None``: the single process's default), and why, in words.

    >>> plan_workers(None, None, free=2, usable=2, pairs=6, gpu=False, launched=False)
    WorkerPlan(workers=2, threads=1, reason='--workers auto: 2 free cores')
    >>> plan_workers(None, None, free=4, usable=4, pairs=6, gpu=False, launched=False, fit_in_memory=3).workers
    3
    >>> plan_workers(None, None, free=8, usable=8, pairs=6, gpu=True, launched=False).workers
    1
    """

    workers: int
    threads: int | None
    reason: str


def plan_workers(
    requested: int | None,
    threads: int | None,
    *,
    free: int,
    usable: int,
    pairs: int,
    gpu: bool,
    launched: bool,
    fit_in_memory: int | None = None,
) -> WorkerPlan:
    """The worker processes for ``--workers requested`` (``None``: auto) and ``--threads threads``.

    ``free``: cores not busy now (:func:`~nir_lightning.app.threads.free_cores`); ``usable``: cores
    this process may use; ``pairs``: rows of the CSV; ``gpu``: the pairs are fitted on CUDA;
    ``launched``: this process is a rank of ``torchrun``/SLURM or of :func:`launch`;
    ``fit_in_memory``: how many workers the available memory holds (``None``: unknown).
    Auto on the CPU: one single-thread worker per free core (``threads`` each when given), no
    more than the pairs or the memory allow; on a GPU one (``torchrun`` spreads ranks over GPUs).
    """
    if launched:
        if requested is not None and requested > 1:
            raise InputError(f"--workers {requested} starts worker processes itself, but this process is already one rank of a launch "
                             "(RANK/WORLD_SIZE are set, e.g. by torchrun): leave --workers out and set the launcher's process count "
                             "(torchrun --nproc-per-node N).")
        return WorkerPlan(1, threads, "a rank of a launch")
    if requested is not None:
        n = min(requested, max(1, pairs))
        if n == 1:
            return WorkerPlan(1, threads, "--workers 1" if requested == 1 else f"--workers {requested}, {pairs} pair(s)")
        per = threads if threads is not None else max(1, usable // n)
        return WorkerPlan(n, per, f"--workers {requested}" + (f" ({pairs} pairs)" if n < requested else ""))
    if gpu:
        return WorkerPlan(1, threads, "--workers auto: one process on the GPU")
    per = threads if threads is not None else 1
    n = max(1, free // per)
    why = f"--workers auto: {free} free core{'s' if free != 1 else ''}"
    if pairs < n:
        n, why = max(1, pairs), f"{why}, {pairs} pair{'s' if pairs != 1 else ''}"
    if fit_in_memory is not None and fit_in_memory < n:
        n, why = max(1, fit_in_memory), f"{why}, memory for {fit_in_memory}"
    return WorkerPlan(n, per if n > 1 else threads, why)


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable``, or less under a cgroup limit (a
    container, a SLURM allocation); ``None`` when neither can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
            if limit.isdigit() and int(limit) < 2**60:
                found.append(max(0, int(limit) - int(usage)))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def largest_image_voxels(paths: Sequence[str]) -> int:
    """The most voxels of any of ``paths`` (NIfTI headers only; unreadable files count 0: their pair fails on its own)."""
    import nibabel as nib

    most = 0
    for path in dict.fromkeys(paths):
        try:
            shape = nib.load(path).header.get_data_shape()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001, S112 -- the pair reports it when its turn comes
            continue
        most = max(most, math.prod(int(s) for s in shape[:3]))
    return most


def launched(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a rank of a launch (``torchrun``, SLURM with ``RANK`` set, or :func:`launch`)."""
    return "RANK" in environ or "WORLD_SIZE" in environ


def _gpu_requested(configs: Sequence[str], extra: Sequence[str]) -> bool:
    """Whether the pairs would be fitted on CUDA: asked for, or ``auto`` with a GPU present."""
    accel = (accelerator_requested(configs, extra) or "auto").lower()
    if accel == "cpu":
        return False
    if accel in ("gpu", "cuda"):
        return True
    if not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()):
        return False  # no NVIDIA driver, no CUDA: no need to import torch to ask
    import torch

    return bool(torch.cuda.is_available())


def plan_from_argv(argv: Sequence[str]) -> WorkerPlan:
    """:func:`plan_workers` for a ``register-many`` command line (parsed as the command parses it)."""
    from nir_lightning.app.pairs_csv import read_pairs

    args, extra = parse_command(argv)
    if launched():
        return plan_workers(args.workers, args.threads, free=1, usable=1, pairs=1, gpu=False, launched=True)
    if args.workers == 1:
        return WorkerPlan(1, args.threads, "--workers 1")
    specs = read_pairs(args.pairs)
    gpu = _gpu_requested(args.config, extra)
    idle, fit = 1, None
    if args.workers is None and not gpu:  # auto on the CPU: the free cores, and the memory where it could limit them
        idle = free_cores()
        memory = available_memory()
        if memory is not None and idle // (args.threads or 1) > 1 and len(specs) > 1:
            voxels = largest_image_voxels([p for s in specs if s.problem is None for p in (s.fixed, s.moving)])
            fit = max(1, int(memory // (BASE_BYTES + BYTES_PER_VOXEL * voxels)))
    return plan_workers(args.workers, args.threads, free=idle, usable=usable_cores(), pairs=len(specs), gpu=gpu,
                        launched=False, fit_in_memory=fit)


def worker_argv(argv: Sequence[str], threads: int | None) -> list[str]:
    """``argv`` for one worker: ``--workers 1``, and ``--threads`` set to ``threads``.

    >>> worker_argv(["--pairs", "p.csv", "--workers=3", "--threads", "2", "--output", "o"], 1)
    ['--pairs', 'p.csv', '--output', 'o', '--workers', '1', '--threads', '1']
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--threads"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--threads=")):
            continue
        out.append(arg)
    out += ["--workers", "1"]
    if threads is not None:
        out += ["--threads", str(threads)]
    return out


def free_port() -> int:
    """A TCP port free on this machine now, for the workers' rendezvous (rank 0 listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: Sequence[str], plan: WorkerPlan) -> int:
    """Start ``plan.workers`` ``register-many`` processes as the ranks of one job and wait for
    them (:func:`supervise`); the exit status is rank 0's (the number of failed pairs)."""
    port = free_port()
    cmd = [sys.executable, "-m", "nir_lightning.cli", "register-many", *worker_argv(argv, plan.threads)]
    procs = []
    for rank in range(plan.workers):
        env = dict(os.environ)
        env.update(RANK=str(rank), WORLD_SIZE=str(plan.workers), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(plan.workers),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env["PYTHONPATH"] = package_python_path()  # the workers import this copy of the package
        if plan.threads is not None:
            env["OMP_NUM_THREADS"] = str(plan.threads)  # the OpenMP pool sized before torch starts it
        procs.append(subprocess.Popen(cmd, env=env))
    return supervise(procs)


def supervise(procs: Sequence[subprocess.Popen[bytes]], *, poll_s: float = 0.2, grace_s: float = GRACE_S) -> int:
    """Wait for the workers ``procs`` (rank = index) and return rank 0's exit status.

    A worker other than rank 0 that exits with a non-zero status or a signal has died (they
    exit 0 whatever their pairs did): the others are stopped at once, since rank 0 would wait
    for it at the end, and the status is 1. Rank 0 ends last (it merges the summary after the
    others); others still running ``grace_s`` after it are stopped. SIGTERM, SIGINT or SIGHUP
    sent to this process are passed on to the workers.
    """
    received: list[int] = []

    signalled = [0.0]

    def forward(signum: int, _frame: FrameType | None) -> None:
        if not received:
            signalled[0] = time.monotonic()
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # where this thread may set handlers (the main thread), and the signals this platform has
    handled = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)]
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in handled} if main else {}
    try:
        rank0_done: float | None = None
        while True:
            codes = [p.poll() for p in procs]
            dead = [(r, c) for r, c in enumerate(codes) if c is not None and (c < 0 or (r > 0 and c != 0))]
            if dead and not received:
                rank, code = dead[0]
                _stop(procs)
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                print(f"nir register-many: error: worker {rank} (of {len(procs)}) {how} before the job ended; stopped the other workers. "
                      "The pairs completed so far are kept: run the same command again to do the rest (complete pairs are skipped).",
                      file=sys.stderr, flush=True)
                return 1
            if all(c is not None for c in codes):
                break
            if received and time.monotonic() - signalled[0] > grace_s:
                _stop(procs)  # a worker that did not end on the signal passed on
                break
            if codes[0] is not None:
                rank0_done = rank0_done if rank0_done is not None else time.monotonic()
                if time.monotonic() - rank0_done > grace_s:
                    _stop(procs)
                    print(f"nir register-many: error: worker 0 ended {grace_s:.0f} s before the other workers; stopped them. "
                          "Run the same command again to finish any pair left undone.", file=sys.stderr, flush=True)
                    return 1
            time.sleep(poll_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        return 128 + received[0]
    return int(codes[0] or 0)


def _stop(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main_or_none(argv: Sequence[str]) -> int | None:
    """Run ``register-many`` over worker processes when the plan has more than one (their exit
    status), else ``None``: the caller runs it in this process."""
    plan = plan_from_argv(argv)
    if plan.workers <= 1:
        return None
    print(f"nir register-many: {plan.workers} worker processes of {plan.threads} thread{'s' if plan.threads != 1 else ''} each "
          f"({plan.reason}; --workers 1 for one process)", flush=True)
    return launch(argv, plan)
