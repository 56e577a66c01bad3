"""How many CPU threads a registration uses.

Measured (``benchmarks/README.md``, "Threads"): on an idle 2-core machine two torch threads fit
a pair faster than one, but when other processes already keep the cores busy, OpenMP threads
that spin for a core slow every step several-fold. So the default is the cores this process
may use (its CPU affinity, not the machine's count) less the cores busy now; an explicit
``OMP_NUM_THREADS`` or ``--threads`` wins.

"Busy now" is the 1-minute load average when it says the machine is idle, else what
``/proc/stat`` shows over 0.15 s: the load average lags by about a minute, so a command started
right after another (a shell loop over pairs) saw the finished one's load and ran on one thread
of two (0.2.14: a fit ~35 % longer, and no affine stage beside the imports).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from nir_lightning.errors import InputError


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; cgroup-limited containers included).

    >>> usable_cores() >= 1
    True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def free_cores(window_s: float = 0.15) -> int:
    """The usable cores not busy now, at least 1: all of them when the 1-minute load average
    rounds to 0, else :func:`idle_cores_now` over ``window_s`` (the load average lags).

    >>> 1 <= free_cores() <= usable_cores()
    True
    """
    cores = usable_cores()
    load = _load()
    if int(load + 0.5) == 0:
        return cores
    return idle_cores_now(window_s, fallback=max(1, min(cores, cores - int(load + 0.5))))


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """Idle and total jiffies summed over ``cpus`` (``/proc/stat``); ``None`` where unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    idle = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [float(v) for v in fields[:8]]
            idle += values[3] + values[4]  # idle, iowait
            total += sum(values)
    return (idle, total) if total > 0 else None


def idle_cores_now(window_s: float = 0.15, *, fallback: int = 1) -> int:
    """The usable cores idle over the next ``window_s`` (``/proc/stat`` of the CPUs this process
    may run on; this process sleeps meanwhile), at least 1; ``fallback`` where that cannot be read.

    Unlike the load average, this does not lag: a job that ended a second ago does not count.

    >>> 1 <= idle_cores_now(0.05) <= usable_cores()
    True
    """
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return fallback
    before = _cpu_times(cpus)
    time.sleep(window_s)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return fallback
    busy = len(cpus) * (1.0 - (after[0] - before[0]) / (after[1] - before[1]))
    return max(1, min(len(cpus), len(cpus) - int(busy + 0.5)))


def default_threads() -> int:
    """Threads when none are asked for: ``OMP_NUM_THREADS`` when set (at most the usable cores),
    else :func:`free_cores`."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return min(int(omp), usable_cores())
    return free_cores()


def resolve_threads(threads: int | None) -> int:
    """``threads`` checked against the usable cores, or :func:`default_threads` for ``None``.

    >>> resolve_threads(1)
    1
    >>> resolve_threads(0)
    Traceback (most recent call last):
    ...
    nir_lightning.errors.InputError: --threads must be >= 1 (CPU threads of torch), got 0; leave it out to use the usable cores less the current load.
    """
    if threads is None:
        return default_threads()
    if threads < 1:
        raise InputError(f"--threads must be >= 1 (CPU threads of torch), got {threads}; leave it out to use the usable cores less the current load.")
    cores = usable_cores()
    if threads > cores:
        raise InputError(f"--threads {threads} is more than the {cores} CPU cores this process may use; more threads than cores only slow every step. Use --threads {cores} or less.")
    return threads
